"""``seqlab.ops.<name>`` is always the function, even after its same-named submodule was imported."""

import importlib

import seqlab.ops as ops


def test_op_names_stay_functions_after_submodule_imports():
    for module in ("selective_scan", "ssd", "linear_attention", "delta_rule", "conv", "s4"):
        importlib.import_module(f"seqlab.ops.{module}")
    for name in ops.__all__:
        assert callable(getattr(ops, name)), name
        assert not isinstance(getattr(ops, name), type(ops)), f"seqlab.ops.{name} is a module"

"""Lower Triton kernels to Triton IR for sm_90 in a clean process, without a GPU.

The interpreter runs code the GPU compiler rejects (e.g. a variable whose shape changes inside a runtime `if`),
so kernel tests also compile every specialisation they launched. ``payload`` items are
``(module, kernel name, {param: type or "constexpr"}, [[param index, constexpr value], ...])``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import subprocess
import sys

import pytest

_SCRIPT = """
import importlib, json, sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
except ImportError as err:
    print("SKIP", err); sys.exit(0)
target = GPUTarget("cuda", 90, 32)
backend = CUDABackend(target)
options = backend.parse_options({})
failures = 0
for module, name, sig, consts in json.load(sys.stdin):
    fn = getattr(importlib.import_module(module), name)
    ctx = triton._C.libtriton.ir.context()
    triton._C.libtriton.ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    src = ASTSource(fn=fn, signature=sig, constexprs={(i,): v for i, v in consts})
    try:
        src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(), ctx)
    except Exception as err:
        failures += 1
        print("FAIL", name, consts, str(err)[-800:])
print("failures", failures)
sys.exit(1 if failures else 0)
"""


def assert_compiles_for_sm90(payload: list) -> None:
    """Fail with the compiler's messages if any kernel specialisation does not lower; skip on a Triton without
    the front-end API this uses."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _SCRIPT], input=json.dumps(payload), text=True,
                         capture_output=True, env=env, timeout=300)
    if res.stdout.startswith("SKIP"):
        pytest.skip(f"this triton has no front-end API for the check: {res.stdout.strip()}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@contextlib.contextmanager
def recording_launches(launched: list):
    """Under TRITON_INTERPRET=1, append a payload item (see above) to ``launched`` for every kernel launch inside
    the block; elsewhere do nothing."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        yield
        return
    import torch
    from triton.runtime import interpreter

    dtypes = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
              torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}
    original = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        params = list(inspect.signature(self.fn).parameters.values())
        bound = dict(zip([p.name for p in params], args), **kwargs)
        sig, consts = {}, []
        for i, p in enumerate(params):
            v = bound.get(p.name)
            if "constexpr" in str(p.annotation) or v is None:
                sig[p.name] = "constexpr"
                consts.append([i, v])
            elif isinstance(v, torch.Tensor):
                sig[p.name] = "*" + dtypes[v.dtype]
            else:
                sig[p.name] = "i32" if isinstance(v, int) and abs(v) < 2**31 else "i64"
        launched.append((self.fn.__module__, self.fn.__name__, sig, consts))
        return original(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = run
    try:
        yield
    finally:
        interpreter.InterpretedFunction.run = original


def assert_launched_compile_for_sm90(launched: list) -> None:
    """Lower each distinct specialisation recorded by ``recording_launches``; skip when none was recorded."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1" or not launched:
        pytest.skip("only meaningful after interpreter tests recorded their launches")
    specs = {json.dumps(s, sort_keys=True, default=str): s for s in launched}
    assert_compiles_for_sm90(list(specs.values()))


def with_constexpr(launched: list, name: str, value) -> list:
    """The recorded specialisations whose kernel has constexpr ``name``, with it set to ``value``: the variants the
    interpreter cannot run (e.g. programmatic dependent launch, which needs a Hopper GPU) still get lowered."""
    variants = []
    for module, kernel, sig, consts in launched:
        if name in sig and sig[name] == "constexpr":
            index = list(sig).index(name)
            variants.append((module, kernel, sig, [[i, value if i == index else v] for i, v in consts]))
    return variants

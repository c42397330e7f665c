"""Lazy package attributes (PEP 562): a package lists what it exports and from which module; each name imports its
module on first use, so importing the package stays light (no torch until a model or op is asked for)."""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """The module-level ``__getattr__`` of ``package``: ``exports`` maps a public name to the module defining it;
    the first access imports that module and caches the value on the package."""

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__

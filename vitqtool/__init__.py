"""vitqtool: variation-aware 2/3/4/8-bit quantization of Vision Transformers.

The public API is imported lazily so that `import vitqtool` (and `vitqtool --help`) stays fast:
torch and timm load on first use of a function that needs them.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_model": "vitqtool.core",
    "prepare": "vitqtool.core",
    "calibrate": "vitqtool.core",
    "quantizers_disabled": "vitqtool.quant",
    "quant_summary": "vitqtool.core",
    "evaluate": "vitqtool.commands",
    "quantize": "vitqtool.commands",
    "softlabels": "vitqtool.commands",
    "export": "vitqtool.commands",
    "load": "vitqtool.commands",
    "inspect": "vitqtool.commands",
    "analyze": "vitqtool.commands",
    "compare": "vitqtool.commands",
    "load_recipe": "vitqtool.recipe",
    "load_dataset": "vitqtool.data",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'vitqtool' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


class _Package(types.ModuleType):
    """The package module: importing the subpackage `vitqtool.export` must not replace the function `vitqtool.export`."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return  # the import system binds a submodule to its parent; the public function of that name wins
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

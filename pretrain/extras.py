"""Optional dependencies: one line that names the extra to install when one is missing.

`transformers` and `lm-eval` are in the `eval` extra (`pip install 'xlstm-pretrain[eval]'`):
only `pretrain.convert --to hf` and `pretrain.evaluate` need them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {"transformers": "eval", "lm_eval": "eval"}


def missing_extra_message(module: str, purpose: str) -> str:
    """The one line printed when `module` (a top-level import name) is not installed."""
    extra = EXTRAS.get(module.split(".")[0], "eval")
    return (f"{purpose} needs the package {module.split('.')[0]!r}, which is not installed: "
            f"pip install 'xlstm-pretrain[{extra}]'")


def require(module: str, purpose: str) -> ModuleType:
    """Import `module`, or raise ModuleNotFoundError whose message is one line naming the
    extra to install (`purpose` says what needs it, e.g. "pretrain.convert --to hf")."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != module.split(".")[0]:
            raise  # something inside the package is missing, not the package
        raise ModuleNotFoundError(missing_extra_message(module, purpose), name=err.name) from None

"""ips-search: Iterative Patch Selection (IPS) and a Ray Tune search for its M, I, patch size and learning rate.

The public names load on first use (PEP 562), so ``python -m ips_search.run`` and the other commands start with
nothing heavy imported: a Ctrl-C while torch loads is then still the command's one line, not a traceback.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ips_search.config import DataConfig, ExperimentConfig, IPSConfig, Task, TrainConfig
    from ips_search.model import IPSNet

_HOMES = {
    "DataConfig": "ips_search.config",
    "ExperimentConfig": "ips_search.config",
    "IPSConfig": "ips_search.config",
    "Task": "ips_search.config",
    "TrainConfig": "ips_search.config",
    "IPSNet": "ips_search.model",
}
__all__ = ["DataConfig", "ExperimentConfig", "IPSConfig", "IPSNet", "Task", "TrainConfig"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'ips_search' has no attribute {name!r}")

"""ips-search: Iterative Patch Selection (IPS) and a Ray Tune search for its M, I, patch size and learning rate."""

from ips_search.config import DataConfig, ExperimentConfig, IPSConfig, Task, TrainConfig
from ips_search.model import IPSNet

__all__ = ["DataConfig", "ExperimentConfig", "IPSConfig", "IPSNet", "Task", "TrainConfig"]
__version__ = "0.1.0"

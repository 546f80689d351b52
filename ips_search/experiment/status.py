"""A trial's status: what the trainable reports, completed by what Ray says of the trial."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any


class Status(str, enum.Enum):
    """Where a trial stands. The trainable reports ``running`` each epoch and one of the final four at its end; the
    rest follow from Ray's state. Compares equal to its value, so CSV cells and JSON values compare directly."""

    COMPLETED = "completed"  # all epochs
    EARLY_STOPPED = "early-stopped"  # stopped by the scheduler, or by the fold pruner, before its last epoch
    INFEASIBLE = "infeasible"  # over the memory budget (predicted, or measured on the first step)
    NAN_LOSS = "nan-loss"
    OUT_OF_MEMORY = "out-of-memory"
    FAILED = "failed"  # raised
    RUNNING = "running"
    PENDING = "pending"

    def __str__(self) -> str:
        return self.value

    @property
    def is_final(self) -> bool:
        """The trial will not train further (restoring it does not change its status)."""
        return self not in (Status.RUNNING, Status.PENDING)


# Reported by a trial that ends before its last epoch: restoring the experiment must keep it ended
STOPPED = (Status.INFEASIBLE, Status.NAN_LOSS, Status.OUT_OF_MEMORY)
ORDER = {status: i for i, status in enumerate(Status)}  # how tables list trials: completed first


def trial_status(ray_status: str | None, last: Mapping[str, Any]) -> Status:
    """Our status from Ray's trial status (``TERMINATED``, ``ERROR``, ...) and the trial's last result."""
    reported = last.get("status")
    if reported in STOPPED or reported == Status.COMPLETED:
        return Status(reported)
    if ray_status == "ERROR":
        return Status.FAILED
    if ray_status == "TERMINATED":
        return Status.EARLY_STOPPED if reported == Status.RUNNING else Status.FAILED
    return Status.RUNNING if ray_status == "RUNNING" or last else Status.PENDING

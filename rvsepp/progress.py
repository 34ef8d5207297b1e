"""Where a training run stands: one step's logged values, the current epoch's running
totals, and the run's progress (steps, epochs, best dev score), saved in every checkpoint."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class StepValues:
    """What one optimizer step logs (one host transfer per step)."""

    loss: float
    gated_r: float
    gated_c: float
    near_tie_r: float
    near_tie_c: float
    grad_norm_image: float
    grad_norm_text: float


@dataclass
class EpochTotals:
    """Sums over the current epoch's steps; divided by the step count, the epoch means of
    ``metrics.csv``."""

    loss: float = 0.0
    gated_r: float = 0.0
    gated_c: float = 0.0
    near_tie_r: float = 0.0
    near_tie_c: float = 0.0

    def add(self, step: StepValues) -> None:
        for name in self.names():
            setattr(self, name, getattr(self, name) + getattr(step, name))

    def means(self, steps: int) -> EpochTotals:
        return EpochTotals(**{name: getattr(self, name) / max(steps, 1) for name in self.names()})

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(item.name for item in fields(cls))

    @classmethod
    def from_saved(cls, saved: Any) -> EpochTotals:
        """From a checkpoint: a dict by name (or the five sums in order, as first saved)."""
        if isinstance(saved, Mapping):
            return cls(**{name: float(saved[name]) for name in cls.names()})
        return cls(*(float(value) for value in saved))


@dataclass
class Progress:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    step_in_epoch: int = 0  # batches of the current epoch already trained on
    epoch_totals: EpochTotals = field(default_factory=EpochTotals)
    best_rsum: float = -math.inf
    best_epoch: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**vars(self), "epoch_totals": vars(self.epoch_totals).copy()}

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> Progress:
        return cls(**{**saved, "epoch_totals": EpochTotals.from_saved(saved["epoch_totals"])})

"""Learning-rate schedules counted in optimizer steps, independent of epochs.

Patient distillation runs are long and step-based (``trainer.max_steps``); epochs of
a sampled transfer pool are arbitrary. Each schedule here has ``interval = "step"``,
which :class:`~distillery.engine.module.DistillationModule` passes to Lightning, and its state
(``last_epoch`` = steps taken) is saved in the checkpoint, so ``ckpt_path=last.ckpt``
resumes mid-schedule.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine(LambdaLR):
    """lr(s) = base_lr * f(s), with

        f(s) = (s + 1) / warmup_steps                            for s < warmup_steps
        f(s) = m + (1 - m) * (1 + cos(pi * p)) / 2,  p = (s - warmup_steps) / (total_steps - warmup_steps)

    clipped at p = 1, where m = ``min_lr_ratio``.
    """

    interval = "step"

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
    ):
        if total_steps is None or total_steps <= 0:
            raise ValueError(
                f"scheduler.total_steps must be > 0 (set trainer.max_steps), got {total_steps}"
            )
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(
                f"scheduler.warmup_steps must be in [0, total_steps), got {warmup_steps}"
            )
        self.total_steps, self.warmup_steps, self.min_lr_ratio = (
            total_steps,
            warmup_steps,
            min_lr_ratio,
        )
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        p = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))


class WeightSchedule:
    """A loss-term weight as a function of the (fractional) epoch; used in
    ``distill.weights`` in place of a number. Logged as ``train/weight/<term>``."""

    def __call__(self, epoch: float) -> float:  # pragma: no cover - interface
        raise NotImplementedError


class ConstantWeight(WeightSchedule):
    """w(e) = value"""

    def __init__(self, value: float = 1.0):
        self.value = value

    def __call__(self, epoch: float) -> float:
        return self.value


class LinearWarmupWeight(WeightSchedule):
    """w(e) = value * min(1, e / warmup_epochs) (value when warmup_epochs is 0)"""

    def __init__(self, value: float = 1.0, warmup_epochs: float = 1.0):
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.value, self.warmup_epochs = value, warmup_epochs

    def __call__(self, epoch: float) -> float:
        return (
            self.value
            if self.warmup_epochs == 0
            else self.value * min(1.0, epoch / self.warmup_epochs)
        )


class CosineWeight(WeightSchedule):
    """w(e) = end + (start - end) * (1 + cos(pi * min(1, e / epochs))) / 2: from start to end."""

    def __init__(self, start: float = 1.0, end: float = 0.0, epochs: float = 1.0):
        if epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {epochs}")
        self.start, self.end, self.epochs = start, end, epochs

    def __call__(self, epoch: float) -> float:
        p = min(1.0, epoch / self.epochs)
        return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * p))

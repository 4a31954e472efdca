"""Learning-rate schedules counted in optimizer steps, independent of epochs.

Patient distillation runs are long and step-based (``trainer.max_steps``); epochs of
a sampled transfer pool are arbitrary. Each schedule here has ``interval = "step"``,
which :class:`~distillery.module.DistillationModule` passes to Lightning, and its state
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

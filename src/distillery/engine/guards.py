"""What a non-finite loss does (``module.nan_policy``).

* ``raise`` (default): the run stops with a message naming the loss terms that went
  non-finite, the optimizer step and the batch's sample ids.
* ``skip``: that step's update is dropped (no optimizer step: its state untouched)
  and counted (``train/skipped_steps``); a run that skips more than
  ``module.max_skipped_share`` of its planned optimizer steps stops. Under Lightning's
  automatic optimisation the skipped batch still counts as a step (``global_step`` and
  step-based schedules advance), and with ``trainer.accumulate_grad_batches > 1`` only
  that micro-batch is dropped; language models (manual optimisation) drop the whole step.
  Lightning refuses skipped steps under DDP with automatic optimisation: ``skip`` is then
  a config error (``raise`` works).

Under DDP the decision is taken for all ranks together (one rank's NaN stops or skips
the step everywhere), so no rank waits in a gradient all-reduce the others never join.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

POLICIES = ("raise", "skip")


def sample_ids(batch: dict) -> list[int]:
    """The sample ids of a batch, or of its sources (``{"labeled": ..., "transfer": ...}``)."""
    if "sample_id" in batch:
        return batch["sample_id"].flatten().tolist()
    return [i for b in batch.values() if isinstance(b, dict) for i in sample_ids(b)]


class NonFiniteGuard:
    def __init__(self, policy: str = "raise", max_skipped_share: float = 0.01):
        if policy not in POLICIES:
            raise ValueError(f"module.nan_policy must be one of {POLICIES}, got {policy!r}")
        if not 0 <= max_skipped_share <= 1:
            raise ValueError(f"module.max_skipped_share must be in [0, 1], got {max_skipped_share}")
        self.policy, self.max_skipped_share = policy, max_skipped_share
        self.skipped = 0

    def skip(self, module, total: Tensor, values: dict[str, Tensor], batch: dict) -> bool:
        """True when this step must be dropped; raises under ``raise`` (or too many skips)."""
        bad = ~torch.isfinite(total.detach())
        trainer = module.trainer
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad.float(), reduce_op="sum") > 0
        if not bool(bad):
            return False
        terms = [n for n, v in values.items() if not bool(torch.isfinite(v.detach()))]
        where = (
            f"non-finite loss at optimizer step {trainer.global_step}: terms "
            f"{terms or '(another rank)'}, sample ids {sample_ids(batch)[:16]}"
        )
        if self.policy == "raise":
            raise FloatingPointError(f"{where} (module.nan_policy=raise; 'skip' drops such steps)")
        self.skipped += 1
        planned = trainer.estimated_stepping_batches
        if not module.automatic_optimization:  # Lightning counts micro-batches here
            planned = math.ceil(planned / module.accumulate)
        allowed = self.max_skipped_share * planned if math.isfinite(planned) else math.inf
        if self.skipped > allowed:
            raise FloatingPointError(
                f"{where}: {self.skipped} of the run's {planned} optimizer steps skipped, more "
                f"than module.max_skipped_share={self.max_skipped_share}"
            )
        module.log("train/skipped_steps", float(self.skipped))
        return True

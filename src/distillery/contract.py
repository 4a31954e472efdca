"""The shared vocabulary, the ground floor: every other layer imports it, it imports
nothing of Distillery.

* :class:`Outputs`: what one forward pass produced, handed to every loss term.
* :class:`LossTerm`: the base class of a loss term (``distillery.losses``).
* The label values: ``UNLABELED`` (a transfer-set sample) and ``IGNORE`` (a position no
  token term trains on).
* The batch contract shared by every datamodule (``distillery.data``). A batch is a dict:

  * ``inputs``: raw (un-normalised) input tensor ``[B, ...]``;
  * ``labels``: ``[B]`` int64 class ids, ``-1`` (``UNLABELED``) for transfer-set samples,
    or ``[B, T]`` next tokens (``IGNORE`` where no token term trains);
  * ``sample_id``: ``[B]`` int64 id, stable across epochs and runs for a given data
    config (the key a teacher-output cache uses);
  * ``attention_mask`` (token inputs with padding only): ``[B, N]``, 1 = token,
    0 = padding; feature terms average over real tokens only.

  With a transfer set, training batches arrive as ``{"labeled": batch, "transfer":
  batch}``; ``distillery.data.batch.merge_sources`` concatenates them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

UNLABELED = -1  # label value of samples from an unlabeled transfer set
IGNORE = -100  # label value of positions no token term trains on (padding, prompts)
BATCH_KEYS = ("inputs", "labels", "sample_id")  # the keys every batch carries


@dataclass
class Outputs:
    """What one forward pass produced, handed to every loss term."""

    student: Tensor  # student outputs: logits [B, C], embeddings [B, D] or token logits [B, T, V]
    labels: Tensor  # [B] class ids (UNLABELED for transfer-set samples) or [B, T] next tokens
    teacher: Tensor | None = None  # teacher outputs, detached
    epoch: float = 0.0  # fractional epoch, for warmups and weight schedules
    targets: Tensor | None = None  # soft label targets [B, C] (mixed inputs), else None
    extras: dict = field(default_factory=dict)  # captured features, masks, sample ids

    def subset(self, mask: Tensor) -> Outputs:
        return Outputs(
            student=self.student[mask],
            labels=self.labels[mask],
            teacher=None if self.teacher is None else self.teacher[mask],
            epoch=self.epoch,
            targets=None if self.targets is None else self.targets[mask],
            extras=_subset_batch(self.extras, mask),
        )


def _subset_batch(value, mask: Tensor):
    """Apply a batch mask to every batch-first tensor in nested dicts/lists."""
    if isinstance(value, Tensor):
        return value[mask] if value.ndim and value.shape[0] == mask.shape[0] else value
    if isinstance(value, dict):
        return {k: _subset_batch(v, mask) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_subset_batch(v, mask) for v in value)
    return value


class LossTerm(nn.Module):
    """Base class of a loss term.

    Subclasses set ``needs_labels`` (only labeled samples are passed in, sample
    reduction), ``needs_teacher`` (an error when no teacher is configured) and ``per``
    (``sample``: ``forward(out) -> [B]``; ``token``: ``forward(out) -> [B, T]``;
    ``pair``: ``forward(out) -> [P]``, one loss per preference pair of the batch).
    """

    needs_labels: bool = False
    needs_teacher: bool = False
    per: str = "sample"

    def forward(self, out: Outputs) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

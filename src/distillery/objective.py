"""The objective: a weighted sum of named loss terms.

Every term is a small ``nn.Module`` (see ``distillery.losses``) that maps a
:class:`Outputs` bundle to a vector of per-sample losses. The objective owns the
reduction, so all terms share one rule: each term is averaged over the samples it
applies to (labeled samples for label terms, every sample for distillation terms).
A term with no applicable sample in a batch contributes 0, never NaN.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

UNLABELED = -1  # label value of samples from an unlabeled transfer set


@dataclass
class Outputs:
    """What one forward pass produced, handed to every loss term."""

    student: Tensor  # student logits [B, C]
    labels: Tensor  # [B] class ids, UNLABELED for transfer-set samples
    teacher: Tensor | None = None  # teacher logits [B, C], detached
    epoch: float = 0.0  # fractional epoch, for warmups
    targets: Tensor | None = None  # soft label targets [B, C] (mixed inputs), else None
    extras: dict = field(default_factory=dict)  # room for features, masks, ...

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

    Subclasses set ``needs_labels`` (only labeled samples are passed in) and/or
    ``needs_teacher`` (the term is skipped with an error when no teacher is
    configured) and implement ``forward(out) -> Tensor[B]`` of per-sample losses.
    """

    needs_labels: bool = False
    needs_teacher: bool = False

    def forward(self, out: Outputs) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class Objective(nn.Module):
    """total = sum_i w_i * mean_{applicable samples}(term_i).

    Args:
        terms: name -> LossTerm. Names become the logged metric names
            (``train/loss/<name>``).
        weights: name -> float weight, or a schedule ``w(epoch)`` (see
            ``distillery.schedules``: ConstantWeight, LinearWarmupWeight, CosineWeight).
            Terms without an entry get weight 1. A weight of 0 still computes and logs
            the term (handy for monitoring) but keeps it out of the gradient.
    """

    def __init__(self, terms: Mapping[str, LossTerm], weights: Mapping[str, Any] | None = None):
        super().__init__()
        if not terms:
            raise ValueError("distill.terms: the objective needs at least one loss term")
        weights = dict(weights or {})
        unknown = set(weights) - set(terms)
        if unknown:
            raise ValueError(
                f"distill.weights: weights given for unknown terms {sorted(unknown)}; "
                f"terms are {sorted(terms)}"
            )
        for name, term in terms.items():
            if not isinstance(term, LossTerm):
                raise TypeError(
                    f"distill.terms.{name}: expected a distillery.objective.LossTerm, "
                    f"got {type(term).__name__}"
                )
        self.terms = nn.ModuleDict(dict(terms))
        self.weights: dict[str, Any] = {}
        for name in terms:
            w = weights.get(name, 1.0)
            if not callable(w):
                try:
                    w = float(w)
                except (TypeError, ValueError) as e:
                    raise TypeError(
                        f"distill.weights.{name}: expected a number or a schedule, got {w!r}"
                    ) from e
            self.weights[name] = w
        self.current_weights: dict[str, float] = {}

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for t in self.terms.values())

    def forward(self, out: Outputs) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns (total loss, {term name: unweighted term value})."""
        total = out.student.new_zeros((), dtype=torch.float32)
        values: dict[str, Tensor] = {}
        labeled_out: Outputs | None = None  # built once, only if a label term asks for it
        for name, term in self.terms.items():
            if term.needs_teacher and out.teacher is None:
                raise RuntimeError(
                    f"distill.terms.{name} needs a teacher, but `teacher` is null in the config"
                )
            if term.needs_labels and labeled_out is None:
                labeled = out.labels != UNLABELED
                labeled_out = out if bool(labeled.all()) else out.subset(labeled)
            term_out = labeled_out if term.needs_labels else out
            if term_out.student.shape[0] == 0:
                value = total.new_zeros(())
            else:
                per_sample = term(term_out)
                if per_sample.ndim != 1 or per_sample.shape[0] != term_out.student.shape[0]:
                    raise RuntimeError(
                        f"distill.terms.{name} must return one loss per sample "
                        f"(shape [{term_out.student.shape[0]}]), got {tuple(per_sample.shape)}"
                    )
                value = per_sample.float().mean()
            values[name] = value
            w = self.weights[name]
            w = float(w(out.epoch)) if callable(w) else w
            self.current_weights[name] = w
            total = total + w * value
        return total, values

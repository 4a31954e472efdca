"""The objective: a weighted sum of named loss terms, one object for every modality.

Every term is a small ``nn.Module`` (see ``distillery.losses``) that maps an
:class:`~distillery.contract.Outputs` bundle to unreduced losses: one per sample (``per = "sample"``, the
default) or one per token (``per = "token"``, ``[B, T]``, zero where a position is not
trained). The objective owns the reduction, so all terms of a run share one rule:

* ``reduction: sample`` (:class:`SampleMean`, classifiers and encoders): each term is
  averaged over the samples it applies to (labeled samples for label terms, every sample
  for distillation terms). A term with no applicable sample contributes 0, never NaN.
* ``reduction: token`` (:class:`TokenSum`, language models): each term is a sum over
  trained tokens divided by the valid-token count of the whole optimizer step (the
  ``normaliser`` the module passes in; this batch's count when none is given), so padding
  and gradient accumulation leave the loss unchanged. A per-sample term (a feature term
  giving the mean over each sequence's trained positions) is weighted back into the same
  token sum: sum_b n_b * loss_b / normaliser.

Weights are numbers or schedules ``w(epoch)`` (``distillery.recipes.schedules``), for
either reduction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from distillery.contract import IGNORE, UNLABELED, LossTerm, Outputs


def _check_shape(name: str, value: Tensor, want: tuple[int, ...], what: str) -> None:
    if tuple(value.shape) != want:
        raise RuntimeError(
            f"distill.terms.{name} must return one loss per {what} (shape {list(want)}), "
            f"got {tuple(value.shape)}"
        )


class SampleMean:
    """Per-sample terms, each averaged over the samples it applies to."""

    name = "sample"

    def __call__(self, terms: Mapping[str, LossTerm], out: Outputs, normaliser=None) -> dict:
        values: dict[str, Tensor] = {}
        labeled_out: Outputs | None = None  # built once, only if a label term asks for it
        for name, term in terms.items():
            if term.per != "sample":
                raise ValueError(
                    f"distill.terms.{name} gives per-{term.per} losses; set distill.reduction: "
                    f"{term.per} (language-model data)"
                )
            if term.needs_labels and labeled_out is None:
                labeled = out.labels != UNLABELED
                labeled_out = out if bool(labeled.all()) else out.subset(labeled)
            term_out = labeled_out if term.needs_labels else out
            n = term_out.student.shape[0]
            if n == 0:
                values[name] = out.student.new_zeros((), dtype=torch.float32)
                continue
            per_sample = term(term_out)
            _check_shape(name, per_sample, (n,), "sample")
            values[name] = per_sample.float().mean()
        return values


class TokenSum:
    """Token sums over the optimizer step's valid-token count (labels != IGNORE, or the
    task's ``extras["token_mask"]``); per-pair terms (``per = "pair"``, preference
    losses) are summed over pairs and divided by the step's pair count. ``normaliser``:
    the step's token count, or ``{"token": n, "pair": m}``; None: this batch's."""

    name = "token"

    def __call__(self, terms: Mapping[str, LossTerm], out: Outputs, normaliser=None) -> dict:
        trained = out.extras.get("token_mask")
        trained = out.labels != IGNORE if trained is None else trained
        units = normaliser if isinstance(normaliser, Mapping) else {"token": normaliser}
        n = units.get("token")
        n = trained.sum() if n is None else n
        n = n.clamp_min(1.0) if isinstance(n, Tensor) else max(float(n), 1.0)  # no 0/0
        values: dict[str, Tensor] = {}
        per_sequence_count = None
        for name, term in terms.items():
            value = term(out).float()
            if term.per == "token":
                _check_shape(name, value, tuple(out.labels.shape), "token")
                values[name] = value.sum() / n
            elif term.per == "pair":
                pairs = units.get("pair")
                pairs = value.numel() if pairs is None else pairs
                values[name] = value.sum() / (
                    pairs.clamp_min(1.0) if isinstance(pairs, Tensor) else max(float(pairs), 1.0)
                )
            else:  # the mean over each sequence's trained positions, back into a token sum
                _check_shape(name, value, tuple(out.labels.shape[:1]), "sequence")
                if per_sequence_count is None:
                    per_sequence_count = trained.sum(1)
                values[name] = (value * per_sequence_count).sum() / n
        return values


REDUCTIONS = {"sample": SampleMean, "token": TokenSum}


class Objective(nn.Module):
    """total = sum_i w_i * reduce(term_i).

    Args:
        terms: name -> LossTerm. Names become the logged metric names
            (``train/loss/<name>``).
        weights: name -> float weight, or a schedule ``w(epoch)`` (see
            ``distillery.recipes.schedules``: ConstantWeight, LinearWarmupWeight,
            CosineWeight). Terms without an entry get weight 1. A weight of 0 still
            computes and logs the term (handy for monitoring) but keeps it out of the
            gradient. A number must be finite and >= 0 (a negative weight would
            maximise a loss).
        reduction: ``sample`` or ``token`` (see the module docstring).
    """

    def __init__(
        self,
        terms: Mapping[str, LossTerm],
        weights: Mapping[str, Any] | None = None,
        reduction: str = "sample",
    ):
        super().__init__()
        if not terms:
            raise ValueError("distill.terms: the objective needs at least one loss term")
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"distill.reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}"
            )
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
                    f"distill.terms.{name}: expected a distillery.contract.LossTerm, "
                    f"got {type(term).__name__}"
                )
        self.terms = nn.ModuleDict(dict(terms))
        self.reduction = REDUCTIONS[reduction]()
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
                if not 0 <= w < float("inf"):
                    raise ValueError(
                        f"distill.weights.{name} must be >= 0 and finite (a negative weight "
                        f"maximises the term's loss), got {w}"
                    )
            self.weights[name] = w
        self.current_weights: dict[str, float] = {}

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for t in self.terms.values())

    @property
    def scheduled(self) -> list[str]:
        """Terms whose weight is a schedule (logged as ``train/weight/<name>``)."""
        return [n for n, w in self.weights.items() if callable(w)]

    def forward(self, out: Outputs, normaliser=None) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns (total loss, {term name: unweighted, reduced term value})."""
        for name, term in self.terms.items():
            if term.needs_teacher and out.teacher is None:
                raise RuntimeError(
                    f"distill.terms.{name} needs a teacher, but `teacher` is null in the config"
                )
        values = self.reduction(self.terms, out, normaliser)
        total = out.student.new_zeros((), dtype=torch.float32)
        for name, value in values.items():
            w = self.weights[name]
            w = float(w(out.epoch)) if callable(w) else w
            self.current_weights[name] = w
            total = total + w * value
        return total, values

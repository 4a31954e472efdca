"""Preference losses: one value per (chosen, rejected) pair of responses to a prompt.

Pair batches (``tasks/generative.py``: the student's samples ranked by the teacher)
hold the chosen responses in rows ``0..P-1`` and the rejected ones in rows ``P..2P-1``,
the response tokens in ``extras["response_labels"]`` (-100 elsewhere: prompts, padding;
``labels`` is all -100, so no cross-entropy fits either response). The objective's token
reduction sums per-pair losses over the optimizer step's pairs and divides by their
count (``per = "pair"``), so accumulation leaves the loss unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distillery.config import require
from distillery.contract import IGNORE, LossTerm, Outputs


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(z_t)[y_t] at every position whose label is not -100, 0 elsewhere:
    shape of ``labels``, float32."""
    logp = F.log_softmax(logits.float(), -1)
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return picked * (labels != IGNORE)


def sequence_logprob(logits: Tensor, labels: Tensor) -> Tensor:
    """log pi(y | x) = sum_t log softmax(z_t)[y_t] over the positions whose label is not
    -100: shape ``[B]``, float32."""
    return token_logprobs(logits, labels).sum(-1)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Per-pair DPO loss from sequence log-probabilities (Rafailov et al. 2023, eq. 7):
    with h = beta [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))],
    loss = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h)  (eps = ``label_smoothing``,
    the conservative DPO of Mitchell 2023; 0: the paper's loss)."""
    h = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


class DPO(LossTerm):
    """Direct preference optimisation against a frozen reference:
    :func:`dpo_loss` of each pair, the sequence log-probabilities summed over the response
    tokens (:func:`sequence_logprob`).

    ``reference``: the frozen model whose logits are the reference: a ``frozen`` model's
    name (default ``reference``, e.g. the student's starting checkpoint) or ``teacher``
    (only where the vocabularies match). Reference: Rafailov et al., "Direct Preference
    Optimization: Your Language Model is Secretly a Reward Model", NeurIPS 2023
    (github.com/eric-mitchell/direct-preference-optimization, ``preference_loss``).

    Valid: ``beta > 0``; ``0 <= label_smoothing < 0.5`` (at 0.5 the loss no longer
    prefers the chosen response); ``reference`` a non-empty name."""

    per = "pair"

    def __init__(
        self, beta: float = 0.1, reference: str = "reference", label_smoothing: float = 0.0
    ):
        super().__init__()
        require(beta > 0, "beta", "> 0", beta)
        require(0 <= label_smoothing < 0.5, "label_smoothing", "in [0, 0.5)", label_smoothing)
        require(bool(reference), "reference", "a frozen model's name or teacher", reference)
        self.beta, self.reference, self.label_smoothing = beta, reference, label_smoothing
        self.needs_teacher = reference == "teacher"

    def forward(self, out: Outputs) -> Tensor:
        labels = out.extras.get("response_labels")
        if labels is None or "pairs" not in out.extras:
            raise ValueError(
                "DPO needs preference pairs: set task.preference_samples >= 2 (the student's "
                "samples ranked by the teacher)"
            )
        if self.reference == "teacher":
            ref_logits = out.teacher
        else:
            frozen = out.extras.get("frozen", {})
            if self.reference not in frozen:
                raise ValueError(
                    f"DPO: no frozen model {self.reference!r} (frozen: {sorted(frozen)}); "
                    f"set frozen.{self.reference} or reference: teacher"
                )
            ref_logits = frozen[self.reference]
        p = int(out.extras["pairs"])
        policy = sequence_logprob(out.student, labels)
        ref = sequence_logprob(ref_logits, labels).detach()
        return dpo_loss(policy[:p], policy[p:], ref[:p], ref[p:], self.beta, self.label_smoothing)

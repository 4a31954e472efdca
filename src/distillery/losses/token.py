"""Token-level divergences between teacher and student next-token distributions.

With p = softmax(z_T / T) (teacher) and q = softmax(z_S / T) (student) at each valid
token position (all math in float32, whatever the logits' dtype):

* ``fkl``  forward KL:      KL(p || q) = sum_v p_v (log p_v - log q_v)
* ``rkl``  reverse KL:      KL(q || p)
* ``jsd``  generalized JSD (Agarwal et al. 2024, GKD), m = beta p + (1 - beta) q:
           beta KL(p || m) + (1 - beta) KL(q || m); beta = 0 is defined as KL(p || q) and
           beta = 1 as KL(q || p), the limits the GKD reference implementation uses
* ``skl``  skew KL (Ko et al. 2024, DistiLLM):          KL(p || alpha p + (1 - alpha) q)
* ``srkl`` skew reverse KL:                             KL(q || (1 - alpha) p + alpha q)
* ``tvd``  total variation: 0.5 sum_v |p_v - q_v|

Each per-token value is multiplied by T^2 (the gradient-scale convention of Hinton KD).
The loss is sum over valid tokens / ``num_tokens``: by default the valid tokens of this
batch; pass the valid-token count of the whole optimizer step to make gradient
accumulation and padding leave the loss unchanged. An all-masked batch gives 0.

``chunk_size`` computes the loss and its gradient chunk by chunk over tokens inside a
custom autograd function, so the float32 intermediates never exceed chunk x vocab; the
only full-size tensor kept is the gradient, in the logits' dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.losses.kd import kl_from_log_probs
from distillery.objective import UNLABELED, LossTerm, Outputs

KINDS = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")


def per_token(
    student: Tensor,
    teacher: Tensor,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """Divergence per row of ``[N, V]`` logits, float32, times T^2: shape [N]."""
    log_q = F.log_softmax(student.float() / temperature, -1)
    log_p = F.log_softmax(teacher.float() / temperature, -1)
    if kind == "fkl":
        d = kl_from_log_probs(log_p, log_q)
    elif kind == "rkl":
        d = kl_from_log_probs(log_q, log_p)
    elif kind == "jsd":
        if beta == 0:
            d = kl_from_log_probs(log_p, log_q)
        elif beta == 1:
            d = kl_from_log_probs(log_q, log_p)
        else:
            log_m = torch.logsumexp(
                torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), 0
            )
            d = beta * kl_from_log_probs(log_p, log_m) + (1 - beta) * kl_from_log_probs(
                log_q, log_m
            )
    elif kind == "skl":
        log_m = torch.logsumexp(
            torch.stack([log_p + math.log(alpha), log_q + math.log1p(-alpha)]), 0
        )
        d = kl_from_log_probs(log_p, log_m)
    elif kind == "srkl":
        log_m = torch.logsumexp(
            torch.stack([log_p + math.log1p(-alpha), log_q + math.log(alpha)]), 0
        )
        d = kl_from_log_probs(log_q, log_m)
    elif kind == "tvd":
        d = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return d * temperature**2


class _ChunkedDivergence(torch.autograd.Function):
    """Sum of per-token divergences over the masked rows of ``[N, V]`` views, computed
    chunk by chunk (masking inside each chunk, so no full-size copy is made)."""

    @staticmethod
    def forward(
        ctx, student: Tensor, teacher: Tensor, keep: Tensor, chunk: int, kwargs: dict
    ) -> Tensor:
        grad = torch.zeros_like(student)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for i in range(0, student.shape[0], chunk):
            rows = keep[i : i + chunk].nonzero().squeeze(1) + i
            if rows.numel() == 0:
                continue
            with torch.enable_grad():
                s = student[rows].detach().requires_grad_(True)
                loss = per_token(s, teacher[rows], **kwargs).sum()
                (g,) = torch.autograd.grad(loss, s)
            grad[rows] = g.to(grad.dtype)
            total += loss.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


def _count(num_tokens) -> Tensor | float:
    """The normaliser: a tensor as given (a step count reduced over ranks), else >= 1."""
    return num_tokens if isinstance(num_tokens, Tensor) else max(float(num_tokens), 1.0)


def token_divergence(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None = None,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    num_tokens: float | Tensor | None = None,
    chunk_size: int | None = None,
    vocab_align: str = "error",
) -> Tensor:
    """Masked token-level divergence of ``[..., V]`` logits (see the module docstring).

    ``vocab_align``: ``error`` (vocab sizes must match) or ``truncate`` (use the shared
    leading rows, e.g. a Qwen-style padded vocabulary tail)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0 <= beta <= 1 or not 0 < alpha < 1:
        raise ValueError(f"need 0 <= beta <= 1 and 0 < alpha < 1, got beta={beta}, alpha={alpha}")
    vs, vt = student.shape[-1], teacher.shape[-1]
    if vs != vt:
        if vocab_align != "truncate":
            raise ValueError(
                f"vocab sizes differ: student {vs}, teacher {vt}; check the tokenizers, "
                f"or set vocab_align: truncate to use the {min(vs, vt)} shared rows"
            )
        student, teacher = student[..., : min(vs, vt)], teacher[..., : min(vs, vt)]
    v = student.shape[-1]
    s, t = student.reshape(-1, v), teacher.reshape(-1, v).detach()  # views when contiguous
    keep = (
        torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
        if mask is None
        else mask.reshape(-1).bool()
    )
    count = int(keep.sum())
    n = num_tokens if num_tokens is not None else count
    if count == 0:
        return student.sum() * 0.0  # all masked: 0, with a graph
    kwargs = {"kind": kind, "temperature": temperature, "beta": beta, "alpha": alpha}
    if chunk_size:
        total = _ChunkedDivergence.apply(s, t, keep, int(chunk_size), kwargs)
    else:
        total = per_token(s[keep], t[keep], **kwargs).sum()
    return total / _count(n)


class TokenCrossEntropy(torch.nn.Module):
    """Next-token cross-entropy: sum over valid tokens of -log q(y_t) / num_tokens
    (labels of -100 are ignored). Float32."""

    needs_teacher = False

    def forward(
        self, student: Tensor, teacher: Tensor | None, labels: Tensor, num_tokens
    ) -> Tensor:
        ce = F.cross_entropy(
            student.float().flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        return ce / _count(num_tokens)


class TokenKD(torch.nn.Module):
    """Token-level distillation: :func:`token_divergence` over the positions whose label
    is not -100 (padding and masked prompts are left out), normalised by ``num_tokens``."""

    needs_teacher = True

    def __init__(
        self,
        kind: str = "fkl",
        temperature: float = 1.0,
        beta: float = 0.5,
        alpha: float = 0.1,
        chunk_size: int | None = None,
        vocab_align: str = "error",
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kwargs = {
            "kind": kind,
            "temperature": temperature,
            "beta": beta,
            "alpha": alpha,
            "chunk_size": chunk_size,
            "vocab_align": vocab_align,
        }

    def forward(
        self, student: Tensor, teacher: Tensor | None, labels: Tensor, num_tokens
    ) -> Tensor:
        if teacher is None:
            raise RuntimeError(
                "distill.terms: a TokenKD term needs a teacher, but `teacher` is null"
            )
        return token_divergence(
            student, teacher, labels != -100, num_tokens=num_tokens, **self.kwargs
        )


class TokenObjective(torch.nn.Module):
    """total = sum_i w_i * term_i, every term a token sum normalised by the optimizer
    step's valid-token count ``num_tokens``.

    Token terms (``TokenCrossEntropy``, ``TokenKD``) are called as
    ``term(student, teacher, labels, num_tokens)``. Feature terms
    (``distillery.losses.feature``: hidden states, attention maps, value relations, read
    from the taps' captures in ``extras``) give the mean over each sequence's trained
    positions (labels != -100, handed over as ``token_mask``); the objective turns
    them into the same token sum: sum_b n_b * loss_b / num_tokens."""

    def __init__(self, terms: dict, weights: dict | None = None):
        super().__init__()
        weights = dict(weights or {})
        unknown = set(weights) - set(terms)
        if unknown:
            raise ValueError(f"distill.weights: weights for unknown terms {sorted(unknown)}")
        self.terms = torch.nn.ModuleDict(dict(terms))
        self.weights = {k: float(weights.get(k, 1.0)) for k in terms}

    @property
    def needs_teacher(self) -> bool:
        return any(getattr(t, "needs_teacher", False) for t in self.terms.values())

    def forward(
        self,
        student: Tensor,
        teacher: Tensor | None,
        labels: Tensor,
        num_tokens,
        extras: dict | None = None,
    ):
        values, features = {}, None  # the feature terms' inputs, built once per forward
        for name, term in self.terms.items():
            if not isinstance(term, LossTerm):
                values[name] = term(student, teacher, labels, num_tokens)
                continue
            if not extras or "student_features" not in extras:
                raise RuntimeError(f"distill.terms.{name} reads taps, but nothing was captured")
            if features is None:
                mask = labels != -100
                unlabeled = torch.full(labels.shape[:1], UNLABELED, device=labels.device)
                features = Outputs(
                    student, unlabeled, teacher, extras={**extras, "token_mask": mask}
                )
                trained = mask.sum(1)  # positions each sequence's mean is over
            per_sequence = term(features).float()
            if per_sequence.shape != labels.shape[:1]:
                raise RuntimeError(
                    f"distill.terms.{name} must return one loss per sequence, "
                    f"got {tuple(per_sequence.shape)}"
                )
            values[name] = (per_sequence * trained).sum() / _count(num_tokens)
        total = sum(self.weights[n] * v for n, v in values.items())
        return total, values

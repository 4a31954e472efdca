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
The terms (``TokenCrossEntropy``, ``TokenKD``) return per-token losses ``[B, T]``, zero
at untrained positions (label -100: padding, prompts); the objective's token reduction
(``distillery.losses.objective.TokenSum``) divides their sum by the valid-token count of
the whole optimizer step, so gradient accumulation and padding leave the loss unchanged.
:func:`token_divergence` is the same loss as one function (sum / ``num_tokens``, by
default this batch's valid tokens). An all-masked batch gives 0.

``chunk_size`` computes the loss and its gradient chunk by chunk over tokens inside a
custom autograd function, so the float32 intermediates never exceed chunk x vocab; the
only full-size tensor kept is the gradient, in the logits' dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.config import require
from distillery.contract import IGNORE, LossTerm, Outputs
from distillery.losses.kd import kl_from_log_probs

KINDS = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")


def check_divergence(
    kind: str, temperature: float, beta: float, alpha: float, chunk_size: int | None = None
) -> None:
    """The divergence's arguments (:class:`~distillery.config.ArgumentError` naming the
    first one out of range): ``kind`` one of :data:`KINDS`; ``temperature > 0``;
    ``0 <= beta <= 1`` (the JSD's mixture weight, its limits KL(p||q) and KL(q||p));
    ``0 < alpha < 1`` (the skew of skl/srkl: log(alpha) and log(1 - alpha) must be
    finite); ``chunk_size`` null or a positive number of tokens. ``beta`` and ``alpha``
    are checked whatever ``kind`` reads them, so a sweep over kinds never meets a bad one
    late."""
    require(kind in KINDS, "kind", f"one of {KINDS}", kind)
    require(temperature > 0, "temperature", "> 0", temperature)
    require(0 <= beta <= 1, "beta", "in [0, 1]", beta)
    require(0 < alpha < 1, "alpha", "in (0, 1)", alpha)
    require(
        chunk_size is None or (not isinstance(chunk_size, bool) and chunk_size >= 1),
        "chunk_size",
        "a positive number of tokens or null",
        chunk_size,
    )


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
    """Per-row divergences over the masked rows of ``[N, V]`` views (0 elsewhere),
    computed chunk by chunk (masking inside each chunk, so no full-size copy is made)."""

    @staticmethod
    def forward(
        ctx, student: Tensor, teacher: Tensor, keep: Tensor, chunk: int, kwargs: dict
    ) -> Tensor:
        grad = torch.zeros_like(student)
        values = torch.zeros(student.shape[0], dtype=torch.float32, device=student.device)
        for i in range(0, student.shape[0], chunk):
            rows = keep[i : i + chunk].nonzero().squeeze(1) + i
            if rows.numel() == 0:
                continue
            with torch.enable_grad():
                s = student[rows].detach().requires_grad_(True)
                per_row = per_token(s, teacher[rows], **kwargs)
                (g,) = torch.autograd.grad(per_row.sum(), s)
            grad[rows] = g.to(grad.dtype)
            values[rows] = per_row.detach()
        ctx.save_for_backward(grad)
        return values

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype).unsqueeze(-1), None, None, None, None


def token_divergence_per_token(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None = None,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    chunk_size: int | None = None,
    vocab_align: str = "error",
) -> Tensor:
    """Divergence at every position of ``[..., V]`` logits, 0 where ``mask`` is 0:
    shape ``[...]``, float32 (see the module docstring).

    ``vocab_align``: ``error`` (vocab sizes must match) or ``truncate`` (use the shared
    leading rows, e.g. a Qwen-style padded vocabulary tail)."""
    check_divergence(kind, temperature, beta, alpha, chunk_size)
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
    kwargs = {"kind": kind, "temperature": temperature, "beta": beta, "alpha": alpha}
    if not keep.any():
        values = s.sum(-1).float() * 0.0  # all masked: zeros, with a graph
    elif chunk_size:
        values = _ChunkedDivergence.apply(s, t, keep, int(chunk_size), kwargs)
    else:
        values = torch.zeros(s.shape[0], dtype=torch.float32, device=s.device)
        values = values.masked_scatter(keep, per_token(s[keep], t[keep], **kwargs))
    return values.reshape(student.shape[:-1])


def token_divergence(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None = None,
    num_tokens: float | Tensor | None = None,
    **kwargs,
) -> Tensor:
    """Masked token-level divergence: the sum of :func:`token_divergence_per_token` over
    the valid positions / ``num_tokens`` (default: their count; at least 1)."""
    values = token_divergence_per_token(student, teacher, mask, **kwargs)
    if num_tokens is None:
        num_tokens = values.numel() if mask is None else int(mask.bool().sum())
    n = num_tokens if isinstance(num_tokens, Tensor) else max(float(num_tokens), 1.0)
    return values.sum() / n


class TokenCrossEntropy(LossTerm):
    """Next-token cross-entropy per token: -log q(y_t), 0 where the label is -100
    (padding, prompts). Float32. Reduced by ``distill.reduction: token``."""

    per = "token"

    def forward(self, out: Outputs) -> Tensor:
        ce = F.cross_entropy(
            out.student.float().flatten(0, -2),
            out.labels.flatten(),
            ignore_index=IGNORE,
            reduction="none",
        )
        return ce.reshape(out.labels.shape)


class TokenKD(LossTerm):
    """Token-level distillation: :func:`token_divergence_per_token` at the trained
    positions, 0 elsewhere: those whose label is not -100 (padding and masked prompts are
    left out), or ``extras["token_mask"]`` when the task sets it (on-policy batches: the
    positions of the student's own samples, which carry no label).

    Valid (:func:`check_divergence`): ``kind`` one of :data:`KINDS`, ``temperature > 0``,
    ``0 <= beta <= 1``, ``0 < alpha < 1``, ``chunk_size`` null or >= 1; ``vocab_align``
    ``error`` or ``truncate``."""

    needs_teacher = True
    per = "token"

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
        check_divergence(kind, temperature, beta, alpha, chunk_size)
        require(
            vocab_align in ("error", "truncate"), "vocab_align", "error or truncate", vocab_align
        )
        self.kwargs = {
            "kind": kind,
            "temperature": temperature,
            "beta": beta,
            "alpha": alpha,
            "chunk_size": chunk_size,
            "vocab_align": vocab_align,
        }

    def forward(self, out: Outputs) -> Tensor:
        mask = out.extras.get("token_mask")
        mask = out.labels != IGNORE if mask is None else mask
        return token_divergence_per_token(out.student, out.teacher, mask, **self.kwargs)

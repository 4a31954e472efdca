"""Token distillation fused with the output layer: never an ``N x V`` tensor.

At V = 128k the student's and the teacher's logits, their softmaxes and the gradient
are each ``N x V`` floats, and they, not the models, fill the memory of token KD. Here
the loss takes the last hidden states and the output layers (``lm_head``) of both
models and, chunk by chunk over the trained tokens, computes the logits, the per-token
loss

    l_i = kd_weight * D(p_i || q_i) + ce_weight * CE(q_i, y_i)

(``D`` any divergence of :mod:`distillery.losses.token` at temperature T, times T^2;
``p`` teacher, ``q`` student) and its gradient with respect to the student's hidden
state and output layer, then drops the chunk's logits. Kept between forward and
backward: ``dl_i/dh_i`` (``N x D``) and ``sum_i dl_i/dW`` (the head's size).

The backward is exact for any upstream gradient: the hidden-state part is scaled per
token; the head part was summed for a uniform upstream gradient over the trained tokens
(what the token reduction gives: weight / token count), and is recomputed chunk by chunk
(one more pass) when the upstream gradient is not uniform.

Liger-Kernel's fused linear JSD (Hsu et al. 2024, "Liger Kernel", arXiv:2410.10989;
``LigerFusedLinearJSD``) is the same idea as GPU kernels; this is plain PyTorch, for any
device. The values and gradients equal the dense path (``TokenKD`` + ``TokenCrossEntropy``
on the full logits) to float rounding (tested to 1e-5 in float32 for every kind).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.config import require
from distillery.contract import IGNORE, LossTerm, Outputs
from distillery.losses.token import check_divergence, per_token


class HeadOutputs:
    """What a fused run's model returns instead of logits: the last hidden states
    ``[B, ..., D]`` and the output layer (``lm_head``) that would map them to logits.
    Sized like the logits' batch (``len``, ``new_zeros``) where the module counts rows."""

    def __init__(self, hidden: Tensor, head: nn.Module):
        self.hidden, self.head = hidden, head

    def __len__(self) -> int:
        return len(self.hidden)

    def new_zeros(self, *args, **kwargs) -> Tensor:
        return self.hidden.new_zeros(*args, **kwargs)


def _chunk_losses(z: Tensor, ht, w_t, b_t, labels, weights, kwargs) -> Tensor:
    """Per-token loss of one chunk from the student's logits ``z`` (float32)."""
    ce_weight, kd_weight = weights
    values = torch.zeros(z.shape[0], dtype=torch.float32, device=z.device)
    if kd_weight:
        zt = F.linear(ht.to(w_t.dtype), w_t, b_t).float()
        values = values + kd_weight * per_token(z, zt, **kwargs)
    if ce_weight:
        values = values + ce_weight * F.cross_entropy(
            z, labels, ignore_index=IGNORE, reduction="none"
        )
    return values


def _accumulate(inputs, rows_all: Tensor, chunk: int, weights, kwargs, scale=None):
    """Values and gradients over ``rows_all`` chunk by chunk; ``scale``: per-row upstream
    gradient (None: 1). Returns (values [N], d l_i / d h_i [N, D], dW, db): autograd
    gives the chunk's d l / d logits, two matmuls take it to the hidden states and
    (accumulated in place, float32) to the head."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels = inputs
    values = torch.zeros(h_s.shape[0], dtype=torch.float32, device=h_s.device)
    grad_h = torch.zeros_like(h_s)
    grad_w = torch.zeros_like(w_s, dtype=torch.float32)
    grad_b = None if b_s is None else torch.zeros_like(b_s, dtype=torch.float32)
    for start in range(0, rows_all.numel(), chunk):
        rows = rows_all[start : start + chunk]
        hs = h_s[rows].detach().to(w_s.dtype)
        ht = h_t[rows] if h_t is not None else None
        with torch.enable_grad():
            z = F.linear(hs, w_s.detach(), None if b_s is None else b_s.detach())
            z = z.float().requires_grad_(True)
            v = _chunk_losses(z, ht, w_t, b_t, labels[rows], weights, kwargs)
            upstream = torch.ones_like(v) if scale is None else scale[rows].float()
            (dz,) = torch.autograd.grad(v, z, upstream)
        values[rows] = v.detach()
        grad_h[rows] = (dz.to(w_s.dtype) @ w_s.detach()).to(grad_h.dtype)
        grad_w.addmm_(dz.T, hs.float())
        if grad_b is not None:
            grad_b += dz.sum(0)
    return values, grad_h, grad_w, grad_b


class _FusedLinearTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, keep, chunk, weights, kwargs):
        rows_all = keep.nonzero().squeeze(1)
        inputs = (h_s, w_s, b_s, h_t, w_t, b_t, labels)
        with torch.autocast(h_s.device.type, enabled=False):
            values, grad_h, grad_w, grad_b = _accumulate(inputs, rows_all, chunk, weights, kwargs)
        ctx.save_for_backward(grad_h, grad_w, grad_b, rows_all, *inputs)
        ctx.chunk, ctx.weights, ctx.kwargs = chunk, weights, kwargs
        return values

    @staticmethod
    def backward(ctx, upstream: Tensor):
        grad_h, grad_w, grad_b, rows_all, *inputs = ctx.saved_tensors
        h_s, w_s, b_s = inputs[:3]
        scale = upstream.float()
        kept = scale[rows_all]
        if kept.numel() and bool((kept == kept[0]).all()):  # the token reduction's case
            c = kept[0]  # scaled in place: no second head-sized buffer
            dw = grad_w.mul_(c).to(w_s.dtype)
            db = None if grad_b is None else grad_b.mul_(c).to(b_s.dtype)
        else:  # a per-token upstream gradient: recompute the head's sum with it
            with torch.autocast(h_s.device.type, enabled=False):
                _, _, dw, db = _accumulate(
                    inputs, rows_all, ctx.chunk, ctx.weights, ctx.kwargs, scale=scale
                )
            dw, db = dw.to(w_s.dtype), None if db is None else db.to(b_s.dtype)
        dh = grad_h * scale.unsqueeze(-1).to(grad_h.dtype)
        return dh, dw, db, None, None, None, None, None, None, None, None


def check_arguments(
    kind: str,
    chunk_size,
    ce_weight: float,
    kd_weight: float,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> None:
    """:func:`~distillery.losses.token.check_divergence`, ``chunk_size >= 1`` (not null:
    the fused loss is always chunked), ``ce_weight >= 0`` and ``kd_weight >= 0``, not
    both 0 (:class:`~distillery.config.ArgumentError` naming the argument)."""
    check_divergence(kind, temperature, beta, alpha, chunk_size)
    require(chunk_size is not None, "chunk_size", "a positive number of tokens", chunk_size)
    require(ce_weight >= 0, "ce_weight", ">= 0", ce_weight)
    require(kd_weight >= 0, "kd_weight", ">= 0", kd_weight)
    require(ce_weight > 0 or kd_weight > 0, "kd_weight", "> 0 when ce_weight is 0", kd_weight)


def fused_token_loss_per_token(
    student: HeadOutputs,
    teacher: HeadOutputs | None,
    labels: Tensor,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    chunk_size: int = 128,
) -> Tensor:
    """``kd_weight * D(p || q) + ce_weight * CE`` at every position of ``labels``
    (``[...]``, -100 = not trained: 0 there), from hidden states ``[..., D]`` and output
    layers; float32, shape of ``labels``."""
    check_arguments(kind, chunk_size, ce_weight, kd_weight, temperature, beta, alpha)
    if kd_weight and teacher is None:
        raise ValueError("kd_weight > 0 needs the teacher's hidden states and output layer")
    w_s, b_s = student.head.weight, student.head.bias
    w_t = b_t = h_t = None
    if kd_weight:
        w_t, b_t = teacher.head.weight.detach(), teacher.head.bias
        if w_t.shape[0] != w_s.shape[0]:
            raise ValueError(
                f"vocab sizes differ: student head {w_s.shape[0]}, teacher head {w_t.shape[0]}"
            )
        h_t = teacher.hidden.detach().reshape(-1, teacher.hidden.shape[-1])
        b_t = None if b_t is None else b_t.detach()
    h_s = student.hidden.reshape(-1, student.hidden.shape[-1])
    flat = labels.reshape(-1)
    keep = flat != IGNORE
    kwargs = {"kind": kind, "temperature": temperature, "beta": beta, "alpha": alpha}
    if not keep.any():
        return (h_s.sum(-1) * 0.0).float().reshape(labels.shape)  # zeros, with a graph
    values = _FusedLinearTokenLoss.apply(
        h_s, w_s, b_s, h_t, w_t, b_t, flat, keep, int(chunk_size), (ce_weight, kd_weight), kwargs
    )
    return values.reshape(labels.shape)


class FusedTokenLoss(LossTerm):
    """Token KD and next-token CE fused with the output layers (module docstring): per
    token ``kd_weight * D(p || q) + ce_weight * CE``, 0 where the label is -100.

    Takes the place of a ``TokenKD`` (+ ``TokenCrossEntropy``) pair in runs with
    ``task.fused: true``, whose models return :class:`HeadOutputs`: objective weights
    ``{kd: a, ce: b}`` are this term with objective weight ``a``, ``kd_weight: 1``,
    ``ce_weight: b / a``. ``kd_weight: 0`` is next-token CE alone (no teacher needed).

    Valid (:func:`check_arguments`): ``kind`` one of ``token.KINDS``, ``temperature > 0``,
    ``0 <= beta <= 1``, ``0 < alpha < 1``, ``chunk_size >= 1``, ``ce_weight >= 0`` and
    ``kd_weight >= 0``, not both 0."""

    per = "token"

    def __init__(
        self,
        kind: str = "fkl",
        temperature: float = 1.0,
        beta: float = 0.5,
        alpha: float = 0.1,
        ce_weight: float = 0.0,
        kd_weight: float = 1.0,
        chunk_size: int = 128,
    ):
        super().__init__()
        check_arguments(kind, chunk_size, ce_weight, kd_weight, temperature, beta, alpha)
        self.needs_teacher = kd_weight > 0
        self.kwargs = {"kind": kind, "temperature": temperature, "beta": beta, "alpha": alpha,
                       "ce_weight": ce_weight, "kd_weight": kd_weight, "chunk_size": chunk_size}  # fmt: skip

    def forward(self, out: Outputs) -> Tensor:
        if not isinstance(out.student, HeadOutputs):
            raise ValueError(
                "FusedTokenLoss reads hidden states and output layers: set task.fused=true"
            )
        return fused_token_loss_per_token(out.student, out.teacher, out.labels, **self.kwargs)

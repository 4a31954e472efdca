"""Token distillation fused with the output layers (losses/fused.py): the same values
and gradients as the dense path, and the same training step in a run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import text_overrides
from distillery.losses.fused import HeadOutputs, fused_token_loss_per_token
from distillery.losses.token import KINDS, token_divergence_per_token
from distillery.train import build_run


def dense(hs, head_s, ht, head_t, labels, kind, temperature, ce_weight, kd_weight):
    zs, zt = head_s(hs), head_t(ht)
    kd = token_divergence_per_token(zs, zt, labels != -100, kind=kind, temperature=temperature)
    ce = F.cross_entropy(zs.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return kd_weight * kd + ce_weight * ce.view(labels.shape)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [False, True])
def test_fused_equals_dense_values_and_gradients(kind, bias):
    """float32, 2 x 9 positions with 6 masked (padding, a prompt), chunks of 4 (does not
    divide the 12 trained tokens' rows evenly with the mask): the loss, d/dhidden and
    d/dhead equal the dense path, for a uniform upstream gradient (the token reduction's)
    and for a per-token one (the recomputing backward)."""
    torch.manual_seed(0)
    b, t, d_s, d_t, v = 2, 9, 16, 24, 37
    hs = torch.randn(b, t, d_s, requires_grad=True)
    ht = torch.randn(b, t, d_t)
    head_s, head_t = nn.Linear(d_s, v, bias=bias), nn.Linear(d_t, v, bias=bias)
    labels = torch.randint(0, v, (b, t))
    labels[0, :4], labels[1, -2:] = -100, -100
    for upstream in (torch.full((b, t), 0.25), torch.rand(b, t)):
        grads = []
        for fn in ("fused", "dense"):
            for p in (hs, *head_s.parameters()):
                p.grad = None
            if fn == "fused":
                values = fused_token_loss_per_token(
                    HeadOutputs(hs, head_s), HeadOutputs(ht, head_t), labels, kind=kind,
                    temperature=2.0, ce_weight=0.3, kd_weight=0.7, chunk_size=4,
                )  # fmt: skip
            else:
                values = dense(hs, head_s, ht, head_t, labels, kind, 2.0, 0.3, 0.7)
            (values * upstream).sum().backward()
            grads.append([values.detach(), hs.grad, *(p.grad for p in head_s.parameters())])
        for fused, ref in zip(*grads, strict=True):
            torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
        assert grads[0][0][labels == -100].abs().max() == 0  # masked positions: 0


def test_fused_ce_alone_needs_no_teacher_and_all_masked_is_zero():
    torch.manual_seed(0)
    hs = torch.randn(3, 5, 8, requires_grad=True)
    head = nn.Linear(8, 11, bias=False)
    labels = torch.randint(0, 11, (3, 5))
    ce = fused_token_loss_per_token(
        HeadOutputs(hs, head), None, labels, ce_weight=1.0, kd_weight=0.0, chunk_size=2
    )
    ref = F.cross_entropy(head(hs).flatten(0, 1), labels.flatten(), reduction="none")
    torch.testing.assert_close(ce.flatten(), ref)
    masked = fused_token_loss_per_token(
        HeadOutputs(hs, head), None, torch.full((3, 5), -100), ce_weight=1.0, kd_weight=0.0
    )
    masked.sum().backward()
    assert masked.abs().sum() == 0 and hs.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="needs the teacher"):
        fused_token_loss_per_token(HeadOutputs(hs, head), None, labels)


def test_fused_run_takes_the_dense_runs_step(train_cfg, tokenizer_dir, data_dir, text_teacher_ckpt):
    """text_lm_kd for one step, dense (token_kd) vs fused (task.fused + token_kd_fused, the
    same 0.5 CE + forward KL): the same loss, and the same student weights after the
    optimizer step; the fused run's control trains too."""
    base = ["experiment=text_lm_kd", "debug=fdr", *text_overrides(tokenizer_dir, data_dir),
            f"teacher.ckpt_path={text_teacher_ckpt}", "seed=3"]  # fmt: skip
    fused = ["task=causal_lm", "task.fused=true", "distill=token_kd_fused"]
    runs = {}
    for name, extra in (("dense", []), ("fused", fused)):
        datamodule, module, trainer, _ = build_run(train_cfg(*base, *extra))
        trainer.fit(module, datamodule=datamodule)
        runs[name] = (float(trainer.callback_metrics["train/loss"]), module.student.state_dict())
    assert runs["fused"][0] == pytest.approx(runs["dense"][0], rel=1e-5)
    for key, weight in runs["dense"][1].items():
        torch.testing.assert_close(runs["fused"][1][key], weight, atol=1e-5, rtol=1e-5)
    datamodule, module, trainer, _ = build_run(train_cfg(*base, *fused, "control=true"))
    assert module.teacher is None and not module.objective.needs_teacher
    trainer.fit(module, datamodule=datamodule)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])

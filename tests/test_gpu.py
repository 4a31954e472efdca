"""GPU-only checks (marker `gpu`; skipped without CUDA)."""

import pytest
import torch

from conftest import SMALL_MNIST1D
from distillery.core.objective import Outputs
from distillery.losses import HintonKD
from distillery.train import train


@pytest.mark.gpu
def test_kd_is_float32_under_bf16_autocast():
    s = torch.randn(8, 100, device="cuda", requires_grad=True)
    t = torch.randn(8, 100, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = s @ torch.eye(100, device="cuda")  # bf16 under autocast
        assert logits.dtype == torch.bfloat16
        loss = HintonKD(4.0)(Outputs(logits, torch.zeros(8, dtype=torch.long, device="cuda"), t))
    assert loss.dtype == torch.float32
    ref = HintonKD(4.0)(Outputs(logits.float(), torch.zeros(8, dtype=torch.long, device="cuda"), t))
    torch.testing.assert_close(loss, ref)


@pytest.mark.gpu
def test_gpu_bf16_distillation_run(train_cfg, mnist1d_teacher_ckpt):
    cfg = train_cfg(
        "experiment=mnist1d_kd",
        "trainer=gpu",
        *SMALL_MNIST1D,
        "data.transfer_size=400",
        f"teacher.ckpt_path={mnist1d_teacher_ckpt}",
        "trainer.max_epochs=1",
    )
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert metrics["test/acc"] > 0.1

"""GPU-only checks (marker `gpu`; skipped without CUDA)."""

from pathlib import Path

import pytest
import torch

from conftest import SMALL_MNIST1D
from distillery.contract import Outputs
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


BF16_SUMMARY = "ignore:Precision bf16-mixed is not supported by the model summary:UserWarning"


@pytest.mark.gpu
@pytest.mark.filterwarnings(BF16_SUMMARY)  # Lightning's summary sizes bf16 at 32 bits
def test_gpu_bf16_distillation_run(train_cfg, mnist1d_teacher_ckpt, tmp_path):
    """trainer=gpu (bf16-mixed) against the same run in float32 on the CPU (same seed,
    data and order): the first step's loss within bf16's precision (8 units of roundoff,
    2^-8 each: autocast rounds the matmuls' inputs), and after 5 epochs an accuracy within
    5 points of the CPU run's (which reaches 0.23 here; chance is 0.10) and above chance."""
    import csv

    common = ["experiment=mnist1d_kd", *SMALL_MNIST1D, "data.transfer_size=400", "seed=0",
              f"teacher.ckpt_path={mnist1d_teacher_ckpt}", "trainer.max_epochs=5",
              "trainer.log_every_n_steps=1", "logger=csv"]  # fmt: skip
    runs, first = {}, {}
    for name in ("gpu", "cpu"):
        runs[name] = train(train_cfg(*common, f"trainer={name}", out=tmp_path / name))
        rows = next((tmp_path / name).rglob("metrics.csv")).read_text().splitlines()
        first[name] = next(
            float(r["train/loss"]) for r in csv.DictReader(rows) if r.get("train/loss")
        )
    assert torch.isfinite(torch.tensor(runs["gpu"]["train/loss"]))
    assert first["gpu"] == pytest.approx(first["cpu"], rel=8 * 2.0**-8)
    assert abs(runs["gpu"]["test/acc"] - runs["cpu"]["test/acc"]) <= 0.05
    assert runs["gpu"]["test/acc"] >= 0.15


@pytest.mark.gpu
@pytest.mark.filterwarnings(BF16_SUMMARY)
@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`:UserWarning")  # 1 GPU
@pytest.mark.filterwarnings(  # torch deprecates the FSDP1 API Lightning's FSDPStrategy saves with
    r"ignore:FSDP\.state_dict_type\(\) and FSDP\.set_state_dict_type\(\) are being deprecated"
)
@pytest.mark.parametrize("strategy", ["fsdp2", "fsdp", "deepspeed"])
def test_sharded_strategies_on_one_gpu(train_cfg, mnist1d_teacher_ckpt, strategy):
    """trainer=fsdp2 (bf16 parameters), fsdp (FSDP1, teacher in ignored_modules) and
    deepspeed (ZeRO-2; skipped without the package) on one GPU: a few steps train, and
    the checkpoint holds the student, never the teacher."""
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    cfg = train_cfg(
        "experiment=mnist1d_kd",
        f"trainer={strategy}",
        "trainer.devices=1",
        *SMALL_MNIST1D,
        "data.transfer_size=400",
        f"teacher.ckpt_path={mnist1d_teacher_ckpt}",
        "trainer.max_epochs=1",
    )
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    path = Path(metrics["best_ckpt"])
    if path.is_dir():  # a DeepSpeed checkpoint directory: consolidate it first
        from lightning.pytorch.utilities.deepspeed import (
            convert_zero_checkpoint_to_fp32_state_dict,
        )

        single = path.with_suffix(".fp32.ckpt")
        convert_zero_checkpoint_to_fp32_state_dict(path, single)
        path = single
    ckpt = torch.load(path, weights_only=False)
    assert not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]

"""trainer=fsdp2 (FSDP2 through Lightning's ModelParallelStrategy) with a frozen teacher,
on 2 CPU processes (gloo): the same steps as one process with the same global batch,
student-only checkpoints, resume."""

import csv
from pathlib import Path

import pytest
import torch

from conftest import SMALL_MNIST1D, compose_cfg, text_overrides

# one process with batch 2b equals two processes with b each, up to the order of float sums
TOL = 1e-5


def logged_losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").read_text().splitlines())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def student_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def single_process(tmp_path, data_dir, name, *overrides) -> Path:
    from distillery.train import train

    out = tmp_path / name
    train(compose_cfg("train", [*overrides, f"paths.output_dir={out}", f"paths.data_dir={data_dir}",
                                f"paths.artifacts_dir={tmp_path / 'artifacts'}", "extras.print_config=false"]))  # fmt: skip
    return out


FP32 = ["trainer.strategy.param_dtype=null"]  # fp32 all-gathers: the single process's steps


def fsdp2(tmp_path, data_dir, name, *overrides, policy=FP32) -> Path:
    from test_cli import common, run_cli

    out = tmp_path / name
    proc = run_cli("distillery.train", "trainer=fsdp2_sim", *policy, *overrides, f"hydra.run.dir={out}",
                   *common(tmp_path, data_dir))  # fmt: skip
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr
    return out


@pytest.mark.slow
def test_fsdp2_kd_takes_the_single_process_steps_and_resumes(
    tmp_path, data_dir, mnist1d_teacher_ckpt
):
    """mnist1d_fitnet (mnist1d_kd + a FitNet hint through a trained projector, sharded
    with the objective): 2 ranks x (64 labeled + 256 transfer) per step == 1 process x
    (128 + 512): the logged losses and the student after 6 steps, the last 3 of them
    resumed from the sharded run's last.ckpt. The checkpoint holds the student and the
    projector only, and the optimizer state covers exactly their parameters."""
    common = ["experiment=mnist1d_fitnet", *SMALL_MNIST1D, "data.transfer_size=1200", "seed=5", "test=false",
              "trainer.log_every_n_steps=1", f"teacher.ckpt_path={mnist1d_teacher_ckpt}"]  # fmt: skip
    single = single_process(tmp_path, data_dir, "single", *common, "+trainer.max_steps=6",
                            "data.batch_size=128", "data.transfer_batch_size=512")  # fmt: skip
    first = fsdp2(tmp_path, data_dir, "fsdp2", *common, "+trainer.max_steps=3")
    resumed = fsdp2(tmp_path, data_dir, "fsdp2_resumed", *common, "+trainer.max_steps=6",
                    f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}")  # fmt: skip

    want = logged_losses(single)
    got = {**logged_losses(first), **logged_losses(resumed)}
    assert sorted(got) == sorted(want) == list(range(6))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=TOL, abs=TOL), step
    ckpt, reference = student_state(resumed), student_state(single)
    assert ckpt["global_step"] == 6
    assert max_diff(ckpt["state_dict"], reference["state_dict"]) <= TOL
    assert not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]
    trainable = [
        v for k, v in ckpt["state_dict"].items() if k.startswith(("student.", "objective."))
    ]
    assert "objective.terms.hint.projector.linear.weight" in ckpt["state_dict"]
    (state,) = ckpt["optimizer_states"]
    assert len(state["state"]) == len(trainable)  # Adam moments of student + projector only
    sizes = sorted(s["exp_avg"].numel() for s in state["state"].values())
    assert sizes == sorted(p.numel() for p in trainable)


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["dense", "fused"])
def test_fsdp2_token_kd_takes_the_single_process_steps(
    tmp_path, data_dir, tokenizer_dir, text_teacher_ckpt, fused
):
    """text_lm_kd with GPT-2 blocks as FSDP2 units: 2 ranks x 4 sequences == 1 process x 8
    (step-normalised tokens, manual optimisation, clipping), for the dense token loss
    (teacher replicated) and the fused one (teacher sharded in its own units; the
    models run through hidden_and_head)."""
    no_dropout = [f"+student.config.{k}=0.0" for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")]
    common = ["experiment=text_lm_kd", *text_overrides(tokenizer_dir, data_dir), *no_dropout, "seed=2",
              "test=false", "trainer.log_every_n_steps=1", "+trainer.max_steps=3", "trainer.max_epochs=1",
              f"teacher.ckpt_path={text_teacher_ckpt}", "+trainer.limit_val_batches=1"]  # fmt: skip
    if fused:
        common += ["task=causal_lm", "task.fused=true", "distill=token_kd_fused"]
    single = single_process(tmp_path, data_dir, "single", *common, "data.batch_size=8")
    teacher = "shard" if fused else "replicate"  # both placements of the frozen teacher
    sharded = fsdp2(tmp_path, data_dir, "fsdp2", *common, "data.batch_size=4",
                    f"trainer.strategy.teacher={teacher}")  # fmt: skip
    want, got = logged_losses(single), logged_losses(sharded)
    assert sorted(got) == sorted(want) == [0, 1, 2]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=TOL, abs=TOL), step
    ckpt = student_state(sharded)
    assert max_diff(ckpt["state_dict"], student_state(single)["state_dict"]) <= TOL
    assert not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]


@pytest.mark.slow
def test_fsdp2_shipped_mixed_precision_policy(tmp_path, data_dir, mnist1d_teacher_ckpt):
    """trainer=fsdp2's policy as shipped (bf16 all-gathered student parameters, fp32
    gradient reduction) on 2 CPU processes with a frozen teacher: the student computes in
    bf16 (its first loss moves off the fp32 run's, by no more than bf16's precision), keeps
    fp32 master weights (the checkpoint), and its 3 steps stay within bf16's precision of
    the single fp32 process's."""
    from omegaconf import OmegaConf

    shipped = OmegaConf.load(Path(__file__).parents[1] / "conf" / "trainer" / "fsdp2.yaml")
    assert (shipped.strategy.param_dtype, shipped.strategy.reduce_dtype) == ("bf16", "fp32")
    common = ["experiment=mnist1d_kd", *SMALL_MNIST1D, "data.transfer_size=1200", "seed=5", "test=false",
              "trainer.log_every_n_steps=1", f"teacher.ckpt_path={mnist1d_teacher_ckpt}"]  # fmt: skip
    single = single_process(tmp_path, data_dir, "single", *common, "+trainer.max_steps=3",
                            "data.batch_size=128", "data.transfer_batch_size=512")  # fmt: skip
    mixed = fsdp2(tmp_path, data_dir, "mixed", *common, "+trainer.max_steps=3", policy=[])
    want, got = logged_losses(single), logged_losses(mixed)
    assert sorted(got) == sorted(want) == [0, 1, 2]
    u = 2.0**-8  # bf16's unit roundoff
    assert abs(got[0] - want[0]) > TOL  # the student's forward really ran in bf16
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=4 * u), step
    state, reference = student_state(mixed)["state_dict"], student_state(single)["state_dict"]
    assert {v.dtype for v in state.values()} == {torch.float32}  # fp32 master weights
    assert max_diff(state, reference) <= 4 * u


def test_fsdp2_plan_names_its_keys(train_cfg, mnist1d_teacher_ckpt):
    from distillery.config import ConfigError
    from distillery.engine.builder import build_run
    from distillery.engine.sharding import units
    from distillery.models.hf import HFCausalLM

    with pytest.raises(ConfigError, match="trainer.strategy.teacher"):
        build_run(
            train_cfg(
                "experiment=mnist1d_baseline", "trainer=fsdp2_sim", "trainer.strategy.teacher=half"
            )
        )
    with pytest.raises(ConfigError, match="save_distributed_checkpoint"):
        build_run(train_cfg("experiment=mnist1d_baseline", "trainer=fsdp2_sim",
                            "+trainer.strategy.save_distributed_checkpoint=true"))  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"trainer.strategy.student_units: \['Block'\] match no module"
    ):
        build_run(
            train_cfg(
                "experiment=mnist1d_baseline",
                "trainer=fsdp2_sim",
                "trainer.strategy.student_units=[Block]",
            )
        )
    with pytest.raises(ConfigError, match="trainer.strategy.teacher_units"):
        build_run(train_cfg("experiment=mnist1d_kd", "trainer=fsdp2_sim", f"teacher.ckpt_path={mnist1d_teacher_ckpt}",
                            "trainer.strategy.teacher_units=[BertLayer]"))  # fmt: skip
    with pytest.raises(ConfigError, match="seed: null with several processes"):
        build_run(train_cfg("experiment=mnist1d_baseline", "trainer=fsdp2_sim", "seed=null"))
    gpt = HFCausalLM(
        config={"model_type": "gpt2", "vocab_size": 50, "n_embd": 8, "n_layer": 2, "n_head": 2}
    )
    assert [type(m).__name__ for m in units(gpt, None, "k")] == ["GPT2Block", "GPT2Block"]
    assert len(units(gpt, ["model.transformer.h.*"], "k")) == 2
    with pytest.raises(ValueError, match=r"k: \['Block'\] match no module"):
        units(gpt, ["Block"], "k")


class Frozen(torch.nn.Module):
    """The part of a DistillationModule the sharding plan reads: named frozen models."""

    frozen_names = ["teacher"]

    def __init__(self, width: int):
        super().__init__()
        self.teacher = torch.nn.Linear(width, width)


def test_replicated_teacher_must_fit_and_fsdp1_keeps_it_out_of_flat_parameters(monkeypatch):
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    import distillery.engine.sharding as sharding
    from distillery.config import ConfigError

    module = Frozen(64)  # 64 x 65 float32 = 16.6 kB
    monkeypatch.setattr(sharding, "free_memory", lambda device: 40_000)
    with pytest.raises(ConfigError, match=r"trainer.strategy.teacher: .*full copy.*shard them"):
        sharding.check_replicate(module, torch.device("cpu"), 2, "trainer.strategy.teacher")
    sharding.check_replicate(module, torch.device("cpu"), 1, "trainer.strategy.teacher")  # fits

    fsdp1 = FSDPStrategy(parallel_devices=[torch.device("cpu")])
    sharding.configure_sharding(module, fsdp1)  # Lightning wraps the root after this hook
    assert fsdp1.kwargs["ignored_modules"] == [module.teacher]
    with pytest.raises(ConfigError, match="use distillery.engine.sharding.FSDP2Strategy"):
        sharding.configure_sharding(module, ModelParallelStrategy())

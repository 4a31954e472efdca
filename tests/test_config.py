"""Config errors are reported all together, before anything is loaded."""

import subprocess
import sys

import pytest
import torch

import distillery.train as train_module
from distillery.config import ConfigError, validate
from distillery.evaluate import rebuild_teacher


def test_all_problems_reported_together_before_loading(train_cfg, monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("nothing may be built from an invalid config")

    import distillery.engine.builder

    monkeypatch.setattr(distillery.engine.builder, "build", no_build)
    cfg = train_cfg(
        "experiment=mnist1d_kd",  # teacher.ckpt_path interpolates a real path...
        "teacher.ckpt_path=???",  # ...made missing here
        "data.batch_size=abc",
        "trainer.max_epochs=ten",
        "+student.hiddn=[3]",
        "optimizer.lr=???",
    )
    with pytest.raises(ConfigError) as err:
        train_module.train(cfg)
    msg = str(err.value)
    for needle in (
        "teacher.ckpt_path: missing value",
        "optimizer.lr: missing value",
        "data.batch_size: expected int, got str 'abc'",
        "trainer.max_epochs: expected",
        "student.hiddn: unexpected argument",
    ):
        assert needle in msg, (needle, msg)


def test_top_level_types_and_interpolations(train_cfg):
    cfg = train_cfg("seed=abc", "+extra=${nope.missing}", "experiment=mnist1d_baseline")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "seed: expected" in str(err.value) and "extra:" in str(err.value)


def test_valid_experiment_configs_pass(train_cfg, tmp_path):
    validate(train_cfg("experiment=mnist1d_baseline"))
    validate(train_cfg("experiment=mnist1d_kd", f"teacher.ckpt_path={tmp_path}/t.ckpt"))


def test_unknown_target_is_reported(train_cfg):
    cfg = train_cfg("experiment=mnist1d_baseline", "student._target_=distillery.models.NoSuchNet")
    with pytest.raises(ConfigError, match=r"student._target_: cannot import"):
        validate(cfg)


def test_run_dirs_do_not_collide_across_processes():
    """Two jobs started in the same second get different run ids (pid + random)."""
    code = "from omegaconf import OmegaConf; import distillery.config.resolvers; print(OmegaConf.create({'a': '${run_id:}'}).a)"
    ids = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(3)
    }
    assert len(ids) == 3 and all(ids)


def test_logged_ece_is_guos_formula():
    """ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)| over 15 equal-width confidence bins
    (Guo et al. 2017), written out here as the reference for the metric the runs log."""
    from distillery.evaluation.metrics import ClassificationMetrics

    torch.manual_seed(0)
    logits, labels = torch.randn(500, 10) * 3, torch.randint(0, 10, (500,))
    conf, pred = logits.softmax(-1).max(-1)
    correct = (pred == labels).double()
    bins = torch.clamp(torch.ceil(conf * 15) - 1, 0, 14).long()
    want = sum(
        (bins == b).double().mean()
        * (correct[bins == b].mean() - conf[bins == b].double().mean()).abs()
        for b in range(15)
        if (bins == b).any()
    )
    metrics = ClassificationMetrics(10, with_teacher=False)
    metrics.update(logits[:200], labels[:200], None)  # accumulated over batches
    metrics.update(logits[200:], labels[200:], None)
    assert float(metrics.ece.compute()) == pytest.approx(float(want), abs=1e-6)


def test_evaluate_refuses_a_teacher_whose_weights_changed(mnist1d_teacher_ckpt, tmp_path):
    import shutil

    from distillery.engine.checkpoint import META_KEY

    copy = tmp_path / "teacher.ckpt"
    shutil.copy(mnist1d_teacher_ckpt, copy)
    from distillery.engine.teacher import from_run_checkpoint

    teacher = from_run_checkpoint(str(copy))
    provenance = {
        **teacher.provenance,
        "config": {
            "_target_": "distillery.engine.teacher.from_run_checkpoint",
            "ckpt_path": str(copy),
        },
    }
    ckpt = {META_KEY: {"teacher": provenance}}
    assert rebuild_teacher(ckpt) is not None
    state = torch.load(copy, weights_only=True)
    state["state_dict"]["student.head.bias"] += 1.0
    torch.save(state, copy)
    with pytest.raises(ValueError, match="weights hash"):
        rebuild_teacher(ckpt)


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "ddp_sim", "fsdp", "deepspeed"])
@pytest.mark.parametrize("logger", ["csv", "wandb", "tensorboard", "many"])
def test_trainer_and_logger_groups_compose_and_validate(train_cfg, trainer, logger):
    validate(train_cfg("experiment=mnist1d_baseline", f"trainer={trainer}", f"logger={logger}"))

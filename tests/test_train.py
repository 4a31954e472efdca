"""End-to-end training runs in-process: teacher invariants, every experiment under
debug=fdr, resume, W&B offline, bad input, and the `make distill` pipeline."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from conftest import SMALL_MNIST1D
from distillery.config import ConfigError
from distillery.engine.checkpoint import META_KEY, load_student, read_checkpoint
from distillery.engine.module import DistillationModule
from distillery.train import build_run, train

# Text experiments run under debug=fdr in test_text.py (they need a tokenizer fixture);
# qwen_kd needs hub weights and is composed and validated there instead.
EXPERIMENTS = sorted(
    p.stem
    for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml")
    # text_* and arith_* have their own fast_dev_run tests (test_text.py, test_generative.py)
    if not p.stem.startswith(("text_", "arith_")) and p.stem != "qwen_kd"
)
LIMIT = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=4",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
]


def kd_cfg(train_cfg, ckpt, *extra):
    return train_cfg(
        "experiment=mnist1d_kd",
        *SMALL_MNIST1D,
        "data.transfer_size=400",
        f"teacher.ckpt_path={ckpt}",
        *extra,
    )


def test_teacher_invariants_after_real_training(train_cfg, mnist1d_teacher_ckpt, tmp_path):
    cfg = kd_cfg(train_cfg, mnist1d_teacher_ckpt, *LIMIT)
    datamodule, module, trainer, _ = build_run(cfg)
    teacher = module.teacher
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in teacher.modules())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}

    trainer.fit(module, datamodule=datamodule)

    after = teacher.state_dict()
    assert before.keys() == after.keys()
    for k in before:  # parameters and BatchNorm buffers, byte for byte
        assert torch.equal(before[k], after[k]), k
    teacher_ids = {id(p) for p in teacher.parameters()}
    opt_ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_ids and not (opt_ids & teacher_ids)
    assert opt_ids == {id(p) for p in module.student.parameters()}
    assert not teacher.training and not any(m.training for m in teacher.modules())
    trainer.validate(module, datamodule=datamodule)
    assert not teacher.training and not any(m.training for m in teacher.modules())

    ckpt_path = Path(trainer.checkpoint_callback.last_model_path)
    ckpt = read_checkpoint(ckpt_path)
    assert not [k for k in ckpt["state_dict"] if k.startswith("teacher")]
    assert any(k.startswith("student.") for k in ckpt["state_dict"])
    meta = ckpt[META_KEY]
    assert meta["teacher"]["sha256"] == teacher.provenance["sha256"]
    assert meta["teacher"]["config"]["ckpt_path"] == str(mnist1d_teacher_ckpt)
    assert meta["config"]["student"]["_target_"] == "distillery.models.MLP"
    assert meta["params"]["teacher"] > meta["params"]["student"] > 0

    # The student loads without the teacher, alone or inside a teacher-less module.
    x = datamodule.test_set.inputs[:8]
    student = load_student(ckpt_path)
    module.eval()
    torch.testing.assert_close(student(x), module(x))


def test_student_checkpoint_loads_strictly_with_and_without_teacher(
    train_cfg, mnist1d_teacher_ckpt
):
    cfg = kd_cfg(train_cfg, mnist1d_teacher_ckpt, *LIMIT)
    datamodule, module, trainer, _ = build_run(cfg)
    trainer.fit(module, datamodule=datamodule)
    state = read_checkpoint(trainer.checkpoint_callback.last_model_path)["state_dict"]
    module.load_state_dict(state)  # strict, teacher refilled from the live teacher
    from distillery.losses import CrossEntropy
    from distillery.losses.objective import Objective
    from distillery.models import MLP

    bare = DistillationModule(
        MLP(),
        Objective({"task": CrossEntropy(), "kd": CrossEntropy()}),
        optimizer=torch.optim.SGD,
        num_classes=10,
    )
    bare.load_state_dict(state)  # strict, no teacher at all
    with pytest.raises(ValueError, match="teacher weights"):
        bare.load_state_dict({**state, "teacher.model.0.mean": torch.zeros(1)})


def check_control(cfg, unlabeled: bool = False) -> None:
    """A control run builds no teacher, frozen model, tap or teacher-only term, and runs.
    ``unlabeled``: the data has no labels (sentence embeddings): refused, naming why."""
    if unlabeled:
        with pytest.raises(ConfigError, match="control: every term of distill.terms"):
            build_run(cfg)
        return
    datamodule, module, trainer, _ = build_run(cfg)
    assert module.teacher is None and module.frozen_names == []
    assert module.student_taps is None and module.teacher_taps is None
    assert module.objective.terms and not module.objective.needs_teacher
    assert module.run_config["teacher"] is None and module.run_config["control"] is True
    assert set(module.run_config["distill"]["terms"]) == set(module.objective.terms)
    trainer.fit(module, datamodule=datamodule)
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/loss"])))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_debug_fdr_runs_every_experiment(
    name,
    train_cfg,
    mnist1d_teacher_ckpt,
    digits_teacher_ckpt,
    bert_teacher_ckpt,
    tmp_path,
    monkeypatch,
):
    extra = {
        "mnist1d_teacher": SMALL_MNIST1D,
        "mnist1d_baseline": SMALL_MNIST1D,
        "mnist1d_kd": [
            *SMALL_MNIST1D,
            "data.transfer_size=300",
            f"teacher.ckpt_path={mnist1d_teacher_ckpt}",
        ],
        "mnist1d_dkd": [
            *SMALL_MNIST1D,
            "data.transfer_size=300",
            f"teacher.ckpt_path={mnist1d_teacher_ckpt}",
        ],
        "digits_kd": [f"teacher.ckpt_path={digits_teacher_ckpt}"],
        "digits_fm": [f"teacher.ckpt_path={digits_teacher_ckpt}"],
        "bert_hidden_attention": [f"teacher.ckpt_path={bert_teacher_ckpt}"],
        "mnist1d_fitnet": [
            *SMALL_MNIST1D,
            "data.transfer_size=300",
            f"teacher.ckpt_path={mnist1d_teacher_ckpt}",
        ],
        "mnist1d_fm": [
            "data.base.num_samples=1000",
            "data.base.val_size=200",
            "data.sources.generated.size=300",
            f"teacher.ckpt_path={mnist1d_teacher_ckpt}",
        ],
    }.get(name, [])
    if name == "vit_attention":
        import timm

        from test_data import make_image_folder

        make_image_folder(tmp_path / "imgs", classes=3, per_class=2, size=32)
        teacher = timm.create_model(
            "vit_small_patch16_224", num_classes=3, img_size=32, patch_size=4, depth=2
        )
        torch.save(teacher.state_dict(), tmp_path / "vit_s.pth")
        extra = ["data=imagefolder", f"data.root={tmp_path / 'imgs'}", "data.num_classes=3", "data.image_size=32",
                 "data.num_workers=0", "data.batch_size=4", "trainer.accelerator=cpu", "trainer.precision=32-true",
                 f"teacher.checkpoint_path={tmp_path / 'vit_s.pth'}", "teacher.model_kwargs.depth=2",
                 "student.depth=2", "taps.student.attn.path=blocks.1.attn", "taps.teacher.attn.path=blocks.1.attn"]  # fmt: skip
    if name.startswith("cifar100"):
        # The real CIFAR-100 files cannot be downloaded here: same experiment, a tiny
        # 100-class image folder in CIFAR's format, and a RepDistiller-style teacher file.
        from distillery.models import resnet32x4
        from test_data import make_image_folder

        make_image_folder(tmp_path / "imgs", classes=100, per_class=1, size=32)
        torch.save({"model": resnet32x4(num_classes=100).state_dict()}, tmp_path / "resnet32x4.pth")
        extra = [
            "data=imagefolder",
            f"data.root={tmp_path / 'imgs'}",
            "data.num_classes=100",
            "data.image_size=32",
            "data.num_workers=0",
            "data.batch_size=4",
            "trainer.accelerator=cpu",
            "trainer.precision=32-true",
            f"teacher.path={tmp_path / 'resnet32x4.pth'}",
        ]
    cfg = train_cfg(f"experiment={name}", "debug=fdr", *extra)
    import distillery.train as train_module

    built = []  # the run train() builds, to check its test metric against
    monkeypatch.setattr(
        train_module, "build_run", lambda c: built.append(build_run(c)) or built[-1]
    )
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    if cfg.teacher is not None:  # and its no-teacher control: one override
        control = train_cfg(f"experiment={name}", "debug=fdr", "control=true", *extra)
        check_control(control, unlabeled=name.startswith("minilm"))
    if name.startswith("minilm_embed_kd"):  # embeddings: compared with the teacher's
        # recomputed on the one test batch: mean cosine to the teacher's embedding, and the
        # share of sentences whose nearest other sentence is the same in both spaces
        datamodule, module = built[0][:2]
        x = next(iter(datamodule.test_dataloader()))["inputs"]
        module.eval()
        with torch.no_grad():
            s, t = module.student(module.student_norm(x)), module.teacher(x)
        cos = torch.nn.functional.cosine_similarity(s, t, dim=-1).mean()
        assert metrics["test/cosine"] == pytest.approx(float(cos), abs=1e-5)

        def nearest(e):
            e = torch.nn.functional.normalize(e, dim=-1)
            return (e @ e.T).fill_diagonal_(-2).argmax(-1)

        same = (nearest(s) == nearest(t)).float().mean()
        assert metrics["test/nn_agreement"] == pytest.approx(float(same), abs=1e-6)
        if name == "minilm_embed_kd_relations":
            assert metrics["train/loss/attn"] > 0 and metrics["train/loss/value"] > 0
    else:  # test/acc is the student's accuracy on the one test batch, recomputed here
        datamodule, module = built[0][:2]
        batch = next(iter(datamodule.test_dataloader()))
        module.eval()
        with torch.no_grad():
            logits = module.student(module.student_norm(batch["inputs"]))
        correct = (logits.argmax(-1) == batch["labels"]).float()
        assert metrics["test/acc"] == pytest.approx(float(correct.mean()), abs=1e-6)


def test_resume_from_last_ckpt(train_cfg, tmp_path):
    first = train_cfg(
        "experiment=mnist1d_baseline", *SMALL_MNIST1D, "trainer.max_epochs=1", out=tmp_path / "a"
    )
    train(first)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    steps_one_epoch = read_checkpoint(last)["global_step"]
    assert steps_one_epoch > 0
    second = train_cfg(
        "experiment=mnist1d_baseline",
        *SMALL_MNIST1D,
        "trainer.max_epochs=2",
        f"ckpt_path={last}",
        out=tmp_path / "b",
    )
    train(second)
    resumed = read_checkpoint(tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert resumed["epoch"] == 1 and resumed["global_step"] == 2 * steps_one_epoch
    # The resolved config is stored in the checkpoint.
    assert resumed[META_KEY]["config"]["trainer"]["max_epochs"] == 2


def test_wandb_offline_run_writes_its_files(train_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = train_cfg("experiment=mnist1d_baseline", *SMALL_MNIST1D, *LIMIT, "logger=wandb")
    train(cfg)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))
    import wandb

    assert wandb.run is None  # finished, so the next multirun job gets its own run


def test_hyperparameters_include_param_counts(train_cfg, mnist1d_teacher_ckpt, tmp_path):
    cfg = kd_cfg(train_cfg, mnist1d_teacher_ckpt, *LIMIT)
    train(cfg)
    hparams = (tmp_path / "run" / "csv" / "version_0" / "hparams.yaml").read_text()
    assert "params/student: 15210" in hparams and "params/compression:" in hparams


def test_bad_teacher_path_names_the_key_and_writes_nothing(train_cfg, tmp_path):
    cfg = kd_cfg(train_cfg, tmp_path / "nope.ckpt")
    with pytest.raises(ConfigError, match="teacher.*ckpt_path"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_model_name_names_the_key(train_cfg):
    cfg = train_cfg("experiment=mnist1d_baseline", "student=timm", "student.model_name=no_such_net")
    with pytest.raises(ConfigError, match="student"):
        train(cfg)


def test_teacher_student_shape_mismatch_is_reported(train_cfg, mnist1d_teacher_ckpt):
    cfg = kd_cfg(train_cfg, mnist1d_teacher_ckpt, "student.num_classes=7")
    with pytest.raises(ConfigError, match=r"student: outputs shape \(7,\)"):
        build_run(cfg)
    cfg = kd_cfg(train_cfg, mnist1d_teacher_ckpt, "student.input_dim=64")
    with pytest.raises(ConfigError, match="student: forward on an input of shape"):
        build_run(cfg)


def test_failed_checkpoint_write_leaves_no_partial_file(tmp_path, monkeypatch):
    from distillery.engine.checkpoint import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"a": torch.zeros(3)}, target)
    good = target.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"a": torch.ones(3)}, target)
    assert target.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_crash_while_writing_leaves_the_previous_last_ckpt_loadable(
    train_cfg, tmp_path, monkeypatch
):
    """A real run, then a resumed one whose checkpoint write dies half-way: last.ckpt is
    still the first run's, complete and loadable."""
    first = train_cfg(
        "experiment=mnist1d_baseline", *SMALL_MNIST1D, "trainer.max_epochs=1", "test=false"
    )
    train(first)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    before = read_checkpoint(last)["global_step"]
    real_save = torch.save

    def dies_half_way(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(100)  # half a file on disk, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    again = train_cfg("experiment=mnist1d_baseline", *SMALL_MNIST1D, "trainer.max_epochs=2", "test=false",
                      f"ckpt_path={last}")  # fmt: skip
    with pytest.raises(OSError, match="disk full"):
        train(again)
    monkeypatch.setattr(torch, "save", real_save)
    assert read_checkpoint(last)["global_step"] == before  # intact and loadable
    assert not list(last.parent.glob(".*.tmp"))


def test_overfit_debug_drives_the_loss_down(train_cfg):
    cfg = train_cfg(
        "experiment=mnist1d_baseline",
        *SMALL_MNIST1D,
        "debug=overfit",
        "trainer.max_epochs=150",
        "optimizer.lr=0.01",
        "scheduler=null",
        "callbacks=none",
        "test=false",
    )
    with open_dict(cfg):
        cfg.trainer.overfit_batches = 1
    datamodule, module, trainer, _ = build_run(cfg)
    trainer.fit(module, datamodule=datamodule)
    assert float(trainer.callback_metrics["train/loss"]) < 0.3


def test_make_distill_pipeline_on_a_shrunken_config(tmp_path, data_dir):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from distillery.config.resolvers import CONFIG_DIR
    from distillery.pipeline import run_pipeline

    def hydra_list(items):
        return "[" + ",".join(f"'{o}'" for o in items) + "]"

    small = [*SMALL_MNIST1D, "trainer.max_epochs=2"]
    # The default stages (function-matching student), each shrunk, plus an extra student.
    fm = [
        "experiment=mnist1d_fm",
        "data.base.num_samples=1000",
        "data.base.val_size=200",
        "data.sources.generated.size=500",
        "trainer.max_steps=20",
        "scheduler.warmup_steps=2",
        "trainer.val_check_interval=10",
    ]
    teacher_ckpt = tmp_path / "artifacts" / "teacher.ckpt"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        overrides = [
            f"teacher_ckpt={teacher_ckpt}",
            f"paths.output_dir={tmp_path / 'out'}",
            f"overrides=['paths.data_dir={data_dir}']",
            f"stages.teacher={hydra_list(['experiment=mnist1d_teacher', *small])}",
            f"stages.student={hydra_list(fm)}",
            "~extra_students.kd_transfer",
            f"+extra_students.kd={hydra_list(['experiment=mnist1d_kd', *small, 'data.transfer_size=300'])}",
        ]
        cfg = compose(config_name="pipeline", overrides=overrides)
        report = run_pipeline(cfg)
        assert teacher_ckpt.is_file()
        stamp = teacher_ckpt.stat().st_mtime_ns
        cfg2 = compose(
            config_name="pipeline",
            overrides=[*overrides[:1], f"paths.output_dir={tmp_path / 'out2'}", *overrides[2:]],
        )
        run_pipeline(cfg2)
        assert teacher_ckpt.stat().st_mtime_ns == stamp  # reused, not retrained
        assert not (tmp_path / "out2" / "teacher").exists()
        # an artifact from another teacher configuration is not reused, and not lost
        teacher3 = hydra_list(["experiment=mnist1d_teacher", *small, "optimizer.lr=0.002"])
        cfg3 = compose(config_name="pipeline", overrides=[
            *overrides[:1], f"paths.output_dir={tmp_path / 'out3'}", *overrides[2:],
            f"stages.teacher={teacher3}", "~extra_students",
        ])  # fmt: skip
        run_pipeline(cfg3)
        assert (tmp_path / "out3" / "teacher").is_dir() and teacher_ckpt.stat().st_mtime_ns != stamp
        kept = [p for p in teacher_ckpt.parent.glob("teacher.*.ckpt")]
        assert (
            len(kept) == 1
            and read_checkpoint(kept[0])[META_KEY]["config"]["optimizer"]["lr"] == 0.003
        )
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(saved["models"]) == ["teacher", "student", "control", "kd"]
    stages = json.loads((tmp_path / "out" / "stages.json").read_text())
    assert stages["control"]["overrides"] == [*fm, "control=true"]  # the student's own control
    control = read_checkpoint(stages["control"]["checkpoint"])[META_KEY]["config"]
    assert control["control"] is True and control["teacher"] is None
    assert all(stages[s]["seconds"] > 0 for s in ("teacher", "control", "student", "kd"))
    keys = {
        "accuracy",
        "nll",
        "ece",
        "agreement",
        "kl_to_teacher",
        "params",
        "size_mb",
        "latency_ms",
        "throughput",
    }
    for row in saved["models"].values():
        assert keys <= set(row)  # report v1 keys (v2 adds more)
    assert saved["models"]["teacher"]["agreement"] == 1.0
    assert (tmp_path / "out" / "report.md").read_text().count("|") > 20
    assert report["models"]["student"]["params"] == saved["models"]["control"]["params"]


def test_lightning_lines_are_logged_once(train_cfg, caplog, recwarn):
    """Lightning's own console handler is dropped when the root logger is configured
    (Hydra, pytest): each line reaches the console and the run's log file once. Its
    advertising tip, its note about our ModelSummary and its internal deprecation warning
    are not shown; a step-based run's bar reads "Epoch 3", not "Epoch 3/-2"."""
    import logging

    cfg = train_cfg("experiment=mnist1d_baseline", *SMALL_MNIST1D, "debug=fdr")
    with caplog.at_level(logging.INFO):
        datamodule, module, trainer, _ = build_run(cfg)
        trainer.fit(module, datamodule=datamodule)
    assert logging.getLogger().handlers
    handlers = logging.getLogger("lightning").handlers
    assert not [h for h in handlers if type(h) is logging.StreamHandler]
    assert "Trainer already configured" not in caplog.text and "Tip:" not in caplog.text
    assert not [w for w in recwarn if "LeafSpec" in str(w.message)]
    trainer.fit_loop.max_epochs = -1  # step-based
    assert trainer.progress_bar_callback._get_train_description(3).strip() == "Epoch 3"


@pytest.mark.parametrize(
    "name", ["mnist1d_teacher", "digits_teacher", "digits_bert_teacher", "text_lm_teacher"]
)
def test_a_smoke_test_writes_no_checkpoint_and_no_artifact(name, train_cfg, tmp_path):
    """debug=fdr on a teacher experiment (which exports to artifacts/) writes nothing: a
    teacher trained for real is never replaced by a one-batch model."""
    overrides = SMALL_MNIST1D if "mnist" in name else []
    assert train_cfg(f"experiment={name}").export_ckpt  # the experiment exports...
    cfg = train_cfg(f"experiment={name}", "debug=fdr", *overrides)
    assert cfg.export_ckpt is None  # ...the debug overlay does not
    train(cfg)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_fdr_refuses_an_explicit_export(train_cfg, tmp_path):
    cfg = train_cfg("experiment=mnist1d_teacher", "debug=fdr", *SMALL_MNIST1D,
                    f"export_ckpt={tmp_path / 'artifacts' / 't.ckpt'}")  # fmt: skip
    with pytest.raises(ConfigError, match="export_ckpt: a fast_dev_run"):
        train(cfg)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_an_export_never_overwrites_an_artifact_of_another_configuration(
    train_cfg, mnist1d_teacher_ckpt, tmp_path
):
    from distillery.engine.checkpoint import artifact_differences, export_artifact

    dst = tmp_path / "artifacts" / "teacher.ckpt"
    dst.parent.mkdir()
    dst.write_bytes(mnist1d_teacher_ckpt.read_bytes())
    recorded = read_checkpoint(dst)[META_KEY]["config"]
    assert artifact_differences(dst, recorded) == []
    other = {**recorded, "optimizer": {**recorded["optimizer"], "lr": 0.5}}
    # the same run writing elsewhere: every value derived from its paths moves with them
    moved = json.loads(json.dumps(recorded).replace(recorded["paths"]["output_dir"], "/else/run"))
    assert moved["trainer"]["default_root_dir"] == "/else/run"
    assert artifact_differences(dst, other) == ["optimizer.lr"]
    assert artifact_differences(dst, moved) == []
    before = dst.read_bytes()
    assert export_artifact(mnist1d_teacher_ckpt, dst, moved) is None  # same run: replaced
    kept = export_artifact(mnist1d_teacher_ckpt, dst, other)  # another run: the old kept aside
    assert kept is not None and kept.read_bytes() == before and dst.is_file()
    assert kept.parent == dst.parent and kept.name.startswith("teacher.") and kept.suffix == ".ckpt"
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    assert "not a readable checkpoint" in artifact_differences(tmp_path / "junk.ckpt", other)[0]


def test_a_pipeline_stage_may_pin_its_seed(tmp_path):
    """stages.teacher=[..., seed=0]: one teacher for several student seeds; other stages
    take the pipeline's seed."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from distillery.config.resolvers import CONFIG_DIR
    from distillery.pipeline import stage_config

    cfg = OmegaConf.create({"overrides": [], "seed": 3})
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        pinned = stage_config("teacher", ["experiment=mnist1d_teacher", "seed=0"], cfg, tmp_path)
        student = stage_config("student", ["experiment=mnist1d_kd"], cfg, tmp_path)
    assert (pinned.seed, student.seed) == (0, 3)


def test_the_last_validation_of_a_step_based_run_competes_for_best(train_cfg, tmp_path):
    """last.ckpt written at the last step must not stop the validation at that same step
    from being scored and saved: every validation is a candidate for best, so ``test``
    (which loads ``best_model_path``) can run on the final student."""
    cfg = train_cfg(
        "experiment=mnist1d_baseline",
        *SMALL_MNIST1D,
        "trainer.max_epochs=-1",
        "+trainer.max_steps=4",
        "++trainer.val_check_interval=2",
        "trainer.check_val_every_n_epoch=null",
        "+trainer.limit_val_batches=1",
        "callbacks.model_checkpoint.save_top_k=-1",
    )
    datamodule, module, trainer, _ = build_run(cfg)
    trainer.fit(module, datamodule=datamodule)
    callback = trainer.checkpoint_callback
    steps = sorted(read_checkpoint(p)["global_step"] for p in callback.best_k_models)
    assert steps == [2, 4]
    assert read_checkpoint(Path(callback.last_model_path))["global_step"] == 4

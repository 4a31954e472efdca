"""Report card v2, evaluators, export and model card, aggregation, sweeps config."""

import json
from pathlib import Path

import pytest
import torch

from conftest import SMALL_MNIST1D, compose_cfg
from distillery.aggregate import aggregate
from distillery.evaluate import evaluate
from distillery.evaluation.evaluators import DisagreementAnalysis
from distillery.evaluation.report import report_keys
from distillery.evaluation.speed import cost_per_million
from distillery.export import export, load_exported
from distillery.tasks import ClassificationTask
from distillery.train import train


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory, data_dir, mnist1d_teacher_ckpt) -> dict:
    out = tmp_path_factory.mktemp("kd_student")
    cfg = compose_cfg("train", [
        "experiment=mnist1d_kd", *SMALL_MNIST1D, "data.transfer_size=300", "trainer.max_epochs=2",
        f"teacher.ckpt_path={mnist1d_teacher_ckpt}", f"paths.output_dir={out}", f"paths.data_dir={data_dir}",
        "extras.print_config=false",
    ])  # fmt: skip
    return train(cfg)


@pytest.fixture(scope="module")
def kd_student(kd_run) -> Path:
    return Path(kd_run["best_ckpt"])


def test_disagreement_analysis_on_known_predictions():
    eye = torch.eye(3) * 10
    teacher = eye[[0, 1, 2, 0, 1, 2]]
    student = eye[[0, 1, 2, 1, 1, 0]]  # disagrees on samples 3 (class 0) and 5 (class 2)
    labels = torch.tensor([0, 1, 2, 0, 2, 2])  # teacher wrong on sample 4; student repeats it
    result = DisagreementAnalysis(top_k=2)(None, None, {
        "teacher_logits": teacher, "student_logits": student, "labels": labels,
        "inputs": torch.zeros(6, 1), "sample_id": torch.arange(100, 106)})  # fmt: skip
    assert result["disagreement"] == pytest.approx(2 / 6)
    assert result["per_class"]["0"] == {"n": 2, "disagreement": 0.5}
    assert result["per_class"]["1"]["disagreement"] == 0.0
    assert result["inherited_teacher_errors"] == 1.0
    assert {w["sample_id"] for w in result["most_divergent"]} == {103, 105}
    assert "| teacher class |" in result["markdown"]


def test_cost_per_million_formula():
    assert cost_per_million(1000.0, 3.6) == pytest.approx(1.0)  # 0.001 USD/s / 1000 samples/s * 1e6
    assert cost_per_million(1000.0, 0.0) is None  # no price: an empty cell, not a free model


def test_report_card_v2(kd_student, tmp_path):
    cfg = compose_cfg(
        "evaluate",
        [
            f"ckpt_path={kd_student}",
            f"+compare.again={kd_student}",
            f"paths.output_dir={tmp_path}",
            "price_per_hour=2.5",
        ],
    )
    report = evaluate(cfg)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert list(saved["models"]) == ["teacher", "student", "again"]
    for row in saved["models"].values():
        assert set(row) == set(report_keys(ClassificationTask()))
        assert row["latency_p95_ms"] >= row["latency_ms"] > 0
        assert row["cost_per_million"] == pytest.approx(2.5 / 3600 / row["throughput"] * 1e6)
    t, s = saved["models"]["teacher"], saved["models"]["student"]
    assert t["quality_retained"] == 100.0
    assert s["quality_retained"] == pytest.approx(100 * s["accuracy"] / t["accuracy"])
    for name in ("reliability", "quality_vs_latency"):
        png = Path(saved["plots"][name])
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert set(saved["evaluations"]) == {"disagreement/student", "disagreement/again"}
    md = (tmp_path / "report.md").read_text()
    assert "![reliability](reliability.png)" in md and "## disagreement/student" in md
    assert report["teacher"]["source"] == "run_checkpoint"


def test_report_card_equals_what_the_run_logged_on_test(kd_run, tmp_path):
    """One metrics implementation: the card's quality columns for the student are the
    test/* values the training run logged for the same (best) checkpoint."""
    cfg = compose_cfg(
        "evaluate",
        [f"ckpt_path={kd_run['best_ckpt']}", f"paths.output_dir={tmp_path}", "plots=false"],
    )
    row = evaluate(cfg)["models"]["student"]
    logged = {
        "accuracy": "acc",
        "nll": "nll",
        "ece": "ece",
        "agreement": "agreement",
        "kl_to_teacher": "kl_to_teacher",
    }
    for column, metric in logged.items():
        assert row[column] == pytest.approx(kd_run[f"test/{metric}"], abs=1e-6), column


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript", "onnx"])
def test_export_reloads_and_matches_the_student(fmt, kd_student, tmp_path, data_dir):
    from distillery.engine.checkpoint import load_student

    report_dir = tmp_path / "report"
    evaluate(
        compose_cfg(
            "evaluate",
            [
                f"ckpt_path={kd_student}",
                f"paths.output_dir={report_dir}",
                "plots=false",
                "evaluators={}",
            ],
        )
    )
    out = tmp_path / "export"
    path = export(
        compose_cfg(
            "export",
            [
                f"ckpt_path={kd_student}",
                f"format={fmt}",
                f"paths.output_dir={out}",
                f"report={report_dir / 'report.json'}",
            ],
        )
    )
    x = torch.randn(16, 40)
    with torch.no_grad():
        torch.testing.assert_close(
            load_exported(path)(x), load_student(kd_student)(x), atol=1e-5, rtol=0
        )
    card = (out / "MODEL_CARD.md").read_text()
    for needle in (
        "## Teacher lineage",
        "weights sha256",
        "## Data",
        "## Objective",
        "kd: `distillery.losses.HintonKD`",
        "| accuracy |",
        "inherits the teacher's biases and errors",
    ):
        assert needle in card, needle
    # Exports are measurable by the report like any student.
    report = evaluate(
        compose_cfg(
            "evaluate",
            [
                f"ckpt_path={kd_student}",
                f"+compare.exported={path}",
                f"paths.output_dir={tmp_path / 'r2'}",
                "plots=false",
            ],
        )
    )
    assert report["models"]["exported"]["accuracy"] == pytest.approx(
        report["models"]["student"]["accuracy"]
    )
    assert report["models"]["exported"]["latency_ms"] > 0


def test_int8_export_is_close_smaller_and_on_the_report_card(kd_student, tmp_path):
    """int8 dynamic quantisation of the student's Linear layers: within int8_tolerance of
    the float student, and measured by the report card next to it."""
    from distillery.engine.checkpoint import load_student

    path = export(compose_cfg("export", [f"ckpt_path={kd_student}", "format=int8",
                                         f"paths.output_dir={tmp_path / 'int8'}"]))  # fmt: skip
    assert path.name == "model.int8.torchscript.pt"
    x = torch.randn(64, 40)
    with torch.no_grad():
        want, got = load_student(kd_student)(x), load_exported(path)(x)
    assert 0 < (got - want).abs().max() <= 0.05 * want.abs().max()  # quantised, and close
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.9
    report = evaluate(compose_cfg("evaluate", [
        f"ckpt_path={kd_student}", f"+compare.int8={path}", f"paths.output_dir={tmp_path / 'r'}",
        "plots=false", "evaluators={}"]))  # fmt: skip
    s, q = report["models"]["student"], report["models"]["int8"]
    assert (
        q["size_mb"] > 0
        and q["latency_ms"] > 0
        and q["accuracy"] == pytest.approx(s["accuracy"], abs=0.02)
    )


def test_export_formats_a_model_cannot_take_are_named(kd_student, tmp_path):
    from distillery.config import ConfigError

    cfg = compose_cfg(
        "export", [f"ckpt_path={kd_student}", "format=hf", f"paths.output_dir={tmp_path}"]
    )
    with pytest.raises(ValueError, match="format: hf takes Hugging Face .* not MLP"):
        export(cfg)
    cfg.format = "tflite"
    with pytest.raises(ConfigError, match="format: expected one of"):
        export(cfg)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "MODEL_CARD.md").exists()


def test_export_that_does_not_match_is_removed(kd_student, tmp_path):
    out = tmp_path / "export"
    with pytest.raises(RuntimeError, match="differs from the student"):
        export(
            compose_cfg(
                "export",
                [
                    f"ckpt_path={kd_student}",
                    "format=torchscript",
                    f"paths.output_dir={out}",
                    "atol=-1.0",
                ],
            )
        )
    assert not (out / "model.torchscript.pt").exists() and not (out / "MODEL_CARD.md").exists()


def write_job(root: Path, num: int, overrides: list[str], val_acc: list[float], test_acc: float):
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "csv" / "version_0").mkdir(parents=True)
    rows = ["epoch,step,train/loss,val/acc,val/nll,test/acc"]
    for e, acc in enumerate(val_acc):
        rows.append(f"{e},{10 * e + 9},0.5,,,")
        rows.append(f"{e},{10 * e + 9},,{acc},{1 - acc},")
    rows.append(f"{len(val_acc) - 1},{10 * len(val_acc)},,,,{test_acc}")
    (job / "csv" / "version_0" / "metrics.csv").write_text("\n".join(rows) + "\n")


def test_aggregate_groups_by_differing_overrides_without_seed(tmp_path):
    write_job(
        tmp_path,
        0,
        ["seed=0", "distill.terms.kd.temperature=1", "experiment=x"],
        [0.5, 0.7, 0.6],
        0.65,
    )
    write_job(
        tmp_path,
        1,
        ["seed=1", "distill.terms.kd.temperature=1", "experiment=x"],
        [0.6, 0.9, 0.8],
        0.85,
    )
    write_job(
        tmp_path,
        2,
        ["seed=0", "distill.terms.kd.temperature=4", "experiment=x"],
        [0.1, 0.2, 0.3],
        0.25,
    )
    result = aggregate(tmp_path)
    assert set(result["groups"]) == {
        "distill.terms.kd.temperature=1",
        "distill.terms.kd.temperature=4",
    }
    g = result["groups"]["distill.terms.kd.temperature=1"]
    assert g["jobs"] == ["0", "1"]
    assert g["best"]["val/acc"]["mean"] == pytest.approx(0.8)  # 0.7 and 0.9
    assert g["best"]["val/acc"]["std"] == pytest.approx(0.1414213, rel=1e-5)
    assert g["last"]["val/acc"]["mean"] == pytest.approx(0.7)  # 0.6 and 0.8
    assert g["best"]["val/nll"]["mean"] == pytest.approx(0.2)  # taken at the best epoch
    assert g["test"]["test/acc"]["mean"] == pytest.approx(0.75)
    assert result["groups"]["distill.terms.kd.temperature=4"]["best"]["val/acc"][
        "mean"
    ] == pytest.approx(0.3)
    with pytest.raises(FileNotFoundError, match="multirun dir"):
        aggregate(tmp_path / "0" / "csv")


@pytest.mark.parametrize(
    ("launcher", "target"), [("joblib", "JoblibLauncher"), ("slurm", "SlurmLauncher")]
)
def test_launcher_configs_compose(launcher, target):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from distillery.config.resolvers import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", [f"launcher={launcher}", "trainer=ddp"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 4


def test_kd_optuna_search_space_composes():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from distillery.config.resolvers import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "train", ["hparams_search=kd_optuna", "experiment=mnist1d_kd"], return_hydra_config=True
        )
    assert cfg.optimized_metric == "val/acc"
    assert set(cfg.hydra.sweeper.params) == {"distill.terms.kd.temperature", "distill.weights.kd"}
    assert cfg.hydra.sweeper.max_failure_rate == 1.0


def test_wandb_group_is_shared_by_the_jobs_of_a_multirun():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from distillery.config.resolvers import CONFIG_DIR, wandb_group

    assert wandb_group("kd") == "kd"  # no Hydra run: the task name
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", ["logger=wandb"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = "/x/multiruns/2026-01-01_00-00-00_1-ab"
    HydraConfig.instance().set_config(cfg)
    try:
        assert wandb_group("kd") == "kd/2026-01-01_00-00-00_1-ab"
        assert cfg.logger.wandb.group == "train/2026-01-01_00-00-00_1-ab"
    finally:
        HydraConfig.instance().cfg = None


def test_notebooks_are_kept_without_outputs():
    for path in sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell.get("outputs") == [] and cell.get("execution_count") is None, path


def test_report_attached_to_an_offline_wandb_run(kd_student, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    evaluate(
        compose_cfg(
            "evaluate",
            [
                f"ckpt_path={kd_student}",
                f"paths.output_dir={tmp_path}",
                "wandb={project: distillery, name: report}",
            ],
        )
    )
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = runs[0] / "files" / "media"
    assert len(list((media / "images" / "plots").glob("*.png"))) == 2
    tables = list((media / "table").glob("report_*.table.json"))
    assert tables and "quality_retained" in tables[0].read_text()
    import wandb

    assert wandb.run is None


def test_classifier_inherited_groups_errors_gate_and_model_card(kd_student, tmp_path):
    """inherited=classifier: accuracy per class teacher vs student (the worst class, the
    largest drop) and the teacher's errors the student repeats, the same count as the
    DisagreementAnalysis on logits; the gate's verdict; the model card's section."""
    report_dir = tmp_path / "report"
    report = evaluate(compose_cfg("evaluate", [
        f"ckpt_path={kd_student}", f"paths.output_dir={report_dir}", "inherited=classifier",
        "gate=classifier", "gate.checks=[{metric: inherited.groups.max_drop, max: -1}]",
    ]))  # fmt: skip
    inh = report["inherited"]
    s, t = inh["student"], inh["teacher"]
    classes = [k for k in s["groups"] if k.startswith("quality/")]
    assert len(classes) == 10 and t["groups"]["max_drop"] == 0.0
    drops = {k.split("/", 1)[1]: t["groups"][k] - s["groups"][k] for k in classes}
    assert s["groups"]["max_drop"] == pytest.approx(max(drops.values()))
    assert s["groups"]["worst_quality"] == min(s["groups"][k] for k in classes)
    repeated = report["evaluations"]["disagreement/student"]["inherited_teacher_errors"]
    assert s["errors"]["repeated_teacher_errors"] == pytest.approx(repeated)
    assert not report["gate"]["passed"]  # max_drop <= -1 cannot hold
    assert (report_dir / "inherited.png").is_file()
    out = tmp_path / "export"
    export(compose_cfg("export", [f"ckpt_path={kd_student}", "format=state_dict",
                                  f"paths.output_dir={out}", f"report={report_dir / 'report.json'}"]))  # fmt: skip
    card = (out / "MODEL_CARD.md").read_text()
    assert "## What the student inherited" in card and "| groups | max_drop |" in card
    assert "Release gate (1 checks): FAILED:" in card and "- inherited.groups.max_drop = " in card

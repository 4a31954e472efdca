"""Report card: ``python -m distillery.evaluate ckpt_path=<student run checkpoint>``.

The teacher is rebuilt from the provenance stored in the student checkpoint (its
weights hash must match), the data from the checkpoint's config; both can be
overridden (``teacher=...``, ``data=...``). ``compare`` adds more students, e.g.
``+compare.baseline=<baseline run checkpoint>``.

``inherited=<config>`` adds what each student inherited (memorisation, safety, groups,
errors: ``distillery.evaluation.inherited``) beside the teacher's; ``gate=<config>``
checks thresholds on the finished report (``distillery.evaluation.gate``) and exits
with code 1, one line per failed check, after writing it. Both are checked against the
data and the task before any model is loaded.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from distillery.config import ConfigError, _in_multirun, build, exit_on_config_error, validate
from distillery.config.resolvers import CONFIG_DIR

log = logging.getLogger(__name__)


def rebuild_teacher(ckpt: dict, key: str = "ckpt_path", task=None, datamodule=None):
    """The teacher a student was distilled from, from its recorded provenance (a remote
    teacher connected, so that the weights hash is the one its server reports)."""
    from distillery.engine.builder import build_frozen_model, connect_remote_teacher
    from distillery.engine.checkpoint import META_KEY

    provenance = ckpt[META_KEY].get("teacher")
    if provenance is None:
        return None
    teacher = build_frozen_model(provenance["config"], f"{key} (recorded teacher config)")
    if datamodule is not None:
        connect_remote_teacher(teacher, task, datamodule)
    found = teacher.provenance["sha256"]  # of the weights as loaded, before any cast
    if found != provenance["sha256"]:
        raise ValueError(
            f"{key}: the teacher rebuilt from its recorded config ({provenance.get('source')}) has "
            f"weights hash {found[:12]}..., but the student was distilled from {provenance['sha256'][:12]}..."
        )
    return teacher


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    validate(cfg, top_level={})
    from distillery.engine.builder import build_task, build_teacher, connect_remote_teacher
    from distillery.engine.checkpoint import META_KEY, load_student, read_checkpoint
    from distillery.evaluation.report import build_report, print_table, write_report
    from distillery.export import load_any

    ckpt = read_checkpoint(cfg.ckpt_path, "ckpt_path")
    run_cfg = OmegaConf.create(ckpt[META_KEY]["config"])
    datamodule = build(cfg.data if cfg.get("data") is not None else run_cfg.data, "data")
    datamodule.prepare_data()
    datamodule.setup("test")
    task = build_task(run_cfg, datamodule)  # the run's adapter: classes, tokens or embeddings
    probes, gate = check_inherited_and_gate(cfg, task, datamodule)  # before any model loads
    if cfg.get("teacher") is not None:
        teacher = build_teacher(cfg)
        connect_remote_teacher(teacher, task, datamodule)
    else:
        teacher = rebuild_teacher(ckpt, task=task, datamodule=datamodule)

    models = {}
    if teacher is not None:
        models["teacher"] = teacher
    models["student"] = load_student(cfg.ckpt_path, "ckpt_path")
    for name, path in (cfg.get("compare") or {}).items():
        models[str(name)] = load_any(path, f"compare.{name}")  # run checkpoint or export

    teacher_name = "teacher" if teacher is not None else None
    if teacher_name is None and task.name == "embedding":
        raise ConfigError(["teacher: the embedding report compares with a teacher; none was found"])
    report, preds, records = build_report(
        models,
        teacher_name,
        datamodule.test_dataloader(),
        task,
        num_classes=getattr(datamodule, "num_classes", None),
        device=cfg.get("device", "cpu"),
        price_per_hour=float(cfg.get("price_per_hour", 0.0)),
        latency=cfg.get("latency"),
        throughput_cfg=cfg.get("throughput"),
    )
    report["checkpoints"] = {
        "student": str(cfg.ckpt_path),
        **{str(k): str(v) for k, v in (cfg.get("compare") or {}).items()},
    }
    report["teacher"] = ckpt[META_KEY].get("teacher")
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("plots", True):
        from distillery.evaluation.plots import quality_vs_latency, reliability_diagram

        path = quality_vs_latency(report, out_dir / "quality_vs_latency.png", task.quality_key)
        report["plots"] = {"quality_vs_latency": str(path)}
        if preds:
            preds_cal = {n: (p[0], p[1]) for n, p in preds.items()}
            report["plots"]["reliability"] = str(
                reliability_diagram(preds_cal, out_dir / "reliability.png")
            )
    report["evaluations"] = run_evaluators(cfg.get("evaluators"), models, preds, teacher_name)
    inherited_md = ""
    if probes:
        from distillery.evaluation.inherited import Evidence, run_probes, to_markdown

        device = cfg.get("device", "cpu")
        text = {n: task.text_model(m, n == teacher_name, device) for n, m in models.items()} if task.generates else {}  # fmt: skip
        report["inherited"] = run_probes(
            probes, Evidence(task, datamodule, teacher_name, records, text)
        )
        inherited_md = to_markdown(report["inherited"], probes, teacher_name)
        if cfg.get("plots", True):
            from distillery.evaluation.plots import inherited_plot

            path = inherited_plot(report["inherited"], out_dir / "inherited.png", teacher_name)
            if path is not None:  # listed with the other plots in report.md
                report.setdefault("plots", {})["inherited"] = str(path)
    if gate is not None:
        report["gate"] = gate(report, teacher_name)
    js, md = write_report(report, out_dir, inherited_md)
    if cfg.get("wandb"):
        log_report_to_wandb(report, cfg.wandb, out_dir)
    print_table(report)
    log.info("report written to %s and %s", js, md)
    return report


def check_inherited_and_gate(cfg: DictConfig, task, datamodule):
    """The probes of ``inherited`` and the ``gate``, checked against the task and the data
    (suite files read, group keys and gate metrics resolved): ConfigErrors naming the key."""
    from distillery.evaluation.gate import Gate
    from distillery.evaluation.inherited import build_probes
    from distillery.evaluation.report import report_keys

    probes, metrics = build_probes(cfg.get("inherited"), task, datamodule)
    gate = None
    if cfg.get("gate") is not None:
        node = OmegaConf.to_container(cfg.gate, resolve=True)
        try:
            gate = Gate(node.get("checks"), node.get("models"))
            gate.check_metrics(list(report_keys(task)), metrics)
            gate.check_models(["teacher", "student", *map(str, cfg.get("compare") or {})])
        except ValueError as e:
            raise ConfigError([str(e)]) from e
    return probes, gate


def log_report_to_wandb(report: dict[str, Any], wandb_cfg, out_dir: Path) -> None:
    """Attach the report table, plots and evaluator summaries to a W&B run (its own run,
    offline with WANDB_MODE=offline)."""
    import wandb

    keys = report["keys"]

    run = wandb.init(dir=str(out_dir), job_type="evaluate", **dict(wandb_cfg))
    try:
        names = list(report["models"])
        table = wandb.Table(
            columns=["model", *keys],
            data=[[n, *(report["models"][n][k] for k in keys)] for n in names],
        )
        payload: dict[str, Any] = {"report": table}
        payload.update(
            {f"plots/{k}": wandb.Image(v) for k, v in (report.get("plots") or {}).items()}
        )
        for key, result in (report.get("evaluations") or {}).items():
            payload[f"evaluations/{key}"] = wandb.Html(f"<pre>{result.get('markdown', '')}</pre>")
        for section, rows in inherited_tables(report.get("inherited") or {}).items():
            payload[f"inherited/{section}"] = wandb.Table(columns=rows[0], data=rows[1:])
        run.log(payload)
        run.summary.update({f"{n}/{k}": report["models"][n][k] for n in names for k in keys})
    finally:
        run.finish()


def inherited_tables(inherited: dict[str, dict]) -> dict[str, list[list]]:
    """``{section: [header, *rows]}``: one row per model, its numeric metrics as columns."""
    out: dict[str, list[list]] = {}
    for section in sorted({s for secs in inherited.values() for s in secs}):
        rows = {n: {k: v for k, v in secs[section].items() if isinstance(v, int | float)}
                for n, secs in inherited.items() if section in secs}  # fmt: skip
        cols = sorted({k for r in rows.values() for k in r})
        out[section] = [
            ["model", *cols],
            *([n, *(r.get(k) for k in cols)] for n, r in rows.items()),
        ]
    return out


def run_evaluators(nodes, models: dict, preds: dict, teacher_name: str | None) -> dict[str, Any]:
    """Every configured evaluator on every student (needs a teacher and kept predictions)."""
    from distillery.config.extras import build_list

    if teacher_name is None or not nodes or not preds:
        return {}
    results = {}
    names = [k for k, v in nodes.items() if v]
    for key, evaluator in zip(names, build_list(nodes, "evaluators"), strict=True):
        for name, model in models.items():
            if name == teacher_name:
                continue
            p_t, p_s = preds[teacher_name], preds[name]
            predictions = {
                "teacher_logits": p_t[0],
                "student_logits": p_s[0],
                "labels": p_s[1],
                "inputs": p_s[2],
                "sample_id": p_s[3],
            }
            results[f"{key}/{name}"] = evaluator(models[teacher_name], model, predictions)
    return results


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    report = exit_on_config_error(lambda: evaluate(cfg))
    gate = (report or {}).get("gate")
    if gate is not None and not gate["passed"]:
        for line in gate["failures"]:
            print(line, file=sys.stderr)
        if not _in_multirun():  # a sweep goes on to its other jobs
            sys.exit(1)


if __name__ == "__main__":
    main()

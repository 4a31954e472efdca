"""The main job behind ``make distill``: teacher -> no-teacher control -> distilled
student -> report card, in one process.

1. teacher: reuses ``teacher_ckpt`` if it exists and was made by ``stages.teacher`` (the
   same resolved config, output paths aside, and at least one trained step), else trains
   ``stages.teacher`` and exports its best checkpoint there (a different file already
   there is kept aside, not overwritten);
2. control: the distilled student's own no-teacher control (``stages.control: null``:
   the student's overrides + ``control=true``: same student, data, views, schedule and
   seed, no teacher and no teacher-only term), or the runs named in ``stages.control``
   (e.g. the original data for a student trained on teacher generations);
3. student: the student distilled from that teacher (``stages.student``), then any
   ``extra_students`` (name -> overrides), e.g. other recipes to compare;
4. report: all of them on the test split -> ``report.json``, ``report.md`` and a table;
   ``stages.json`` records each stage's overrides, checkpoint and wall time.

Each stage is a ``distillery.train`` run composed from ``conf/train.yaml`` with the
stage's overrides, then ``overrides`` (shared by all stages) and ``seed`` (unless the
stage pins its own, e.g. ``stages.teacher=[experiment=..., seed=0]``: one teacher for
several student seeds), writing into ``<output_dir>/<stage>``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
from hydra import compose
from omegaconf import DictConfig, OmegaConf

from distillery.config import ConfigError, exit_on_config_error, to_record, validate
from distillery.config.resolvers import CONFIG_DIR

log = logging.getLogger(__name__)


def stage_config(
    name: str, stage_overrides: list[str], cfg: DictConfig, out_dir: Path
) -> DictConfig:
    pinned = any(str(o).lstrip("+").startswith("seed=") for o in stage_overrides)  # one teacher
    overrides = [  # for several student seeds
        *stage_overrides,
        *cfg.overrides,
        *([] if pinned else [f"seed={cfg.seed}"]),
        f"paths.output_dir={out_dir / name}",
        "extras.print_config=false",
    ]
    try:
        return compose(config_name="train", overrides=overrides)
    except Exception as e:  # noqa: BLE001 - re-raised with the stage's key
        raise ConfigError([f"stages.{name}: cannot compose {overrides}: {e}"]) from e


def timed(fn, *args) -> tuple[Any, float]:
    """``fn(*args)`` and its wall time in seconds (one decimal), for ``stages.json``."""
    start = time.perf_counter()
    result = fn(*args)
    return result, round(time.perf_counter() - start, 1)


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    validate(cfg, top_level={})
    from distillery.config import atomic_write_text
    from distillery.engine.checkpoint import artifact_differences
    from distillery.evaluate import evaluate
    from distillery.train import train

    out_dir = Path(cfg.output_dir)
    teacher_ckpt = Path(cfg.teacher_ckpt)
    ckpts: dict[str, str] = {}

    tcfg = stage_config(
        "teacher", [*cfg.stages.teacher, f"export_ckpt={teacher_ckpt}"], cfg, out_dir
    )
    diffs = artifact_differences(teacher_ckpt, to_record(tcfg)) if teacher_ckpt.is_file() else []
    reuse = teacher_ckpt.is_file() and not diffs and not cfg.retrain_teacher
    stages: dict[str, dict] = {
        "teacher": {"overrides": list(cfg.stages.teacher), "checkpoint": str(teacher_ckpt),
                    "seconds": 0.0, "reused": reuse}
    }  # fmt: skip
    if reuse:
        log.info("reusing teacher checkpoint %s", teacher_ckpt)
    else:
        if diffs:  # the export keeps the old file aside
            log.warning(
                "teacher checkpoint %s is not from stages.teacher (%s): training the teacher",
                teacher_ckpt, ", ".join(diffs[:5]),
            )  # fmt: skip
        else:
            log.info("training the teacher into %s", teacher_ckpt)
        stages["teacher"]["seconds"] = timed(train, tcfg)[1]

    student = list(cfg.stages.student)
    control = cfg.stages.get("control")
    runs = {
        "control": [*student, "control=true"] if control is None else list(control),
        "student": [*student, f"teacher.ckpt_path={teacher_ckpt}"],
    }
    for name, overrides in (cfg.get("extra_students") or {}).items():
        runs[str(name)] = [*overrides, f"teacher.ckpt_path={teacher_ckpt}"]
    for name, stage_overrides in runs.items():
        metrics, seconds = timed(train, stage_config(name, stage_overrides, cfg, out_dir))
        if not metrics.get("best_ckpt"):
            raise RuntimeError(f"stages.{name}: the run saved no checkpoint; the report needs one")
        ckpts[name] = metrics["best_ckpt"]
        stages[name] = {"overrides": stage_overrides, "checkpoint": ckpts[name], "seconds": seconds}

    ecfg = compose(
        config_name="evaluate",
        overrides=[
            f"ckpt_path={ckpts['student']}",
            *(f"+compare.{name}={path}" for name, path in ckpts.items() if name != "student"),
            f"paths.output_dir={out_dir}",
        ],
    )
    report = evaluate(ecfg)
    atomic_write_text(out_dir / "stages.json", json.dumps(stages, indent=2))
    return report


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="pipeline")
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    exit_on_config_error(lambda: run_pipeline(cfg))


if __name__ == "__main__":
    main()

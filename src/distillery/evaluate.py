"""Report card: ``python -m distillery.evaluate ckpt_path=<student run checkpoint>``.

The teacher is rebuilt from the provenance stored in the student checkpoint (its
weights hash must match), the data from the checkpoint's config; both can be
overridden (``teacher=...``, ``data=...``). ``compare`` adds more students, e.g.
``+compare.baseline=<baseline run checkpoint>``.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from distillery import resolvers
from distillery.config import ConfigError, build, validate

log = logging.getLogger(__name__)


def rebuild_teacher(ckpt: dict, key: str = "ckpt_path"):
    """The teacher a student was distilled from, from its recorded provenance."""
    from distillery.checkpoint import META_KEY
    from distillery.teacher import weights_sha256

    provenance = ckpt[META_KEY].get("teacher")
    if provenance is None:
        return None
    teacher = build(OmegaConf.create(provenance["config"]), f"{key} (recorded teacher config)")
    found = weights_sha256(teacher.model)
    if found != provenance["sha256"]:
        raise ValueError(
            f"{key}: the teacher rebuilt from its recorded config ({provenance.get('source')}) has "
            f"weights hash {found[:12]}..., but the student was distilled from {provenance['sha256'][:12]}..."
        )
    return teacher


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    validate(cfg, top_level={})
    from distillery.checkpoint import META_KEY, load_student, read_checkpoint
    from distillery.report import build_report, print_table, write_report
    from distillery.train import build_teacher

    ckpt = read_checkpoint(cfg.ckpt_path, "ckpt_path")
    run_cfg = OmegaConf.create(ckpt[META_KEY]["config"])
    teacher = build_teacher(cfg) if cfg.get("teacher") is not None else rebuild_teacher(ckpt)

    models = {}
    if teacher is not None:
        models["teacher"] = teacher
    models["student"] = load_student(cfg.ckpt_path, "ckpt_path")
    for name, path in (cfg.get("compare") or {}).items():
        models[str(name)] = load_student(path, f"compare.{name}")

    datamodule = build(cfg.data if cfg.get("data") is not None else run_cfg.data, "data")
    datamodule.prepare_data()
    datamodule.setup("test")
    report = build_report(
        models,
        "teacher" if teacher is not None else None,
        datamodule.test_dataloader(),
        latency=cfg.get("latency"),
        throughput_cfg=cfg.get("throughput"),
    )
    report["checkpoints"] = {
        "student": str(cfg.ckpt_path),
        **{str(k): str(v) for k, v in (cfg.get("compare") or {}).items()},
    }
    report["teacher"] = ckpt[META_KEY].get("teacher")
    js, md = write_report(report, cfg.output_dir)
    print_table(report)
    log.info("report written to %s and %s", js, md)
    return report


@hydra.main(version_base="1.3", config_path=str(resolvers.CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except ConfigError as e:
        log.error(str(e))
        raise


if __name__ == "__main__":
    main()

"""Train a student (with or without a teacher): ``python -m distillery.train experiment=...``.

``teacher: null`` and a task-only objective train a plain model: that is how a
teacher is trained and how the no-teacher baseline runs. Same code path for all three.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from distillery import resolvers
from distillery.config import ConfigError, build, to_container, validate

log = logging.getLogger(__name__)


def build_teacher(cfg: DictConfig):
    """The teacher from ``cfg.teacher`` with its config recorded in its provenance."""
    from distillery.teacher import Teacher

    teacher = build(cfg.get("teacher"), "teacher")
    if teacher is None:
        return None
    if not isinstance(teacher, Teacher):
        raise ConfigError(
            [
                f"teacher: the teacher source must return a distillery.teacher.Teacher, got {type(teacher).__name__}"
            ]
        )
    teacher.provenance["config"] = to_container(cfg.teacher)
    return teacher


def build_taps(cfg: DictConfig, student, teacher, objective, x) -> tuple:
    """Taps from ``cfg.taps`` and, from one dry-run forward, the projectors of every
    feature term (so they exist before the optimizer and checkpoint loading)."""
    import torch

    from distillery.losses.feature import FeatureTerm
    from distillery.taps import Taps

    feature_terms = {n: t for n, t in objective.terms.items() if isinstance(t, FeatureTerm)}
    spec = cfg.get("taps") or {}
    if not feature_terms and not spec:
        return None, None
    if teacher is None:
        raise ConfigError(["taps: feature taps need a teacher, but `teacher` is null"])
    try:
        s_taps = Taps(student, spec.get("student"), "student", detach=False)
        t_taps = Taps(teacher.network, spec.get("teacher"), "teacher", detach=True)
    except (ValueError, TypeError) as e:
        raise ConfigError([str(e)]) from e
    problems = []
    for name, term in feature_terms.items():
        for side, taps, tap in (
            ("student", s_taps, term.student_tap),
            ("teacher", t_taps, term.teacher_tap),
        ):
            if tap not in taps.specs:
                problems.append(
                    f"distill.terms.{name}: no tap named {tap!r} under taps.{side} ({sorted(taps.specs)})"
                )
    if problems:
        raise ConfigError(problems)
    with s_taps, t_taps, torch.no_grad():
        was_training = student.training
        student.eval()
        teacher(x)
        student(x)
        student.train(was_training)

        def shapes(v):
            return [tuple(t.shape) for t in v] if isinstance(v, list) else tuple(v.shape)

        for name, term in feature_terms.items():
            try:
                term.setup(
                    shapes(s_taps.captured[term.student_tap]),
                    shapes(t_taps.captured[term.teacher_tap]),
                    f"distill.terms.{name}",
                )
            except (ValueError, KeyError) as e:
                problems.append(str(e))
    if problems:
        raise ConfigError(problems)
    return s_taps, t_taps


def build_run(cfg: DictConfig):
    """Validate the config, then build (datamodule, module, trainer, loggers)."""
    validate(cfg)
    import lightning as L
    from torch import nn

    from distillery.checkpoint import AtomicCheckpointIO
    from distillery.checks import check_models
    from distillery.module import DistillationModule, count_params
    from distillery.preprocess import InputNorm
    from distillery.utils import build_list, log_hyperparameters, single_lightning_log

    single_lightning_log()

    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    datamodule = build(cfg.data, "data")
    student = build(cfg.student, "student")
    teacher = build_teacher(cfg)
    if teacher is not None:  # the teacher is in eval mode on purpose
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    objective = build(cfg.distill, "distill")
    student_norm = InputNorm.from_config(getattr(datamodule, "input_norm", None))
    example = datamodule.example_input(2)
    num_classes = getattr(datamodule, "num_classes", None)
    check_models(cfg, nn.Sequential(student_norm, student), teacher, datamodule, example)
    student_taps, teacher_taps = build_taps(cfg, student, teacher, objective, example)
    module_factory = build(cfg.get("module"), "module") or DistillationModule
    try:
        module = module_factory(
            student=student,
            objective=objective,
            optimizer=build(cfg.optimizer, "optimizer"),
            scheduler=build(cfg.get("scheduler"), "scheduler"),
            num_classes=num_classes,
            teacher=teacher,
            student_norm=student_norm,
            views=build(cfg.get("views"), "views"),
            student_taps=student_taps,
            teacher_taps=teacher_taps,
            run_config=to_container(cfg),
        )
    except (ValueError, TypeError) as e:
        raise ConfigError([str(e)]) from e

    callbacks = build_list(cfg.get("callbacks"), "callbacks")
    loggers = build_list(cfg.get("logger"), "logger")
    strategy = cfg.trainer.get("strategy", "auto")
    plugins = [AtomicCheckpointIO()] if strategy in ("auto", "ddp", "ddp_spawn", None) else []
    trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers, plugins=plugins)
    log_hyperparameters(
        trainer,
        cfg,
        {
            "params/student": count_params(student),
            "params/teacher": count_params(teacher) if teacher is not None else None,
            "params/compression": count_params(teacher) / count_params(student)
            if teacher is not None
            else None,
        },
    )
    return datamodule, module, trainer, loggers


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (resuming from ``ckpt_path``), test the best checkpoint, export it.
    Returns the final metrics as floats plus ``best_ckpt``."""
    from distillery.checkpoint import copy_atomic
    from distillery.utils import finish_loggers

    datamodule, module, trainer, loggers = build_run(cfg)
    metrics: dict[str, Any] = {}
    try:
        if cfg.get("train", True):
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
            metrics.update(trainer.callback_metrics)
        callback = trainer.checkpoint_callback
        best = callback.best_model_path if callback else ""
        if cfg.get("test", True):
            trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
            metrics.update(trainer.callback_metrics)
        if cfg.get("export_ckpt") and trainer.is_global_zero:
            src = best or (callback.last_model_path if callback else "")
            if not src:
                raise RuntimeError(
                    "export_ckpt is set but the run saved no checkpoint (callbacks disabled?)"
                )
            copy_atomic(Path(src), Path(cfg.export_ckpt))
        metrics["best_ckpt"] = best
    finally:
        finish_loggers(loggers)
    return {k: (float(v) if hasattr(v, "item") else v) for k, v in metrics.items()}


@hydra.main(version_base="1.3", config_path=str(resolvers.CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from distillery.utils import apply_extras

    apply_extras(cfg)
    try:
        metrics = train(cfg)
    except ConfigError as e:
        log.error(str(e))
        raise
    name = cfg.get("optimized_metric")
    if name is None:
        return None
    if name not in metrics:
        raise ConfigError(
            [f"optimized_metric: {name!r} was not logged (logged: {sorted(metrics)})"]
        )
    return metrics[name]


if __name__ == "__main__":
    main()

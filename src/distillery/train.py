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


def check_compatible(teacher, student, x, num_classes: int | None) -> None:
    """Dry-run forward on a dummy batch: student (and teacher) must give [B, num_classes]
    (classifiers) or, without classes (embeddings), outputs of the same shape."""
    import torch

    student.eval()
    problems, shapes = [], {}
    for key, model in (("student", student), ("teacher", teacher)):
        if model is None:
            continue
        try:
            with torch.no_grad():
                shapes[key] = tuple(model(x).shape[1:])
        except Exception as e:  # noqa: BLE001 - reported with the key
            problems.append(
                f"{key}: forward on an input of shape {tuple(x.shape)} (data.input_shape) failed: {e}"
            )
            continue
        if num_classes is not None and shapes[key] != (num_classes,):
            problems.append(
                f"{key}: outputs shape {shapes[key]} per sample, but data has {num_classes} classes"
            )
    student.train()
    if num_classes is None and len(shapes) == 2 and shapes["student"] != shapes["teacher"]:
        problems.append(
            f"student: outputs shape {shapes['student']} per sample, the teacher {shapes['teacher']}"
            f" (a narrower student maps to the teacher's width, e.g. student.output_dim)"
        )
    if problems:
        raise ConfigError(problems)


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


def check_vocab(cfg: DictConfig, student, teacher, datamodule, same_rows: bool = True) -> None:
    """Student and teacher vocabularies must cover the tokenizer and (``same_rows``: their
    logits are compared) agree, unless a token term sets ``vocab_align: truncate``."""
    n_tok = len(datamodule.load_tokenizer())
    sizes = {"student": getattr(student, "vocab_size", None)}
    if teacher is not None:
        sizes["teacher"] = getattr(teacher.network, "vocab_size", None)
    problems = [
        f"{k}: vocabulary of {v} rows is smaller than the tokenizer's {n_tok} tokens (data.tokenizer)"
        for k, v in sizes.items()
        if v is not None and v < n_tok
    ]
    if (
        same_rows
        and teacher is not None
        and None not in sizes.values()
        and sizes["student"] != sizes["teacher"]
    ):
        terms = (cfg.distill.get("terms") or {}).values()
        if not any(t.get("vocab_align") == "truncate" for t in terms if t):
            problems.append(
                f"teacher and student vocabularies differ ({sizes['teacher']} vs {sizes['student']}): "
                f"use the same tokenizer, or set vocab_align: truncate on the token KD term"
            )
    if problems:
        raise ConfigError(problems)


def check_pad_id(student, teacher, datamodule) -> None:
    """Encoders that find padding by token id must use the tokenizer's pad id."""
    want = datamodule.pad_token_id
    models = {"student": student, "teacher": teacher.network if teacher is not None else None}
    problems = [
        f"{key}.pad_token_id is {m.pad_token_id}, but the tokenizer pads with {want} (data.tokenizer)"
        for key, m in models.items()
        if m is not None and getattr(m, "pad_token_id", want) != want
    ]
    if problems:
        raise ConfigError(problems)


def build_run(cfg: DictConfig):
    """Validate the config, then build (datamodule, module, trainer, loggers)."""
    validate(cfg)
    import lightning as L
    from torch import nn

    from distillery.checkpoint import AtomicCheckpointIO
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
    output_kind = getattr(datamodule, "output_kind", "logits")
    if output_kind == "token_logits":  # language models: vocabularies
        check_vocab(cfg, student, teacher, datamodule)
    else:  # classifiers: logits [B, num_classes]; encoders: embeddings like the teacher's
        check_compatible(teacher, nn.Sequential(student_norm, student), example, num_classes)
        if output_kind == "embedding":
            check_vocab(cfg, student, teacher, datamodule, same_rows=False)
            check_pad_id(student, teacher, datamodule)
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

"""Dry-run checks before training: teacher, student and data must fit together.

Each failure is a :class:`~distillery.config.ConfigError` naming the config key, raised
before anything trains. Each task adapter's ``check_models`` picks its checks:
classifiers need ``[B, num_classes]`` outputs (:func:`check_compatible`), sentence
encoders outputs shaped like the teacher's plus vocabularies and pad ids that fit the
tokenizer (:func:`check_vocab`, :func:`check_pad_id`), language models vocabularies.
"""

from __future__ import annotations

from omegaconf import DictConfig

from distillery.config import ConfigError


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
        if vocab_align(cfg) != "truncate":
            problems.append(
                f"teacher and student vocabularies differ ({sizes['teacher']} vs {sizes['student']}): "
                f"use the same tokenizer, or set vocab_align: truncate on the token KD term"
            )
            if hasattr(datamodule, "load_teacher_tokenizer"):  # data that can pair tokenizers
                problems.append(
                    "if the teacher's tokenizer differs, name it in data.teacher_tokenizer "
                    "and distil with distillery.losses.ULD (distill=uld)"
                )
    if problems:
        raise ConfigError(problems)


def vocab_align(cfg) -> str:
    """``truncate`` when a token term of ``distill.terms`` sets ``vocab_align: truncate``
    (logits of different row counts compared over the shared rows), else ``error``."""
    terms = (cfg.get("distill") or {}).get("terms") or {}
    aligns = {t.get("vocab_align") for t in terms.values() if t is not None and hasattr(t, "get")}
    return "truncate" if "truncate" in aligns else "error"


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

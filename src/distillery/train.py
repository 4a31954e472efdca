"""Train a student (with or without a teacher): ``python -m distillery.train experiment=...``.

``teacher: null`` and a task-only objective train a plain model: that is how a
teacher is trained and how the no-teacher baseline runs. Same code path for all three.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from distillery.config import ConfigError, exit_on_config_error
from distillery.config.resolvers import CONFIG_DIR
from distillery.engine.builder import build_run

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (resuming from ``ckpt_path``), test the best checkpoint, export it.
    Returns the final metrics as floats plus ``best_ckpt``."""
    from distillery.engine.loggers import finish_loggers

    try:  # a missing file the config names (data.root, data.source, data.tokenizer, ...)
        datamodule, module, trainer, loggers = build_run(cfg)
    except FileNotFoundError as e:
        raise ConfigError([str(e)]) from e
    try:
        metrics = fit_test_export(cfg, datamodule, module, trainer)
    except FileNotFoundError as e:
        raise ConfigError([str(e)]) from e
    finally:
        finish_loggers(loggers)
    return {k: (float(v) if hasattr(v, "item") else v) for k, v in metrics.items()}


def fit(cfg: DictConfig, datamodule, module, trainer) -> None:
    """``trainer.fit``; SIGTERM / SIGUSR1 end it with ``last.ckpt`` and :class:`Interrupted`."""
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from distillery.engine.interrupt import Interrupted, sigusr1_as_sigterm

    with sigusr1_as_sigterm() as received:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        except SIGTERMException as e:
            callback = trainer.checkpoint_callback
            last = callback.last_model_path if callback and callback.last_model_path else None
            signum = received[0] if received else signal.SIGTERM
            raise Interrupted(signum, trainer.global_step, last) from e


def fit_test_export(cfg: DictConfig, datamodule, module, trainer) -> dict[str, Any]:
    from distillery.engine.checkpoint import export_artifact

    metrics: dict[str, Any] = {}
    if cfg.get("train", True):
        fit(cfg, datamodule, module, trainer)
        metrics.update(trainer.callback_metrics)
    callback = trainer.checkpoint_callback
    best = callback.best_model_path if callback else ""
    if cfg.get("test", True):
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update(trainer.callback_metrics)
    if cfg.get("export_ckpt") and trainer.is_global_zero:
        if trainer.fast_dev_run:
            raise ConfigError(
                ["export_ckpt: a fast_dev_run (debug=fdr) trains one batch and exports nothing"]
            )
        src = best or (callback.last_model_path if callback else "")
        if not src:
            raise RuntimeError(
                "export_ckpt is set but the run saved no checkpoint (callbacks disabled?)"
            )
        export_artifact(Path(src), Path(cfg.export_ckpt), module.run_config)
    metrics["best_ckpt"] = best
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from distillery.config.extras import apply_extras
    from distillery.engine.interrupt import Interrupted
    from distillery.evaluation.health import UnhealthyRun

    apply_extras(cfg)
    try:
        return exit_on_config_error(lambda: optimized_value(cfg, train(cfg)))
    except Interrupted as e:
        log.error(str(e))
        sys.exit(e.exit_code)
    except UnhealthyRun as e:  # health.stop_on
        log.error(str(e))
        sys.exit(3)


def optimized_value(cfg: DictConfig, metrics: dict[str, Any]) -> float | None:
    """The metric a sweeper optimises (``optimized_metric``), if set."""
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

"""Logger helpers: hyperparameters, W&B runs, Lightning's console lines, and which
training batches log more than the loss."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from distillery.config import to_record

log = logging.getLogger(__name__)


# Lightning lines a user has no use for: advertising, a note about our own callback, and
# a deprecation inside Lightning's code (not the user's).
NOISE = (
    "💡 Tip:",
    "Trainer already configured with model summary callbacks",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISE)


def single_lightning_log() -> None:
    """Lightning's package logger has a console handler of its own and also propagates to
    the root logger; under Hydra (root configured) every Lightning line was printed twice.
    With a configured root, drop Lightning's console handler: the root's console and the
    run's log file still get each line once. Lines in ``NOISE`` and Lightning's internal
    ``LeafSpec`` deprecation warning are not shown."""
    import warnings

    import lightning  # noqa: F401 - the handler is added on import

    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropNoise) for f in rank_zero.filters):
        rank_zero.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    if logging.getLogger().handlers:
        lightning_log = logging.getLogger("lightning")
        for handler in list(lightning_log.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_log.removeHandler(handler)


def log_hyperparameters(trainer, cfg: DictConfig, extra: dict[str, Any]) -> None:
    """Send the resolved config plus parameter counts to every logger."""
    if not trainer.loggers:
        return
    hparams = to_record(cfg)  # resolved, no credentials
    hparams.update({k: v for k, v in extra.items() if v is not None})
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)


def finish_loggers(loggers: list[Any]) -> None:
    """Close W&B runs so each job of a multirun gets its own run."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish()


def logs_this_batch(trainer, batch_idx: int) -> bool:
    """Whether a training batch logs its terms (``train/loss/<term>``,
    ``train/weight/<term>``; ``train/loss`` is logged every batch), asked in
    ``on_train_batch_end``: on the batches whose metrics the logger writes
    (``trainer.log_every_n_steps``; every batch under ``fast_dev_run`` or once the run
    is stopping) and on the run's last batch, so ``callback_metrics`` end with them. Why:
    every ``self.log`` call costs time on CPU (Lightning moves its result metric to the
    device on every call), which showed in a small model's KD step with two terms (its
    cost is not measured in a results file: benchmarks/results/README.md, "Numbers
    awaiting a re-run"). (An early stop decided by a validation inside the epoch comes
    after the logger's write: the terms then end at the last written step.)"""
    if trainer is None or trainer.fast_dev_run or trainer.should_stop:
        return True
    connector = getattr(trainer, "_logger_connector", None)  # as Lightning's own callbacks
    if connector is None or connector.should_update_logs:
        return True
    if 0 <= trainer.max_steps <= trainer.global_step:  # this batch made the last step
        return True
    epochs = trainer.max_epochs
    if epochs is None or not 0 <= epochs <= trainer.current_epoch + 1:
        return False
    n = trainer.num_training_batches
    last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch  # loaders of no length
    return last or (n != float("inf") and batch_idx + 1 >= n)

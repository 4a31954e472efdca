"""Callbacks of the project's configs."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.callbacks import RichProgressBar


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ModelCheckpoint, plus: ``last.ckpt`` always holds where training stopped.

    Lightning writes ``last.ckpt`` after validation, so a step-based run that stops
    between validations would resume from an earlier step. Here ``last.ckpt`` is also
    written at the run's last step (at ``on_train_batch_end`` when ``max_steps`` is
    reached, while the loops still place it inside its epoch, so the resumed run continues
    that epoch exactly), at the end of training, and when a signal interrupts the run
    (Lightning's ``SIGTERMException``). Never under ``fast_dev_run``: a smoke test writes
    no checkpoint.

    Writing that ``last.ckpt`` does not count as this step's save: the validation that
    follows a step-based run's last batch is still scored for top-k, so ``test`` (which
    loads ``best_model_path``) sees the final validation too (the bug fixed in 541db6f);
    only Lightning's own ``last.ckpt`` at that step is skipped."""

    _last_step_here = -1  # the step of the last last.ckpt written by this class

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if 0 < trainer.max_steps <= trainer.global_step:
            self._save_last_here(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save_last_here(trainer)  # (Lightning 2.6's own would save under fast_dev_run)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if type(exception).__name__ == "SIGTERMException":
            self._save_last_here(trainer)

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        # after ours at this step, with nothing new to score (no validation ran): as before
        if self._last_step_here == trainer.global_step and self.monitor not in monitor_candidates:
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        if self._last_step_here != trainer.global_step:  # else: ours, inside its epoch, stays
            super()._save_last_checkpoint(trainer, monitor_candidates)

    def _save_last_here(self, trainer) -> None:
        if not self.save_last or not self.dirpath or trainer.fast_dev_run:
            return
        step = trainer.global_step
        if trainer.sanity_checking or step in (self._last_global_step_saved, self._last_step_here):
            return
        path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        # Not Lightning's ``_last_global_step_saved``: a validation at this same step (the
        # last one of a step-based run comes after this batch end) must still be scored
        # and saved as a top-k candidate, or ``test`` would load an earlier "best"; only
        # Lightning's own last.ckpt at this step is skipped (``_save_last_checkpoint``).
        self.last_model_path, self._last_step_here = str(path), step


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar; a step-based run (``max_epochs: -1``) shows
    ``Epoch 74``, not ``Epoch 74/-2``."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            return f"Epoch {current_epoch}".ljust(len(self.validation_description))
        return super()._get_train_description(current_epoch)

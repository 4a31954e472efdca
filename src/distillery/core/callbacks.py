"""Callbacks of the project's configs."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ModelCheckpoint, plus: ``last.ckpt`` holds the end of training.

    Lightning writes ``last.ckpt`` after validation, so a step-based run that stops
    between validations (or whose final validation triggered no save) would resume
    from an earlier step. On ``on_train_end`` the final state is saved as last too, never
    under ``fast_dev_run`` (a smoke test writes no checkpoint)."""

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return  # Lightning 2.6 saves last.ckpt here even under fast_dev_run
        super().on_train_end(trainer, pl_module)
        if not self.save_last or not self.dirpath:
            return
        if self._last_global_step_saved == trainer.global_step:
            return
        path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        self.last_model_path, self._last_global_step_saved = str(path), trainer.global_step

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Interrupted by a signal (Lightning's ``SIGTERMException``): write ``last.ckpt``
        where the run stopped, atomically, so it resumes from there."""
        super().on_exception(trainer, pl_module, exception)
        if type(exception).__name__ != "SIGTERMException" or not self.dirpath:
            return
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        self.last_model_path, self._last_global_step_saved = str(path), trainer.global_step

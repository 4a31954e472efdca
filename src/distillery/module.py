"""The LightningModule: orchestrates teacher, student and objective.

Batch flow (training): raw inputs -> teacher (no_grad, eval) and student ->
:class:`~distillery.objective.Outputs` -> objective (named loss terms) -> total loss.
The teacher is a submodule (it follows the device) but never enters the optimizer
or the checkpoint: ``state_dict`` drops it and ``load_state_dict`` refills it from
the live teacher, so a student checkpoint loads with or without one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from distillery.checkpoint import META_KEY
from distillery.data.batch import merge_sources
from distillery.eval_metrics import ClassificationMetrics
from distillery.objective import Objective, Outputs
from distillery.preprocess import InputNorm
from distillery.taps import Taps
from distillery.teacher import Teacher
from distillery.views import Views

TEACHER_PREFIX = "teacher."


class DistillationModule(L.LightningModule):
    def __init__(
        self,
        student: nn.Module,
        objective: Objective,
        optimizer: Callable[..., torch.optim.Optimizer],
        num_classes: int | None,
        teacher: Teacher | None = None,
        scheduler: Callable[..., Any] | None = None,
        student_norm: InputNorm | None = None,
        views: Views | None = None,
        student_taps: Taps | None = None,
        teacher_taps: Taps | None = None,
        run_config: dict | None = None,
        eval_metrics: Callable[..., nn.Module] | None = None,
    ):
        """``eval_metrics(num_classes, with_teacher)`` builds the validation/test metrics
        (``distillery.eval_metrics``); default ``ClassificationMetrics``."""
        super().__init__()
        if objective.needs_teacher and teacher is None:
            needing = [n for n, t in objective.terms.items() if t.needs_teacher]
            raise ValueError(f"distill.terms {needing} need a teacher, but `teacher` is null")
        if teacher is not None and not isinstance(teacher, Teacher):
            raise TypeError(
                f"teacher: expected a distillery.teacher.Teacher, got {type(teacher).__name__}"
            )
        self.student = student
        self.student_norm = student_norm if student_norm is not None else InputNorm()
        self.teacher = teacher
        self.objective = objective
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.views = views
        self.student_taps, self.teacher_taps = student_taps, teacher_taps
        self.num_classes = num_classes
        self.run_config = run_config or {}
        metrics = eval_metrics or ClassificationMetrics
        self.val_metrics = metrics(num_classes, teacher is not None)
        self.test_metrics = metrics(num_classes, teacher is not None)

    def forward(self, x: Tensor) -> Tensor:
        return self.student(self.student_norm(x))

    def _forward_both(
        self, x: Tensor, x_teacher: Tensor, capture: bool = True
    ) -> tuple[Tensor, Tensor | None, dict]:
        """Student and teacher logits plus, with ``capture``, the features their taps
        captured (evaluation passes ``capture=False``: no feature term reads them there)."""
        self.start_capture(capture)
        teacher_logits = self.teacher(x_teacher) if self.teacher is not None else None
        logits = self(x)
        return logits, teacher_logits, self.captured()

    # --- taps: registered once, removed on teardown and on exceptions -----------
    def start_capture(self, capture: bool) -> None:
        """Clear the taps before a forward; ``capture=False`` keeps them silent."""
        for t in (self.student_taps, self.teacher_taps):
            if t:
                t.clear()
                t.active = capture

    def captured(self) -> dict:
        """``{student_features, teacher_features}`` of the last forward ({} without taps)."""
        taps = [t for t in (self.student_taps, self.teacher_taps) if t]
        if not taps or not all(t.active for t in taps):
            return {}
        return {
            "student_features": self.student_taps.captured if self.student_taps else {},
            "teacher_features": self.teacher_taps.captured if self.teacher_taps else {},
        }

    def setup(self, stage: str) -> None:
        for t in (self.student_taps, self.teacher_taps):
            if t:
                t.attach()

    def teardown(self, stage: str) -> None:
        self.remove_taps()

    def remove_taps(self) -> None:
        for t in (self.student_taps, self.teacher_taps):
            if t:
                t.remove()

    def configure_callbacks(self):
        return [RemoveTapsOnException()] if (self.student_taps or self.teacher_taps) else []

    # --- steps -----------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> Tensor:
        batch = merge_sources(batch)
        x, labels, targets = batch["inputs"], batch["labels"], None
        x_teacher = x
        if self.views is not None:  # augmentation / mixing, once per batch
            x, x_teacher, labels, targets = self.views(x, labels, self.num_classes)
        logits, teacher_logits, extras = self._forward_both(x, x_teacher)
        n_batches = self.trainer.num_training_batches if self._trainer is not None else 0
        progress = batch_idx / n_batches if n_batches and n_batches != float("inf") else 0.0
        epoch = self.current_epoch + progress
        if extras:
            extras["sample_id"] = batch["sample_id"]
            if "attention_mask" in batch:  # token inputs: feature terms skip the padding
                extras["token_mask"] = batch["attention_mask"]
        out = Outputs(logits, labels, teacher_logits, epoch=epoch, targets=targets, extras=extras)
        total, terms = self.objective(out)
        bs = x.shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        for name, value in terms.items():
            self.log(f"train/loss/{name}", value, batch_size=bs)
            if callable(self.objective.weights[name]):  # scheduled weights are logged too
                self.log(
                    f"train/weight/{name}", self.objective.current_weights[name], batch_size=bs
                )
        return total

    def _eval_step(self, batch, metrics: nn.Module, stage: str) -> None:
        x, labels = batch["inputs"], batch["labels"]
        logits, teacher_logits, _ = self._forward_both(x, x, capture=False)
        metrics.update(logits, labels, teacher_logits, batch.get("sample_id"))
        for i, (name, metric) in enumerate(metrics.items()):
            self.log(f"{stage}/{name}", metric, prog_bar=i == 0, batch_size=x.shape[0])

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    # --- optimisation ----------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student and objective parameters; the teacher's are excluded by construction."""
        params = list(self.student.parameters()) + list(self.objective.parameters())
        return [p for p in params if p.requires_grad]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        # Step-based schedules (distillery.schedules) say so; torch's own step per epoch.
        interval = getattr(scheduler, "interval", "epoch")
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval},
        }

    # --- checkpoints: never the teacher ----------------------------------------
    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "") + TEACHER_PREFIX
        for k in [k for k in sd if k.startswith(prefix)]:
            del sd[k]
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        stray = [k for k in state_dict if k.startswith(TEACHER_PREFIX)]
        if stray:
            raise ValueError(
                f"checkpoint holds teacher weights ({stray[:3]}...); refusing to load them"
            )
        if self.teacher is not None:
            state_dict = {
                **state_dict,
                **self.teacher.state_dict(prefix=TEACHER_PREFIX, keep_vars=True),
            }
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[META_KEY] = {
            "format": 1,
            "config": self.run_config,
            "teacher": None if self.teacher is None else dict(self.teacher.provenance),
            "params": {
                "student": count_params(self.student),
                "teacher": None if self.teacher is None else count_params(self.teacher),
            },
        }


class RemoveTapsOnException(L.Callback):
    """Lightning skips ``teardown`` when a run raises; drop the hook handles anyway."""

    def on_exception(self, trainer, pl_module, exception) -> None:
        pl_module.remove_taps()


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

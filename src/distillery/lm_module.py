"""The LightningModule for causal language models (token-level distillation).

Same teacher contract and checkpoint rules as :class:`DistillationModule` (teacher
frozen, outside optimizer and checkpoint). Training uses manual optimisation over
``dataloader_iter`` so that every optimizer step first pulls its ``accumulate``
micro-batches, counts their valid tokens (summed over DDP ranks) and normalises every
term by that step-level count: padding and accumulation leave the loss unchanged.
Taps (``taps.student/teacher``) capture hidden states or attention maps during training
forwards for the objective's feature terms (see ``TokenObjective``).
Validation/test log ``nll`` (per token), ``ppl`` = exp(nll) and, with a teacher,
``agreement`` (top-1 next-token agreement) and ``kl_to_teacher`` (per token, T = 1).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from distillery.eval_metrics import IGNORE, LMMetrics
from distillery.losses.token import TokenObjective
from distillery.module import DistillationModule
from distillery.preprocess import InputNorm
from distillery.taps import Taps
from distillery.teacher import Teacher


class LMDistillationModule(DistillationModule):
    def __init__(
        self,
        student: nn.Module,
        objective: TokenObjective,
        optimizer,
        teacher: Teacher | None = None,
        scheduler=None,
        accumulate: int = 1,
        gradient_clip_val: float | None = 1.0,
        student_taps: Taps | None = None,
        teacher_taps: Taps | None = None,
        run_config: dict | None = None,
        **unused: Any,
    ):
        L.LightningModule.__init__(self)
        if objective.needs_teacher and teacher is None:
            raise ValueError("distill.terms need a teacher, but `teacher` is null")
        if accumulate < 1:
            raise ValueError(f"module.accumulate must be >= 1, got {accumulate}")
        self.automatic_optimization = False
        self.student, self.teacher, self.objective = student, teacher, objective
        self.student_norm = InputNorm()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.accumulate, self.gradient_clip_val = accumulate, gradient_clip_val
        self.views = None
        self.student_taps, self.teacher_taps = student_taps, teacher_taps
        self.run_config = run_config or {}
        self.val_metrics, self.test_metrics = (
            LMMetrics(teacher is not None),
            LMMetrics(teacher is not None),
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.student(input_ids, attention_mask)

    def _logits(self, batch, capture: bool = False) -> tuple[Tensor, Tensor | None, dict]:
        """Student and teacher logits and, with ``capture``, the taps' captures."""
        self.start_capture(capture)
        teacher = self.teacher(batch["input_ids"]) if self.teacher is not None else None
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        extras = self.captured()
        if extras and "attention_mask" in batch:  # padding keys of relation terms
            extras["attention_mask"] = batch["attention_mask"]
        return logits, teacher, extras

    def training_step(self, dataloader_iter) -> None:
        batches = []
        for _ in range(self.accumulate):
            try:
                batch, _, _ = next(dataloader_iter)
            except StopIteration:
                break
            batches.append(batch)
        if not batches:
            raise StopIteration
        local = sum((b["labels"] != IGNORE).sum() for b in batches).to(self.device, torch.float32)
        world = self.trainer.world_size
        step_tokens = (
            self.trainer.strategy.reduce(local.clone(), reduce_op="sum") if world > 1 else local
        )
        opt = self.optimizers()
        opt.zero_grad()
        sums: dict[str, Tensor] = {}
        for b in batches:
            logits, teacher_logits, extras = self._logits(b, capture=True)
            total, values = self.objective(logits, teacher_logits, b["labels"], step_tokens, extras)
            self.manual_backward(total * world)  # DDP averages gradients over ranks
            for k, v in {"loss": total, **{f"loss/{n}": x for n, x in values.items()}}.items():
                sums[k] = sums.get(k, 0.0) + v.detach()
        if self.gradient_clip_val:
            self.clip_gradients(
                opt, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm"
            )
        opt.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None and getattr(scheduler, "interval", "epoch") == "step":
            scheduler.step()
        n = sum(len(b["input_ids"]) for b in batches)
        for k, v in sums.items():
            self.log(f"train/{k}", v, prog_bar=k == "loss", batch_size=n)
        self.log("train/tokens", step_tokens, batch_size=n)

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None and getattr(scheduler, "interval", "epoch") == "epoch":
            scheduler.step()

    def _eval(self, batch, metrics: LMMetrics, stage: str) -> None:
        logits, teacher_logits, _ = self._logits(batch)
        metrics.update(logits, batch["labels"], teacher_logits)
        self.log(f"{stage}/nll", metrics.nll, prog_bar=True)
        if metrics.with_teacher:
            self.log(f"{stage}/agreement", metrics.agreement)
            self.log(f"{stage}/kl_to_teacher", metrics.kl_to_teacher)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval(batch, self.test_metrics, "test")

    def on_validation_epoch_end(self) -> None:
        self.log("val/ppl", torch.exp(self.val_metrics.nll.compute()))

    def on_test_epoch_end(self) -> None:
        self.log("test/ppl", torch.exp(self.test_metrics.nll.compute()))

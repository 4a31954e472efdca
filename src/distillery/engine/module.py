"""The LightningModule: one for every modality; it orchestrates, the pieces compute.

Batch flow (training): batch -> task adapter (``tasks``: views, teacher and
student forwards, masks) -> :class:`~distillery.contract.Outputs` -> objective
(named terms, one reduction) -> total loss -> optimizer step. What the module owns is
what every run shares:

* frozen models: the teacher, and any further frozen model (``frozen``: a DPO
  reference, more teachers), each a :class:`~distillery.engine.teacher.Teacher`
  (eval-locked, no_grad). They are submodules (they follow the device) but never enter
  the optimizer or the checkpoint: ``state_dict`` drops them and ``load_state_dict``
  refills them from the live models; the checkpoint records their provenance instead;
* the taps' lifecycle (attached in ``setup``, cleared before each forward, removed on
  teardown and on exceptions);
* optimisation: automatic (Lightning's loop) unless the task normalises by a count over
  the whole optimizer step (``task.step_normalised``, language models): then the module
  collects ``accumulate`` micro-batches, counts their units (summed over DDP ranks),
  and runs backward, clipping, the optimizer and step-based schedules itself;
* logging: ``train/loss`` every batch; ``train/loss/<term>`` and ``train/weight/<term>``
  (scheduled weights) on the logger's cadence and the last batch (every optimizer step
  when step-normalised); ``val|test/<metric>`` from the task's metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from distillery.contract import IGNORE
from distillery.engine.checkpoint import FORMAT, META_KEY
from distillery.engine.guards import NonFiniteGuard
from distillery.engine.loggers import logs_this_batch
from distillery.engine.taps import Taps
from distillery.engine.teacher import Teacher
from distillery.losses.objective import Objective
from distillery.models.input_norm import InputNorm
from distillery.recipes.views import Views
from distillery.tasks import ClassificationTask, Task

RESERVED = ("student", "student_norm", "objective", "views", "task")


class DistillationModule(L.LightningModule):
    def __init__(
        self,
        student: nn.Module,
        objective: Objective,
        optimizer: Callable[..., torch.optim.Optimizer],
        task: Task | None = None,
        num_classes: int | None = None,
        teacher: Teacher | None = None,
        frozen: Mapping[str, Teacher] | None = None,
        scheduler: Callable[..., Any] | None = None,
        student_norm: InputNorm | None = None,
        views: Views | None = None,
        student_taps: Taps | None = None,
        teacher_taps: Taps | None = None,
        run_config: dict | None = None,
        accumulate: int = 1,
        gradient_clip_val: float | None = None,
        nan_policy: str = "raise",
        max_skipped_share: float = 0.01,
        compile: bool | Mapping[str, Any] = False,
        log_health: bool = False,
    ):
        """``task``: the adapter (default classification). ``accumulate`` and
        ``gradient_clip_val`` apply to step-normalised tasks, which optimise manually;
        other tasks use ``trainer.accumulate_grad_batches`` / ``trainer.gradient_clip_val``.
        ``nan_policy`` / ``max_skipped_share``: see ``distillery.engine.guards``.
        ``compile``: ``torch.compile`` the student's and the frozen models' forwards in
        place (``nn.Module.compile``: parameter names, checkpoints and taps unchanged;
        the taps' hooks are attached first, so the compiled graphs run them); ``true``
        or the keyword arguments of ``torch.compile`` (e.g. ``{mode: max-autotune}``).
        ``log_health``: log ``train/health/*`` (``evaluation/health.py``) of token-level
        tasks on the logger's cadence (``health.log``)."""
        super().__init__()
        self.task = task if task is not None else ClassificationTask()
        if objective.needs_teacher and teacher is None:
            needing = [n for n, t in objective.terms.items() if t.needs_teacher]
            raise ValueError(f"distill.terms {needing} need a teacher, but `teacher` is null")
        self.frozen_names: list[str] = []
        taken = {*RESERVED, "teacher", *dir(self)}  # attributes of the module, properties too
        for name in frozen or {}:
            if name in taken:
                raise ValueError(
                    f"frozen.{name}: {name!r} is taken by the module; choose another name"
                )
        for name, model in {"teacher": teacher, **dict(frozen or {})}.items():
            if model is None:
                continue
            key = "teacher" if name == "teacher" else f"frozen.{name}"
            if not isinstance(model, Teacher):
                raise TypeError(
                    f"{key}: expected a distillery.engine.teacher.Teacher, got {type(model).__name__}"
                )
            self.frozen_names.append(name)
        self.student = student
        self.student_norm = student_norm if student_norm is not None else InputNorm()
        self.teacher = teacher
        for name, model in (frozen or {}).items():
            setattr(self, name, model)
        self.objective = objective
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.views = views
        self.student_taps, self.teacher_taps = student_taps, teacher_taps
        self.num_classes = num_classes
        self.run_config = run_config or {}
        if accumulate < 1:
            raise ValueError(f"module.accumulate must be >= 1, got {accumulate}")
        if not self.task.step_normalised and (accumulate != 1 or gradient_clip_val):
            raise ValueError(
                f"module.accumulate / module.gradient_clip_val are for step-normalised tasks; the "
                f"{self.task.name} task uses trainer.accumulate_grad_batches / trainer.gradient_clip_val"
            )
        self.automatic_optimization = not self.task.step_normalised
        self.accumulate, self.gradient_clip_val = accumulate, gradient_clip_val
        self._pending: list[dict] = []  # micro-batches of the step being collected
        self._unlogged: tuple | None = None  # this batch's terms, until on_train_batch_end
        self.nan_guard = NonFiniteGuard(nan_policy, max_skipped_share)
        self.compile_kwargs = (
            None if compile is False else ({} if compile is True else dict(compile))
        )
        self.log_health = log_health and self.task.reduction == "token"
        self._health_due = False
        self._top_k = None
        if self.log_health:
            from distillery.evaluation.health import cache_top_k

            self._top_k = cache_top_k(teacher)
        self.task.check(self)
        self.val_metrics = self.task.metrics(num_classes, teacher is not None)
        self.test_metrics = self.task.metrics(num_classes, teacher is not None)

    def forward(self, x: Tensor, *args) -> Tensor:
        return self.student(self.student_norm(x), *args)

    def forward_both(
        self, student_args: tuple, teacher_input: Tensor, capture: bool, head: bool = False
    ) -> tuple[Tensor, Tensor | None, dict]:
        """Teacher and student outputs plus, with ``capture``, the features their taps
        captured (evaluation passes ``capture=False``: no feature term reads them there);
        ``teacher_input=None`` skips the teacher.
        ``head``: their last hidden states and output layers instead (``HeadOutputs``,
        for fused token losses)."""
        self.start_capture(capture)
        if not head:  # teacher_input None: no term reads the teacher's outputs of this batch
            run = self.teacher is not None and teacher_input is not None
            teacher = self.teacher(teacher_input) if run else None
            return self(*student_args), teacher, self.captured()
        teacher = None if self.teacher is None else self.teacher.hidden_and_head(teacher_input)
        x, *rest = student_args
        return self.student.hidden_and_head(self.student_norm(x), *rest), teacher, self.captured()

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
        teacher = self.teacher_taps.captured if self.teacher_taps else {}
        if self.teacher is not None and self.teacher.dtype is not None:  # low-precision teacher
            teacher = {k: v.float() if torch.is_tensor(v) else v for k, v in teacher.items()}
        return {
            "student_features": self.student_taps.captured if self.student_taps else {},
            "teacher_features": teacher,
        }

    def configure_model(self) -> None:
        """Sharding strategies shard the models here (``engine/sharding.py``: the student
        per block, frozen models in their own units or replicated); then ``compile``
        (Lightning calls ``setup``, which attaches the taps, before this hook)."""
        from distillery.engine.sharding import configure_sharding

        if self._trainer is not None:
            configure_sharding(self, self.trainer.strategy)
        if self.compile_kwargs is not None and not getattr(self, "_compiled", False):
            frozen = [getattr(self, n).model for n in self.frozen_names]
            for model in (self.student, *frozen):
                if any(True for _ in model.parameters()):  # a teacher cache: nothing to compile
                    model.compile(**self.compile_kwargs)  # after the taps' hooks and sharding
            self._compiled = True

    def setup(self, stage: str) -> None:
        for t in (self.student_taps, self.teacher_taps):
            if t:
                t.attach()

    def teardown(self, stage: str) -> None:
        self.remove_taps()
        self.flush_teacher()

    def flush_teacher(self) -> None:
        """A remote teacher writes the rows it was asked for to its cache
        (``teacher_cache/remote_store.py``): at the end of a stage and with every checkpoint."""
        flush = getattr(getattr(self.teacher, "network", None), "flush", None)
        if callable(flush):
            flush()

    def remove_taps(self) -> None:
        for t in (self.student_taps, self.teacher_taps):
            if t:
                t.remove()

    def configure_callbacks(self):
        return [RemoveTapsOnException()] if (self.student_taps or self.teacher_taps) else []

    # --- training ----------------------------------------------------------------
    def _epoch(self, batch_idx: int) -> float:
        """Fractional epoch, for warmups and weight schedules."""
        n = self.trainer.num_training_batches if self._trainer is not None else 0
        return self.current_epoch + (batch_idx / n if n and n != float("inf") else 0.0)

    def _log_loss(self, total: Tensor, batch_size: int, shares: bool = False) -> None:
        """Log the step's loss over all processes: the mean of the ranks' batch means, or
        with ``shares`` (step-normalised: each rank holds its share of the step's loss)
        their sum."""
        sync = {"sync_dist": True, "reduce_fx": "sum" if shares else "mean"}
        self.log("train/loss", total, prog_bar=True, batch_size=batch_size, **sync)

    def _log_terms(
        self, values: dict, weights: dict, batch_size: int, shares: bool = False
    ) -> None:
        """Log the step's terms (reduced like :meth:`_log_loss`) and scheduled weights."""
        sync = {"sync_dist": True, "reduce_fx": "sum" if shares else "mean"}
        for name, value in values.items():
            self.log(f"train/loss/{name}", value, batch_size=batch_size, **sync)
        for name, w in weights.items():
            self.log(f"train/weight/{name}", w, batch_size=batch_size)

    def _scheduled_weights(self) -> dict:
        return {n: self.objective.current_weights[n] for n in self.objective.scheduled}

    def _observe_health(self, out, batch: dict) -> None:
        """``train/health/*`` of a batch the logger writes (``evaluation/health.py``)."""
        if not self._health_due:
            return
        from distillery.evaluation.health import sampled_tokens, token_signals

        mask = out.extras.get("token_mask")
        mask = out.labels != IGNORE if mask is None else mask
        if not torch.is_tensor(out.student) or not mask.any():
            return
        teacher = out.teacher if torch.is_tensor(out.teacher) else None
        signals = token_signals(out.student, teacher, mask, sampled_tokens(batch), self._top_k)
        for name, value in signals.items():
            self.log(f"train/health/{name}", value.mean(), batch_size=len(out.student))

    def training_step(self, batch, batch_idx: int) -> Tensor | None:
        self._health_due = self.log_health and logs_this_batch(self._trainer, batch_idx)
        if self.automatic_optimization:
            batch = self.task.prepare_batch(self, batch)
            out = self.task.training_outputs(self, batch, self._epoch(batch_idx))
            self._observe_health(out, batch)
            total, values = self.objective(out)
            self._unlogged = None
            if self.nan_guard.skip(self, total, values, batch):
                return None  # Lightning then skips backward and the optimizer step
            self._log_loss(total, len(out.student))
            detached = {k: v.detach() for k, v in values.items()}
            self._unlogged = (detached, self._scheduled_weights(), len(out.student))
            return total
        self._pending.append(batch)
        n = self.trainer.num_training_batches
        last = n != float("inf") and batch_idx + 1 >= n  # the epoch's last batch: step now
        if len(self._pending) < self.accumulate and not last:
            return None
        batches, self._pending = self._pending, []
        self._manual_step(batches, self._epoch(batch_idx))
        return None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Log the terms of an automatically optimised step on the batches the logger
        writes and the run's last (``engine/loggers.py: logs_this_batch``: every
        ``self.log`` call costs time on CPU, not measured in a results file; decided here,
        after the callbacks' hooks, so a callback that stops the run on this batch is
        seen). The step-normalised path logs them with every optimizer step."""
        if self._unlogged is not None and logs_this_batch(self._trainer, batch_idx):
            self._log_terms(*self._unlogged)
        self._unlogged = None

    def _manual_step(self, batches: list[dict], epoch: float) -> None:
        """One optimizer step over ``batches``, every term divided by the step's count."""
        batches = [self.task.prepare_batch(self, b) for b in batches]  # before counting
        step_count = self._step_units(batches)
        world = self.trainer.world_size
        opt = self.optimizers()
        opt.zero_grad()
        sums: dict[str, Tensor] = {}
        rows = 0
        for i, b in enumerate(batches):
            out = self.task.training_outputs(self, b, epoch)
            if i == len(batches) - 1:
                self._observe_health(out, b)
            total, values = self.objective(out, step_count)
            self.manual_backward(total * world)  # DDP averages gradients over ranks
            for k, v in {"": total, **values}.items():
                sums[k] = sums.get(k, 0.0) + v.detach()
            rows += len(out.student)
        step_total = sums.pop("")
        # one non-finite check per optimizer step (a sum is non-finite iff a part is)
        if self.nan_guard.skip(self, step_total, sums, {str(i): b for i, b in enumerate(batches)}):
            opt.zero_grad()  # the whole step is dropped: no step, no schedule
            return
        if self.gradient_clip_val:
            self.clip_gradients(
                opt, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm"
            )
        opt.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None and getattr(scheduler, "interval", "epoch") == "step":
            scheduler.step()
        self._log_loss(step_total, rows, shares=True)
        self._log_terms(sums, self._scheduled_weights(), rows, shares=True)
        self.log("train/tokens", step_count["token"], batch_size=rows)

    def _step_units(self, batches: list[dict]) -> dict[str, Tensor]:
        """The step's normalisers: each unit the task counts (``token``; ``pair`` for
        preference batches) summed over the micro-batches and the processes."""
        counts = [self.task.count(b) for b in batches]
        counts = [c if isinstance(c, Mapping) else {"token": c} for c in counts]
        units = sorted({u for c in counts for u in c})
        local = torch.stack([
            sum(torch.as_tensor(c.get(u, 0)) for c in counts).to(self.device, torch.float32)
            for u in units
        ])  # fmt: skip
        if self.trainer.world_size > 1:
            local = self.trainer.strategy.reduce(local.clone(), reduce_op="sum")
        return dict(zip(units, local, strict=True))

    def on_train_start(self) -> None:
        """A training loader with no batch in this process trains nothing, silently: refuse.
        ``nan_policy=skip`` with automatic optimisation under DDP: Lightning refuses skipped
        steps there, so refuse it before the first NaN does."""
        if self.nan_guard.policy == "skip" and self.automatic_optimization:
            if self.trainer.world_size > 1:
                raise ValueError(
                    "module.nan_policy: skip is not supported by Lightning under DDP with "
                    "automatic optimisation; use raise"
                )
        loader = self.trainer.fit_loop._combined_loader
        empty = [
            f"{type(dl.dataset).__name__}: {len(dl.sampler)} samples per process, batch size {dl.batch_size}"
            for dl in (loader.flattened if loader is not None else [])
            if hasattr(dl, "__len__") and len(dl) == 0
        ]
        if empty:
            raise ValueError(
                f"data: a training loader has no batch in this process ({'; '.join(empty)}); "
                f"lower data.batch_size / data.transfer_batch_size or add samples"
            )

    def on_train_epoch_end(self) -> None:
        if self.automatic_optimization:
            return  # Lightning steps the schedulers
        if self._pending:  # only when the loader's length is unknown (no last batch seen)
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"{len(self._pending)} micro-batch(es) at the end of the epoch did not fill an "
                f"optimizer step of module.accumulate={self.accumulate} and were not trained on"
            )
            self._pending = []
        scheduler = self.lr_schedulers()
        if scheduler is not None and getattr(scheduler, "interval", "epoch") == "epoch":
            scheduler.step()

    # --- validation / test -------------------------------------------------------
    def _eval_step(self, batch, metrics: nn.Module, stage: str) -> None:
        out = self.task.eval_outputs(self, batch)
        metrics.update(out.student, out.labels, out.teacher, out.extras.get("sample_id"))
        for i, (name, metric) in enumerate(metrics.items()):
            self.log(f"{stage}/{name}", metric, prog_bar=i == 0, batch_size=len(out.student))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    # --- optimisation ----------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student and objective parameters; frozen models are excluded by construction."""
        params = list(self.student.parameters()) + list(self.objective.parameters())
        return [p for p in params if p.requires_grad]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        # Step-based schedules (distillery.recipes.schedules) say so; torch's own step per epoch.
        interval = getattr(scheduler, "interval", "epoch")
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval},
        }

    # --- checkpoints: never a frozen model -----------------------------------------
    def _frozen_prefixes(self, prefix: str = "") -> tuple[str, ...]:
        return tuple(f"{prefix}{name}." for name in (*self.frozen_names, "teacher"))

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        prefixes = self._frozen_prefixes(kwargs.get("prefix", ""))
        for k in [k for k in sd if k.startswith(prefixes)]:
            del sd[k]
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        stray = [k for k in state_dict if k.startswith(self._frozen_prefixes())]
        if stray:
            raise ValueError(
                f"checkpoint holds teacher weights ({stray[:3]}...: the teacher or another "
                f"frozen model); refusing to load them"
            )
        for name in self.frozen_names:
            state_dict = {
                **state_dict,
                **getattr(self, name).state_dict(prefix=f"{name}.", keep_vars=True),
            }
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume exactly: the random states training consumes (dropout, views) and the
        micro-batches of an optimizer step still being collected."""
        if "rng" in checkpoint:  # one process's states: restored in single-process runs
            set_rng_states(checkpoint["rng"])
        self._pending = list(checkpoint.get("pending_batches", []))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.flush_teacher()  # a resumed run then asks a remote teacher nothing twice
        if self._trainer is None or self.trainer.world_size == 1:  # rank 0's alone otherwise
            checkpoint["rng"] = rng_states()
            if self._pending:
                checkpoint["pending_batches"] = list(self._pending)
        extra = [n for n in self.frozen_names if n != "teacher"]
        checkpoint[META_KEY] = {
            "format": FORMAT,
            "config": self.run_config,
            "teacher": None if self.teacher is None else dict(self.teacher.provenance),
            "frozen": {n: dict(getattr(self, n).provenance) for n in extra},
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


def rng_states() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python random states, as tensors and plain values
    (a checkpoint loads with ``weights_only=True``)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():  # as many devices as this machine has
        for device, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)

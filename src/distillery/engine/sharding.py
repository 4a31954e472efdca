"""FSDP2 for distillation: the student sharded per block, the frozen teacher in its own
units (or replicated), checkpoints holding the student alone.

``trainer=fsdp2`` (GPUs) and ``trainer=fsdp2_sim`` (2 CPU processes, gloo) use
:class:`FSDP2Strategy`, Lightning's ``ModelParallelStrategy`` restricted to data
parallelism, with the sharding plan as its arguments. ``DistillationModule.configure_model``
hands the module to :meth:`FSDP2Strategy.shard`, which calls
``torch.distributed.fsdp.fully_shard`` on:

1. every student module named by ``student_units`` (class names or module-path globs,
   e.g. ``[GPT2Block]`` or ``[model.transformer.h.*]``; ``null``: the blocks the
   Hugging Face model lists in ``_no_split_modules``, none for other models), innermost
   first, then the student itself;
2. the objective, when it has trainable parameters (projectors): their gradients are
   averaged over ranks like the student's;
3. each frozen model (the teacher, DPO references): ``teacher: shard`` gives it its own
   units (``teacher_units``, same rule) and root, so no teacher parameter is ever in a
   student unit; ``teacher: replicate`` leaves a full copy on every rank (a small teacher:
   its forward then needs no communication). Frozen models stay in eval mode, run under
   ``no_grad`` and are never in the optimizer (``DistillationModule.trainable_parameters``).

``teacher: replicate`` (and FSDP1, below) refuses frozen models larger than half of the
memory a process has free. Under FSDP1 (Lightning's ``FSDPStrategy``, ``trainer=fsdp``,
GPUs) the frozen models are ``ignored_modules`` of the root wrapper: replicated, outside
every flat parameter (:func:`configure_sharding`).

``param_dtype`` / ``reduce_dtype`` (``bf16``, ``fp16``, ``fp32`` or null) set the
student's ``MixedPrecisionPolicy`` (all-gathered parameters, gradient reduce-scatter).

Checkpoints: the full student state dict, gathered on rank 0 into one file (the same
format as a single-process run: ``load_student``, exports and ``evaluate`` read it
unchanged), written atomically. Resuming loads it back into the shards; a checkpoint
missing a student key (or holding a teacher key) is refused by name. Distributed
(per-rank) checkpoints are not offered: every consumer of a Distillery checkpoint reads
one file.

Reference: PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``); Lightning's
``ModelParallelStrategy`` (lightning.pytorch.strategies.model_parallel).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from distillery.config import ConfigError
from distillery.engine.checkpoint import AtomicCheckpointIO
from distillery.engine.taps import path_matches

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}
TEACHER_MODES = ("shard", "replicate")


def units(model: nn.Module, patterns: list[str] | None, key: str) -> list[nn.Module]:
    """The submodules to shard as units of ``model``, innermost first. ``patterns``: class
    names or module-path globs (relative to ``model``, as taps: ``*`` one path component,
    ``**`` any number); None: the Hugging Face model's
    ``_no_split_modules`` block classes (none for other models)."""
    given = patterns is not None
    if patterns is None:
        hf = next((m for m in model.modules() if getattr(m, "_no_split_modules", None)), None)
        patterns = list(hf._no_split_modules) if hf is not None else []
    chosen, used = [], set()
    for name, module in model.named_modules():
        if not name:
            continue  # the root is sharded last by the caller
        hit = [p for p in patterns if type(module).__name__ == p or path_matches(name, p)]
        if hit:
            chosen.append(module)
            used.update(hit)
    unused = [p for p in patterns if p not in used]
    if unused and given:  # a model's own _no_split_modules may name blocks it lacks
        raise ConfigError(
            [
                f"{key}: {unused} match no module (give class names, e.g. GPT2Block, or module "
                f"paths such as model.transformer.h.*)"
            ]
        )
    return chosen[::-1]  # children before their parents


class FSDP2Strategy(ModelParallelStrategy):
    """Data-parallel FSDP2 with a frozen teacher (see the module docstring)."""

    def __init__(
        self,
        student_units: list[str] | None = None,
        teacher: str = "shard",
        teacher_units: list[str] | None = None,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        **kwargs: Any,
    ):
        for key, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value not in DTYPES:
                raise ValueError(f"trainer.strategy.{key}: {value!r} is not one of {list(DTYPES)}")
        if teacher not in TEACHER_MODES:
            raise ValueError(f"trainer.strategy.teacher: {teacher!r} is not one of {TEACHER_MODES}")
        if kwargs.pop("save_distributed_checkpoint", False):
            raise ValueError(
                "trainer.strategy.save_distributed_checkpoint: not offered; Distillery "
                "checkpoints are one file (the student's full state dict, gathered on rank 0)"
            )
        super().__init__(save_distributed_checkpoint=False, **kwargs)
        self.student_units, self.teacher_units = student_units, teacher_units
        self.teacher_mode = teacher
        self.param_dtype, self.reduce_dtype = DTYPES[param_dtype], DTYPES[reduce_dtype]
        self.checkpoint_io = AtomicCheckpointIO()

    def setup_environment(self) -> None:
        # data parallel only: every process holds one shard of each unit
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard(self, module: nn.Module) -> None:
        """Apply the plan to a ``DistillationModule`` (idempotent: a second fit or test on
        the same module finds it sharded)."""
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        if isinstance(module.student, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)
        for unit in units(module.student, self.student_units, "trainer.strategy.student_units"):
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        shard_root(module.student, mesh, policy)
        if any(p.requires_grad for p in module.objective.parameters()):
            fully_shard(module.objective, mesh=mesh, mp_policy=policy)
        if self.teacher_mode == "replicate":
            check_replicate(
                module, self.root_device, self.num_processes, "trainer.strategy.teacher"
            )
        else:
            for name in module.frozen_names:
                frozen = getattr(module, name)
                key = "trainer.strategy.teacher_units"
                for unit in units(frozen, self.teacher_units, key):
                    fully_shard(unit, mesh=mesh)
                shard_root(frozen, mesh, MixedPrecisionPolicy())

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning loads a full checkpoint parameter by parameter and, when strict, wants
        every parameter of the module, frozen ones included, which a Distillery checkpoint
        never holds: check the student's keys here, then load without Lightning's check."""
        module = self.lightning_module
        path = Path(self.broadcast(checkpoint_path))
        if path.is_file() and module.strict_loading:
            saved = torch.load(path, mmap=True, map_location="cpu", weights_only=True)["state_dict"]
            wanted = set(module.state_dict())  # frozen models excluded
            missing, extra = sorted(wanted - set(saved)), sorted(set(saved) - wanted)
            if missing or extra:
                raise ValueError(
                    f"ckpt_path: {path} does not match the student: missing {missing[:5]}, "
                    f"unexpected {extra[:5]}"
                )
        strict, module.strict_loading = module.strict_loading, False
        try:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        finally:
            module.strict_loading = strict


def shard_root(model: nn.Module, mesh, policy) -> None:
    """``fully_shard`` the model itself; methods other than ``forward`` that run it (the
    fused token loss calls ``hidden_and_head``) gather its parameters as well."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    fully_shard(model, mesh=mesh, mp_policy=policy)
    if hasattr(model, "hidden_and_head"):
        register_fsdp_forward_method(model, "hidden_and_head")


def check_plan(module: nn.Module, strategy) -> None:
    """Before any process starts (``build_run``): the units the plan names exist, and a
    replicated teacher fits, so a bad plan is one ConfigError, not one per rank."""
    if not isinstance(strategy, FSDP2Strategy):
        if isinstance(strategy, ModelParallelStrategy):
            configure_sharding(module, strategy)  # refused, with the reason
        return
    units(module.student, strategy.student_units, "trainer.strategy.student_units")
    if strategy.teacher_mode == "replicate":
        check_replicate(
            module, strategy.root_device, strategy.num_processes, "trainer.strategy.teacher"
        )
        return
    for name in module.frozen_names:
        units(getattr(module, name), strategy.teacher_units, "trainer.strategy.teacher_units")


def configure_sharding(module: nn.Module, strategy) -> None:
    """``DistillationModule.configure_model``: shard by the strategy's kind.

    * :class:`FSDP2Strategy`: the plan above;
    * Lightning's ``FSDPStrategy`` (FSDP1, ``trainer=fsdp``, GPUs): Lightning wraps the
      whole module after this hook; the frozen models are passed as ``ignored_modules``,
      so they stay whole on every rank (replicated), outside every flat parameter;
    * a plain ``ModelParallelStrategy`` would leave the models unsharded and their
      gradients unsynchronised: refused;
    * anything else (single device, DDP, DeepSpeed): nothing to do.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDP2Strategy):
        strategy.shard(module)
    elif isinstance(strategy, FSDPStrategy):
        check_replicate(module, strategy.root_device, strategy.num_processes, "trainer.strategy")
        frozen = [getattr(module, name) for name in module.frozen_names]
        strategy.kwargs["ignored_modules"] = frozen
        for model in frozen:  # FSDP1 moves only what it manages to the device
            model.to(strategy.root_device)
    elif isinstance(strategy, ModelParallelStrategy):
        raise ConfigError(
            ["trainer.strategy: ModelParallelStrategy needs the distillation sharding plan; "
             "use distillery.engine.sharding.FSDP2Strategy (trainer=fsdp2 or fsdp2_sim)"]
        )  # fmt: skip


def free_memory(device: torch.device) -> int:
    """Bytes free for one process on ``device``: the GPU's free memory, or the machine's
    available memory for a CPU process."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_replicate(module: nn.Module, device: torch.device, processes: int, key: str) -> None:
    """A replicated teacher is a full copy per process: refuse one larger than half of
    what a process has free (CPU processes share the machine's memory)."""
    size = sum(
        p.numel() * p.element_size()
        for name in module.frozen_names
        for p in getattr(module, name).parameters()
    )
    free = free_memory(device) // (processes if device.type == "cpu" else 1)
    if size > free // 2:
        raise ConfigError(
            [
                f"{key}: every process would hold a full copy of the frozen models "
                f"({size / 2**30:.2f} GiB), more than half of the {free / 2**30:.2f} GiB free per "
                f"process on {device}; shard them (trainer=fsdp2, trainer.strategy.teacher=shard)"
            ]
        )

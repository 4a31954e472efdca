"""How much memory a run needs per device, before it runs; and what one step really took.

:func:`estimate` adds up, per device and strategy (:data:`STRATEGIES`):

* teacher and student weights (bytes of their parameters and buffers as built; the
  ``bf16 teacher`` rows count the teacher at 2 bytes per parameter);
* gradients (one per trainable student parameter, its dtype) and optimizer state
  (per trainable parameter: AdamW/Adam 2 tensors, 3 with ``amsgrad``, SGD 1 with
  momentum, else 0);
* activations: the bytes autograd saves for backward (``saved_tensors_hooks``, each
  storage once) plus the step's outputs (student and teacher logits), or the CPU
  allocator's peak during that forward when larger (the frozen teacher's layer outputs
  and other temporaries are never saved but are alive at once), measured on one
  training row through the run's own task and objective (no backward) and multiplied by
  the batch size (per-row tensors scale with it; nothing else is assumed about the
  model);
* the peak: weights + optimizer state + the larger of (activations) and (gradients +
  the largest single saved tensor, the backward's working set at its start), plus, for
  AdamW's foreach step, one temporary per parameter group's largest update
  (:func:`step_temporaries`).

Strategies over ``n`` devices (per device): ``single``; ``ddp`` (everything replicated,
plus one gradient bucket copy); ``fsdp2 teacher sharded`` (weights, gradients and
optimizer state / n, plus the largest student and teacher unit gathered at a time);
``fsdp2 teacher replicated`` (the teacher whole); each also with a bf16 teacher.

:func:`measure_step` runs real optimizer steps of a built run on the CPU and reports
the peak of the second (the first creates the optimizer state): the bytes of every
live tensor at its start (parameters, buffers, gradients, optimizer state) plus the
highest point of the CPU allocator's running total during the step, read from
``torch.profiler`` memory events (every allocation and free of torch's CPU allocator,
temporaries inside kernels included). Python's ``tracemalloc`` does not see torch's
allocations, and RSS includes the allocator's cached pages and the interpreter; the
RSS high-water mark of the step (``/proc/self/status`` VmHWM after resetting it) is
reported beside it, not compared.

Activations are measured at 1 and 4 rows and extrapolated (a fixed part, such as
workspaces, plus a part per row). How close the estimate comes to the measured peak on
the shipped experiments, and what the checks cost: ``benchmarks/results/memory_estimate.json``
(``python benchmarks/memory_estimate.py``; the table in ``docs/preflight-health.md``).
RSS says nothing about a step's peak: the allocator reuses pages an earlier step made
resident.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import lightning as L
import torch
from torch import nn

GiB = 1024**3
STRATEGIES = ("single", "ddp", "fsdp2 teacher sharded", "fsdp2 teacher replicated")


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages of ``tensors``."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.device.type == "meta":
            continue
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def module_bytes(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return tensor_bytes([*module.parameters(), *module.buffers()])


def optimizer_states(optimizer_factory) -> int:
    """State tensors per trainable parameter of the configured optimizer."""
    fn = getattr(optimizer_factory, "func", optimizer_factory)
    kwargs = getattr(optimizer_factory, "keywords", {}) or {}
    name = getattr(fn, "__name__", type(fn).__name__).lower()
    if "sgd" in name:
        return 1 if kwargs.get("momentum", 0) else 0
    if "adam" in name:
        return 3 if kwargs.get("amsgrad") else 2
    return 2  # unknown: as Adam


def largest_unit(model: nn.Module | None) -> int:
    """Parameters of the largest FSDP unit (HF ``_no_split_modules`` blocks; else all)."""
    if model is None:
        return 0
    names = set()
    for m in model.modules():
        names |= set(getattr(m, "_no_split_modules", None) or [])
    sizes = [sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in names]  # fmt: skip
    return max(sizes) if sizes else sum(p.numel() for p in model.parameters())


@dataclass
class Activations:
    per_row: int  # bytes saved for backward + outputs, one training row
    largest: int  # the largest single tensor among them, one row
    rows: int  # the batch size (rows per device)
    length: int  # the row's tokens (or 0)


def one_row(batch: dict) -> dict:
    """The first row of a batch (every tensor's first entry along dim 0)."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() > 0:
            out[k] = v[:1]
        elif isinstance(v, dict):
            out[k] = one_row(v)
        else:
            out[k] = v
    return out


def pad_row(row: dict, length: int, pad_id: int) -> dict:
    """A token row right-padded to ``length`` (ids ``pad_id``, labels -100, masks 0):
    the configured sequence length rather than one batch's."""
    from distillery.contract import IGNORE

    out = dict(row)
    n = row["input_ids"].shape[1]
    if length <= n:
        return out
    fill = {"input_ids": pad_id, "labels": IGNORE}
    for k, v in row.items():
        if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == n:
            out[k] = torch.nn.functional.pad(v, (0, length - n), value=fill.get(k, 0))
    return out


def repeated(row: dict, n: int) -> dict:
    """``row`` with every tensor's rows repeated ``n`` times (a batch of ``n`` rows)."""
    return {k: repeated(v, n) if isinstance(v, dict)
            else torch.cat([v] * n) if torch.is_tensor(v) and v.dim() > 0 else v
            for k, v in row.items()}  # fmt: skip


def activations(module, row: dict, batch_size: float) -> tuple[float, int]:
    """(bytes, largest tensor) of a training forward at ``batch_size`` rows shaped like
    ``row``: :func:`activation_bytes` at 1 and 4 rows, a fixed part and a part per row
    (the allocator's peak holds both: workspaces and the like do not grow with rows)."""
    one, largest = activation_bytes(module, row)
    four, _ = activation_bytes(module, repeated(row, 4))
    per_row = max(0.0, (four - one) / 3)
    return max(0.0, one - per_row) + per_row * batch_size, largest


def activation_bytes(module, row: dict) -> tuple[int, int]:
    """(bytes, largest tensor) of one forward of the run's task and objective on ``row``
    (no backward runs): the larger of what it leaves for the backward (the tensors
    autograd saves, plus its outputs) and the CPU allocator's peak during it (the frozen
    teacher's layer outputs and every other temporary, freed before the end)."""
    from torch.profiler import ProfilerActivity, profile

    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    was = module.training
    module.train()
    # the features the taps capture are part of the step (Lightning attaches the taps in
    # the module's ``setup``; the preflight estimates before any trainer has run)
    taps = [t for t in (module.student_taps, module.teacher_taps) if t]
    for t in taps:
        t.attach()
    try:
        with (
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            out = module.task.training_outputs(module, row, 0.0)
            if module.task.reduction == "token":  # step-normalised: the step's token count
                count = module.task.count(row)
                counts = count if isinstance(count, dict) else {"token": count}
                total, _ = module.objective(out, counts)
            else:  # per-sample means (classification, embeddings)
                total, _ = module.objective(out)
    finally:
        for t in taps:
            t.remove()
        module.train(was)
    outputs = [o for o in (out.student, out.teacher) if torch.is_tensor(o)]
    tensors = [*saved, *outputs]
    size = tensor_bytes(tensors)
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    size -= tensor_bytes([t for t in tensors if t.untyped_storage().data_ptr() in params])
    largest = max((t.untyped_storage().nbytes() for t in tensors
                   if t.untyped_storage().data_ptr() not in params), default=0)  # fmt: skip
    del total, out
    return max(size, allocator_peak(prof)), largest


@dataclass
class Estimate:
    """Bytes per device of each part, per strategy."""

    devices: int
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    batch: tuple[int, int] = (0, 0)

    def total(self, strategy: str) -> float:
        return self.rows[strategy]["total"]


def estimate(module, row: dict, batch_size: int, optimizer_factory, devices: int = 8) -> Estimate:
    """Per-device memory of one training step at ``batch_size`` rows shaped like ``row``
    (see the module docstring)."""
    teacher = module.teacher
    t_bytes = module_bytes(teacher)
    t_params = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    trainable = module.trainable_parameters()
    s_bytes = module_bytes(module.student) + module_bytes(module.objective)
    grads = tensor_bytes(trainable)  # a gradient like each trainable parameter
    states = optimizer_states(optimizer_factory) * sum(p.numel() * 4 for p in trainable)
    temporaries = step_temporaries(trainable, optimizer_factory)
    acts, largest = activations(module, row, batch_size)
    work = largest * batch_size
    t_net = teacher.network if teacher is not None else None
    s_unit = largest_unit(module.student) * 4
    t_unit = largest_unit(t_net) * 4 if t_net is not None else 0
    length = next((int(v.shape[1]) for v in row.values() if torch.is_tensor(v) and v.dim() == 2), 0)
    out = Estimate(devices, batch=(batch_size, length))
    n = devices
    for bf16 in (False, True):
        tw = t_params * 2 if bf16 and teacher is not None else t_bytes
        tu = t_unit // 2 if bf16 else t_unit
        suffix = ", bf16 teacher" if bf16 else ""
        parts = {
            "single": (tw, s_bytes, grads, states, 0),
            "ddp": (tw, s_bytes, 2 * grads, states, 0),
            "fsdp2 teacher sharded": (tw / n, s_bytes / n, grads / n, states / n, s_unit + tu),
            "fsdp2 teacher replicated": (tw, s_bytes / n, grads / n, states / n, s_unit),
        }
        for strategy, (tw_, sw, g, st, gathered) in parts.items():
            total = tw_ + sw + st + gathered + max(acts, g + work) + temporaries / (1 if strategy in ("single", "ddp") else n)  # fmt: skip
            out.rows[strategy + suffix] = {
                "teacher": tw_, "student": sw + gathered, "grads": g, "optimizer": st,
                "activations": acts, "total": total,
            }  # fmt: skip
    return out


def step_temporaries(params, optimizer_factory) -> int:
    """AdamW/Adam's foreach step (torch's default on CPU and GPU) computes its update in
    temporaries: about one per parameter of the largest group, float32."""
    if optimizer_states(optimizer_factory) == 0:
        return 0
    return sum(p.numel() * 4 for p in params)


def render(est: Estimate, measured: dict | None = None):
    """The estimate as a rich Table (MiB per device), with the measured peak if given."""
    from rich.table import Table

    b, t = est.batch
    title = f"memory per device (MiB), batch {b} x {t} tokens, {est.devices} devices for ddp/fsdp2"
    table = Table(title=title)
    cols = ("teacher", "student", "grads", "optimizer", "activations", "total")
    table.add_column("strategy")
    for c in cols:
        table.add_column(c, justify="right")
    for name, row in est.rows.items():
        table.add_row(name, *(f"{row[c] / 2**20:.1f}" for c in cols))
    if measured:
        table.add_row("measured (one CPU step)", *[""] * 5, f"{measured['peak'] / 2**20:.1f}")
    return table


# --- measuring one step on the CPU ---------------------------------------------------
def live_bytes(module, optimizer) -> int:
    """Bytes of the tensors alive between steps: parameters, buffers, grads, optimizer state."""
    tensors = [*module.parameters(), *module.buffers(), *(p.grad for p in module.parameters())]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    return tensor_bytes(tensors)


def allocator_peak(prof) -> int:
    """The highest running total of the CPU allocator's events in a profile."""
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    )
    running = peak = 0
    for _, n in events:
        running += n
        peak = max(peak, running)
    return peak


def reset_rss_peak() -> int | None:
    """Reset the process's RSS high-water mark (Linux), return the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return rss("VmRSS")
    except OSError:
        return None


def rss(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = [line.split()[1] for line in lines if line.startswith(field_name + ":")]
    return int(found[0]) * 1024 if found else None


class StepPeak(L.Callback):
    """Measures the ``step``-th training batch of the run (0-based, over epochs) as the
    module docstring says, then stops the run: ``result = {baseline, delta, peak,
    rss_delta, shape}``."""

    def __init__(self, step: int = 1):
        self.step, self.result, self._prof, self.row = step, None, None, None
        self._seen = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._seen += 1
        if self._seen != self.step:
            return
        from torch.profiler import ProfilerActivity, profile

        self._shape = tuple(batch["input_ids"].shape) if "input_ids" in batch else None
        self.row = one_row(batch)  # what an estimate of this step's shape starts from
        self._base = live_bytes(pl_module, trainer.optimizers[0])
        self._rss = reset_rss_peak()
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._prof is None:
            return
        self._prof.__exit__(None, None, None)
        delta = allocator_peak(self._prof)
        hwm = rss("VmHWM")
        self.result = {
            "baseline": self._base, "delta": delta, "peak": self._base + delta,
            "rss_delta": None if self._rss is None or hwm is None else hwm - self._rss,
            "shape": self._shape,
        }  # fmt: skip
        self._prof = None
        trainer.should_stop = True


def relative_error(estimated: float, measured: float) -> float:
    return abs(estimated - measured) / measured if measured else math.inf

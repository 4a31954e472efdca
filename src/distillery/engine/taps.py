"""Forward-hook taps: capture intermediate features and attention maps by module path.

A tap names what to capture on one side (student or teacher) by module path or glob
(``layer2``, ``blocks.*.attn``, ``encoder.layer.3``) or by timm feature stage
(``feature_info:2``), as the module's ``output`` (default), ``input``, or ``attention``
(attention probabilities ``[B, heads, queries, keys]``):

* timm ``Attention`` (fused SDPA): probabilities are recomputed from the module input
  as ``softmax(q k^T * scale)`` with the module's own ``qkv``/``q_norm``/``k_norm``; the
  model itself keeps its fused kernel;
* HF attention modules (``self.config._attn_implementation``): the tapped module alone
  gets a config copy switched to eager attention, whose weights it returns, and an
  additive float mask built from the SDPA-style mask the model prepared (boolean, or
  none with causal attention left to the kernel); untapped layers keep SDPA.

Hooks are registered once (:meth:`Taps.attach`), captures are cleared before every
forward (:meth:`Taps.clear`), and :meth:`Taps.remove` drops every handle (the module
calls it on teardown and on exceptions). A hook that fires twice between two clears
(activation checkpointing re-running a forward, or a module used twice) raises
:class:`DuplicateCaptureError` instead of silently overwriting. Student captures keep
their graph; teacher captures are detached.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from distillery.teacher_cache.codec import feature_names
from distillery.teacher_cache.store import CachedOutputs

Kind = Literal["output", "input", "attention"]


class DuplicateCaptureError(RuntimeError):
    pass


@dataclass
class TapSpec:
    path: str
    kind: Kind = "output"
    index: int | None = 0  # element of a tuple output/input (None: the whole object)

    @classmethod
    def parse(cls, spec: str | Mapping | TapSpec) -> TapSpec:
        if isinstance(spec, TapSpec):
            return spec
        if isinstance(spec, str):
            return cls(path=spec)
        return cls(**dict(spec))


def path_matches(path: str, pattern: str) -> bool:
    """Glob on dotted paths: ``*`` matches one path component (``blocks.*.attn``),
    ``**`` any number of them."""
    parts, pats = path.split("."), pattern.split(".")

    def match(i: int, j: int) -> bool:
        if j == len(pats):
            return i == len(parts)
        if pats[j] == "**":
            return any(match(k, j + 1) for k in range(i, len(parts) + 1))
        return i < len(parts) and fnmatch.fnmatchcase(parts[i], pats[j]) and match(i + 1, j + 1)

    return match(0, 0)


def resolve_paths(model: nn.Module, pattern: str, key: str) -> list[str]:
    """Module paths matching ``pattern`` (exact, glob, or ``feature_info:<i>``)."""
    names = [n for n, _ in model.named_modules() if n]
    if pattern.startswith("feature_info:"):
        info = getattr(model, "feature_info", None)
        if info is None:
            raise ValueError(f"{key}: {type(model).__name__} has no timm feature_info")
        stage = int(pattern.split(":", 1)[1])
        entries = info.info if hasattr(info, "info") else info
        pattern = entries[stage]["module"]
    if pattern in names:
        return [pattern]
    matches = [n for n in names if path_matches(n, pattern)]
    if not matches:
        close = difflib.get_close_matches(pattern, names, n=5)
        raise ValueError(
            f"{key}: no module matches {pattern!r} (closest: {close}); "
            f"list them with `python -m distillery.taps`"
        )
    return matches


def _pick(value: Any, index: int | None) -> Any:
    if index is not None and isinstance(value, tuple | list):
        return value[index]
    return value


def timm_attention_probs(module: nn.Module, x: Tensor) -> Tensor:
    """softmax(q k^T * scale) of a timm ``Attention`` module for input ``x`` [B, N, C]."""
    b, n, _ = x.shape
    qkv = module.qkv(x).reshape(b, n, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = module.q_norm(q), module.k_norm(k)
    return ((q * module.scale) @ k.transpose(-2, -1)).float().softmax(-1)


def eager_mask_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Masks for a layer switched to eager attention inside an SDPA model.

    The model prepares masks for SDPA: boolean (True = attend), or ``None`` with
    ``is_causal`` left to the kernel. Eager attention adds the mask to the scores, so
    it needs an additive float mask: booleans become 0 / dtype-min, and a causal module
    without a mask gets an explicit causal one."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    mask = kwargs.get("attention_mask")
    if hidden is None:
        return args, kwargs
    lowest = torch.finfo(hidden.dtype).min
    if mask is not None and mask.dtype == torch.bool:
        kwargs["attention_mask"] = torch.zeros(
            mask.shape, dtype=hidden.dtype, device=mask.device
        ).masked_fill(~mask, lowest)
    elif mask is None and getattr(module, "is_causal", False):
        n = hidden.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=hidden.device).tril()
        kwargs["attention_mask"] = torch.zeros(
            1, 1, n, n, dtype=hidden.dtype, device=hidden.device
        ).masked_fill(~causal, lowest)
    return args, kwargs


def attention_style(module: nn.Module) -> str:
    if all(
        hasattr(module, a) for a in ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")
    ):
        return "timm"
    if hasattr(getattr(module, "config", None), "_attn_implementation"):
        return "hf"
    return "unknown"


class Taps:
    """The taps of one model (``side`` is ``student`` or ``teacher``, for messages)."""

    def __init__(self, model: nn.Module, specs: Mapping[str, Any] | None, side: str, detach: bool):
        self.model, self.side, self.detach = model, side, detach
        self.specs = {str(k): TapSpec.parse(v) for k, v in (specs or {}).items()}
        self.targets: dict[str, list[str]] = {}
        modules = dict(model.named_modules())
        for name, spec in self.specs.items():
            key = f"taps.{side}.{name}"
            if spec.kind not in ("output", "input", "attention"):
                raise ValueError(
                    f"{key}.kind must be output, input or attention, got {spec.kind!r}"
                )
            self.targets[name] = resolve_paths(model, spec.path, f"{key}.path")
            if spec.kind == "attention":
                for path in self.targets[name]:
                    if attention_style(modules[path]) == "unknown":
                        raise ValueError(
                            f"{key}: cannot capture attention maps from {path} "
                            f"({type(modules[path]).__name__}); tap a timm Attention or HF attention module"
                        )
        self.captured: dict[str, Tensor | list[Tensor]] = {}
        self._slots: dict[tuple[str, int], Tensor] = {}
        self.active = True  # False: hooks stay registered but capture (and recompute) nothing
        self._handles: list[Any] = []
        self._saved_configs: list[tuple[nn.Module, Any]] = []

    def __bool__(self) -> bool:
        return bool(self.specs)

    @property
    def handle_count(self) -> int:
        return len(self._handles)

    def attach(self) -> Taps:
        if self._handles:
            return self  # registered once
        modules = dict(self.model.named_modules())
        for name, spec in self.specs.items():
            for i, path in enumerate(self.targets[name]):
                module = modules[path]
                if spec.kind == "input":
                    self._handles.append(
                        module.register_forward_pre_hook(self._input_hook(name, i, spec))
                    )
                elif spec.kind == "output":
                    self._handles.append(
                        module.register_forward_hook(self._output_hook(name, i, spec))
                    )
                elif attention_style(module) == "timm":
                    self._handles.append(
                        module.register_forward_pre_hook(self._timm_attention_hook(name, i))
                    )
                else:
                    self._saved_configs.append((module, module.config))
                    eager = copy.copy(module.config)
                    eager._attn_implementation = "eager"
                    module.config = eager
                    self._handles.append(
                        module.register_forward_pre_hook(eager_mask_hook, with_kwargs=True)
                    )
                    self._handles.append(
                        module.register_forward_hook(
                            self._output_hook(name, i, TapSpec(path, "output", 1))
                        )
                    )
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, config in self._saved_configs:
            module.config = config
        self._saved_configs.clear()
        self.clear()

    def clear(self) -> None:
        self._slots.clear()
        self.captured = {}

    def __enter__(self) -> Taps:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    # --- hooks -------------------------------------------------------------------
    def _store(self, name: str, i: int, value: Tensor) -> None:
        if not self.active:
            return
        if (name, i) in self._slots:
            raise DuplicateCaptureError(
                f"taps.{self.side}.{name}: {self.targets[name][i]} fired twice in one forward (activation "
                f"checkpointing re-runs the forward, or the module is used twice); disable checkpointing "
                f"for tapped modules or tap a module that runs once"
            )
        if not isinstance(value, Tensor):
            raise TypeError(
                f"taps.{self.side}.{name}: {self.targets[name][i]} gave {type(value).__name__}, "
                f"not a tensor; set index to pick a tuple element"
            )
        self._slots[(name, i)] = value.detach() if self.detach else value
        n = len(self.targets[name])
        if n == 1:
            self.captured[name] = self._slots[(name, 0)]
        elif all((name, j) in self._slots for j in range(n)):
            self.captured[name] = [self._slots[(name, j)] for j in range(n)]

    def _output_hook(self, name: str, i: int, spec: TapSpec):
        def hook(module, args, output):
            self._store(name, i, _pick(output, spec.index))

        return hook

    def _input_hook(self, name: str, i: int, spec: TapSpec):
        def hook(module, args):
            self._store(name, i, _pick(args, 0 if spec.index is None else spec.index))

        return hook

    def _timm_attention_hook(self, name: str, i: int):
        def hook(module, args):
            if not self.active:  # no attention recompute when nothing is captured
                return
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach):
                self._store(name, i, timm_attention_probs(module, args[0]))

        return hook


def describe(model: nn.Module, example: Tensor) -> list[tuple[str, str, str]]:
    """(module path, type, output shape) of every module, from one dry-run forward."""
    shapes: dict[str, str] = {}
    handles = []

    def shape_of(value) -> str:
        if isinstance(value, Tensor):
            return str(tuple(value.shape))
        if isinstance(value, tuple | list):
            return "(" + ", ".join(shape_of(v) for v in value) + ")"
        if hasattr(value, "last_hidden_state"):
            return shape_of(value.last_hidden_state)
        return type(value).__name__

    def record(path: str):
        def hook(module, args, output) -> None:  # returns None: the output is left alone
            shapes.setdefault(path, shape_of(output))

        return hook

    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_hook(record(path)))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return [
        (p, type(m).__name__, shapes.get(p, "not called")) for p, m in model.named_modules() if p
    ]


class CachedTaps:
    """A cached teacher's taps: the features the cache stored for the same tap specs,
    handed over by each read (``teacher_cache.store.CachedOutputs.forward``). The interface the module
    and the builder use of :class:`Taps`: ``specs``, ``captured``
    (a tap's tensor, or its list when it matched several modules), ``active``,
    ``clear``, ``attach``, ``remove``."""

    side, detach = "teacher", True

    def __init__(self, outputs: CachedOutputs, specs: dict | None):
        self.outputs = outputs
        self.specs = {str(k): TapSpec.parse(v) for k, v in (specs or {}).items()}
        problems = []
        for name, spec in self.specs.items():
            held = outputs.taps.get(name)
            if held is None or {k: held[k] for k in ("path", "kind", "index")} != asdict(spec):
                problems.append(
                    f"taps.teacher.{name}: the teacher cache at {outputs.path} holds "
                    f"{'no such tap' if held is None else f'it for {held}'} (its taps: "
                    f"{sorted(outputs.taps)}); rewrite it with python -m distillery.cache "
                    f"and this run's taps.teacher"
                )
        if problems:
            raise ValueError("; ".join(problems))
        self.captured: dict[str, Tensor | list[Tensor]] = {}
        self.active = True
        absent = [n for n in self.stored_names() for s in outputs.shards if n not in s.features]
        if absent:
            raise ValueError(
                f"teacher.cache: {outputs.path} records taps whose features a shard lacks "
                f"({sorted(set(absent))}); rewrite the cache"
            )

    def __bool__(self) -> bool:
        return bool(self.specs)

    def stored_names(self) -> tuple[str, ...]:
        return tuple(
            n for t in self.specs for n in feature_names(t, self.outputs.taps[t]["targets"])
        )

    def receive(self, features: dict[str, Tensor]) -> None:
        for name in self.specs:
            if name in self.captured:
                raise DuplicateCaptureError(
                    f"taps.teacher.{name}: the cached teacher was read twice in one forward "
                    f"(its taps are cleared before each)"
                )
            parts = [features[n] for n in feature_names(name, self.outputs.taps[name]["targets"])]
            self.captured[name] = parts[0] if len(parts) == 1 else parts

    def attach(self) -> CachedTaps:
        self.outputs.sink = self
        return self

    def remove(self) -> None:
        if self.outputs.sink is self:
            self.outputs.sink = None
        self.clear()

    def clear(self) -> None:
        self.captured = {}

    def __enter__(self) -> CachedTaps:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

"""The teacher contract.

A :class:`Teacher` wraps any ``nn.Module`` that maps raw inputs to logits and
guarantees, whatever the surrounding code does:

* frozen: every parameter has ``requires_grad=False`` and the forward runs under
  ``torch.no_grad()``, so no teacher tensor carries a graph;
* eval mode: ``.train()`` (called by Lightning at every fit/validation switch, or by
  a parent module) leaves it in eval mode. ``bn_mode="batch_stats"`` is the one
  exception: BatchNorm layers normalise with batch statistics, with momentum 0 so
  the running statistics are never updated;
* provenance: ``provenance`` records where the weights came from (source, config,
  sha256 of the weights) so a student checkpoint can rebuild its teacher without
  storing its weights;
* precision: ``cast("bf16")`` (the ``dtype`` key of any teacher config) keeps the
  weights and runs the forward in bfloat16 (half the memory) and hands float32 outputs
  to the losses; the provenance hash stays the one of the weights as loaded.

Teacher sources are plain functions returning a ``Teacher``; add one by writing a
function and a YAML file ``conf/teacher/<name>.yaml`` with ``_target_`` pointing to it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from distillery.models.input_norm import InputNorm

BNMode = Literal["eval", "batch_stats"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def weights_sha256(module: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a module's state dict."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Teacher(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        provenance: dict[str, Any] | None = None,
        input_norm: InputNorm | None = None,
        bn_mode: BNMode = "eval",
    ):
        super().__init__()
        if bn_mode not in ("eval", "batch_stats"):
            raise ValueError(f"teacher.bn_mode must be 'eval' or 'batch_stats', got {bn_mode!r}")
        self.model = model
        self.input_norm = input_norm if input_norm is not None else InputNorm()
        self.bn_mode = bn_mode
        for p in self.parameters():
            p.requires_grad_(False)
        if bn_mode == "batch_stats":
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.momentum = 0.0
        self.provenance: dict[str, Any] = dict(provenance or {})
        self.provenance.setdefault("sha256", weights_sha256(self.model))
        self.dtype: torch.dtype | None = None
        self.train(False)

    def cast(self, dtype: str) -> Teacher:
        """Weights and forward in ``dtype`` (``fp32``, ``bf16``, ``fp16``); outputs float32."""
        if dtype not in DTYPES:
            raise ValueError(f"teacher.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype = DTYPES[dtype]
        self.model.to(self.dtype)
        return self

    def _in(self, x: Tensor) -> Tensor:
        x = self.input_norm(x)
        return x.to(self.dtype) if self.dtype is not None and x.is_floating_point() else x

    def train(self, mode: bool = True) -> Teacher:  # noqa: ARG002 - mode is ignored on purpose
        super().train(False)
        if self.bn_mode == "batch_stats":
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.training = True
        return self

    @property
    def network(self) -> nn.Module:
        """The teacher architecture itself (what taps address by module path): the model
        without the input normalisation a run-checkpoint teacher carries."""
        m = self.model
        if isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[0], InputNorm):
            return m[1]
        return m

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        out = self.model(self._in(x))
        return out.float() if self.dtype is not None else out

    @torch.no_grad()
    def hidden_and_head(self, x: Tensor):
        """Last hidden states and output layer of the network (fused token losses)."""
        return self.network.hidden_and_head(self._in(x))


def _norm(input_norm: dict | None) -> InputNorm:
    return (
        InputNorm()
        if input_norm is None
        else InputNorm(input_norm.get("mean"), input_norm.get("std"))
    )


def _existing_file(path: str | Path | None, what: str) -> Path:
    if path is None or str(path) in ("", "???"):
        raise FileNotFoundError(f"{what}: no path given")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what}: file not found: {p}")
    return p


def from_run_checkpoint(ckpt_path: str, bn_mode: BNMode = "eval") -> Teacher:
    """Teacher from a checkpoint written by an earlier Distillery run.

    The run's student (architecture from its stored config, weights and input
    normalisation from its state dict) becomes the teacher.
    """
    from distillery.engine.checkpoint import load_student

    path = _existing_file(ckpt_path, "teacher.ckpt_path")
    model = load_student(path)  # Sequential(InputNorm, net): takes raw inputs
    return Teacher(model, {"source": "run_checkpoint", "path": str(path)}, bn_mode=bn_mode)


def from_timm(
    model_name: str,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    num_classes: int | None = None,
    input_norm: dict | None = None,
    bn_mode: BNMode = "eval",
    model_kwargs: dict | None = None,
) -> Teacher:
    """Teacher from a timm model name, with pretrained weights or a checkpoint file."""
    import timm

    if not timm.is_model(model_name):
        raise ValueError(f"teacher.model_name: unknown timm model {model_name!r}")
    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if checkpoint_path:
        kwargs["checkpoint_path"] = str(_existing_file(checkpoint_path, "teacher.checkpoint_path"))
    model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    return Teacher(
        model,
        {"source": "timm", "model_name": model_name, "pretrained": pretrained},
        input_norm=_norm(input_norm),
        bn_mode=bn_mode,
    )


def from_state_dict(
    model: nn.Module,
    path: str,
    key: str | None = None,
    strip_prefix: str = "",
    input_norm: dict | None = None,
    bn_mode: BNMode = "eval",
) -> Teacher:
    """Teacher from an architecture (``model``, built with ``_target_``) and a plain
    state dict file. ``key`` selects a sub-dict (e.g. ``model`` for RepDistiller
    checkpoints); ``strip_prefix`` removes a prefix such as ``module.``."""
    file = _existing_file(path, "teacher.path")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised naming the key
        raise ValueError(
            f"teacher.path: {file} is not a readable state dict ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if not isinstance(state, dict):
        raise ValueError(f"teacher.path: {file} holds a {type(state).__name__}, not a state dict")
    if key is not None:
        if key not in state:
            raise KeyError(f"teacher.key: {key!r} not in {file} (keys: {sorted(state)[:10]})")
        state = state[key]
    if strip_prefix:
        state = {k.removeprefix(strip_prefix): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"teacher.path: state dict {file} does not fit teacher.model "
            f"(missing: {result.missing_keys[:5]}, unexpected: {result.unexpected_keys[:5]})"
        )
    return Teacher(
        model,
        {"source": "state_dict", "path": str(file)},
        input_norm=_norm(input_norm),
        bn_mode=bn_mode,
    )


def from_model(
    model: nn.Module, input_norm: dict | None = None, bn_mode: BNMode = "eval"
) -> Teacher:
    """Teacher from any module built with ``_target_`` that already holds its weights
    (e.g. ``distillery.models.hf.HFCausalLM`` with ``pretrained: <hub name or local dir>``)."""
    return Teacher(
        model,
        {"source": "model", "class": type(model).__name__},
        input_norm=_norm(input_norm),
        bn_mode=bn_mode,
    )


def cached_teacher(path: str, node: dict, run: dict, key: str):
    """A :class:`Teacher` reading the cache at ``path``, after checking that it was
    written for this teacher config (``node``: the teacher node without ``cache``) and
    this run's data (``run``: ``{"paths", "data"}`` records)."""
    from distillery.config import ConfigError, config_differences, upgrade_targets
    from distillery.teacher_cache.store import CachedOutputs, read_meta, without_loader_keys

    cache = Path(path).expanduser()
    try:
        meta = read_meta(cache, f"{key}.cache")
    except FileNotFoundError as e:
        raise ConfigError([str(e)]) from e
    recorded = {"paths": meta["paths"], "data": without_loader_keys(meta["data"]),
                "views": meta.get("views"), "teacher": upgrade_targets(meta["teacher_config"])}  # fmt: skip
    current = {**run, "data": without_loader_keys(run.get("data")), "teacher": node}
    diffs = config_differences(recorded, current)
    if diffs:
        raise ConfigError(
            [f"{key}.cache: {cache} was written for another run: {', '.join(diffs[:8])} differ"]
        )
    try:
        outputs = CachedOutputs(cache, f"{key}.cache")
    except ValueError as e:
        raise ConfigError([str(e)]) from e
    provenance = {**meta["teacher_provenance"], "cache": str(cache)}
    return Teacher(outputs, provenance=provenance)

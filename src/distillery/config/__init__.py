"""Config checking and building.

:func:`validate` runs before any model or data is loaded and reports every problem
at once: missing values (``???``), interpolations that do not resolve, unknown
arguments and values whose type does not fit the annotated signature of the
``_target_`` they are passed to. :func:`build` instantiates one config node and
prefixes any failure with the node's key. Range checks live in the constructors that
config builds (loss terms, task adapters): they raise :class:`ArgumentError` naming the
argument, and :func:`build` reports it under the node's key (``distill.terms.kd.beta``).
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A config problem; the message names the offending key(s)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n  - " + "\n  - ".join(problems))


class ArgumentError(ValueError):
    """An argument out of its valid range, raised by a constructor that config builds
    (loss terms, task adapters). ``arg`` is the parameter's name and the message starts
    with it (``beta must be in [0, 1], got 2``), so a direct caller reads it as it is and
    :func:`build` reports it under the node's key: ``distill.terms.kd.beta must be in
    [0, 1], got 2``. Raise it for the node's own arguments only (a nested node is built,
    and keyed, on its own)."""

    def __init__(self, arg: str, message: str):
        self.arg = arg
        super().__init__(message)

    def under(self, key: str) -> str:
        """The message with the argument named by its full config key ``key.arg``."""
        full, message = f"{key}.{self.arg}", str(self)
        if message.startswith(full):  # already names the key (task adapters: "task.on_policy")
            return message
        if message.startswith(self.arg):
            return full + message[len(self.arg) :]
        return f"{full}: {message}"


def require(ok: bool, arg: str, rule: str, value: Any) -> None:
    """Unless ``ok``: :class:`ArgumentError` ``"<arg> must be <rule>, got <value>"``.
    Write ``ok`` as the valid range (``temperature > 0``), so NaN fails it too."""
    if not ok:
        raise ArgumentError(arg, f"{arg} must be {rule}, got {value!r}")


# Top-level keys of train.yaml with the types they must have.
TOP_LEVEL_TYPES: dict[str, Any] = {
    "task_name": str,
    "seed": int | None,
    "train": bool,
    "test": bool,
    "control": bool,
    "allow_oversubscription": bool,
    "ckpt_path": str | None,
}


def _locate(target: str):
    from hydra._internal.utils import _locate as hydra_locate

    return hydra_locate(target)


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a config value fits a type annotation. Unknown annotations pass."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    if isinstance(annotation, str):
        return True  # unresolved forward reference: cannot check
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    base = origin or annotation
    if base in (list, tuple, Sequence, typing.Sequence) or base is getattr(typing, "List", None):
        return isinstance(value, list | tuple | ListConfig)
    if base in (dict, Mapping, typing.Mapping):
        return isinstance(value, dict | DictConfig)
    return True


def _signature(fn) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """Parameters and type hints of a callable; for a class whose ``__init__`` passes
    ``**kwargs`` up, the parents' parameters too (as far as they pass them on)."""
    if not inspect.isclass(fn):
        params = dict(inspect.signature(fn).parameters)
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        return params, typing.get_type_hints(fn), takes_kwargs
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    for klass in fn.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:
            return params, hints, False
        own = dict(inspect.signature(init).parameters)
        own.pop("self", None)
        for name, p in own.items():
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                params.setdefault(name, p)
        for name, h in typing.get_type_hints(init).items():
            hints.setdefault(name, h)
        if not any(p.kind is p.VAR_KEYWORD for p in own.values()):
            return params, hints, False
        if klass.__module__.split(".")[0] not in ("distillery",):
            return params, hints, True  # third-party kwargs: cannot follow safely
    return params, hints, True


def _consumed_keys(key: str) -> set[str]:
    """Keys Distillery reads around a node's ``_target_`` and does not pass to it: a
    frozen model's ``dtype`` and ``cache`` (``engine.builder.build_frozen_model``)."""
    return {"dtype", "cache"} if key == "teacher" or key.startswith("frozen.") else set()


def _check_node(node: DictConfig, key: str, problems: list[str]) -> None:
    target = node.get("_target_")
    try:
        fn = _locate(target)
    except Exception as e:  # noqa: BLE001 - reported with the key
        problems.append(f"{key}._target_: cannot import {target!r} ({e})")
        return
    try:
        params, hints, takes_kwargs = _signature(fn)
    except (TypeError, ValueError, NameError):
        return
    consumed = _consumed_keys(key)
    for name in node:
        if str(name).startswith("_") or name in consumed:
            continue
        if name not in params:
            if not takes_kwargs:
                problems.append(
                    f"{key}.{name}: unexpected argument for {target} (accepts: {', '.join(params)})"
                )
            continue
        if OmegaConf.is_missing(node, name):
            continue
        raw = node._get_node(name)
        if isinstance(raw, DictConfig) and "_target_" in raw:
            continue  # built by instantiate, checked on its own
        try:
            value = node[name]
        except Exception:  # noqa: BLE001 - unresolvable interpolation, reported by validate()
            continue
        annotation = hints.get(name, params[name].annotation)
        if not _fits(value, annotation):
            shown = (
                annotation.__name__
                if isinstance(annotation, type)
                else str(annotation).replace("typing.", "")
            )
            problems.append(f"{key}.{name}: expected {shown}, got {type(value).__name__} {value!r}")
    if not node.get("_partial_", False):
        for name, p in params.items():
            if (
                p.default is p.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and name not in node
            ):
                problems.append(f"{key}.{name}: required argument of {target} is not set")


def _walk(node: Any, key: str, problems: list[str]) -> None:
    if isinstance(node, DictConfig):
        if "_target_" in node and not OmegaConf.is_missing(node, "_target_"):
            _check_node(node, key, problems)
        for name in node:
            if OmegaConf.is_missing(node, name) or OmegaConf.is_interpolation(node, name):
                continue
            _walk(node._get_node(name), f"{key}.{name}" if key else str(name), problems)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            if not OmegaConf.is_missing(node, i) and not OmegaConf.is_interpolation(node, i):
                _walk(node._get_node(i), f"{key}[{i}]", problems)


def validate(cfg: DictConfig, top_level: Mapping[str, Any] = TOP_LEVEL_TYPES) -> None:
    """Raise one :class:`ConfigError` listing every problem found in ``cfg``."""
    problems: list[str] = []

    def resolve_all(node, key):
        """Missing values (???) and interpolations that do not resolve."""
        names = list(node.keys()) if isinstance(node, DictConfig) else range(len(node))
        for name in names:
            child_key = (
                (f"{key}.{name}" if key else str(name))
                if isinstance(node, DictConfig)
                else f"{key}[{name}]"
            )
            if OmegaConf.is_missing(node, name):
                problems.append(f"{child_key}: missing value (???)")
                continue
            try:
                child = node[name]
            except Exception as e:  # noqa: BLE001 - collected, reported together
                cause = str(e).splitlines()[0]
                if "MissingMandatoryValue" in type(e).__name__ or "Missing" in cause:
                    problems.append(f"{child_key}: interpolates a missing value ({cause})")
                else:
                    problems.append(f"{child_key}: {type(e).__name__}: {cause}")
                continue
            if isinstance(child, DictConfig | ListConfig):
                resolve_all(child, child_key)

    resolve_all(cfg, "")
    for name, expected in top_level.items():
        if name in cfg and not OmegaConf.is_missing(cfg, name):
            try:
                value = cfg[name]
            except Exception:  # noqa: BLE001 - reported above
                continue
            if not _fits(value, expected):
                problems.append(
                    f"{name}: expected {expected}, got {type(value).__name__} {value!r}"
                )
    _walk(cfg, "", problems)
    if problems:
        raise ConfigError(sorted(set(problems), key=problems.index))


def build(node: DictConfig | None, key: str, **kwargs) -> Any:
    """``hydra.utils.instantiate`` with failures re-raised as errors naming ``key`` (an
    :class:`ArgumentError` naming ``key.<arg>``)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if node is None or (isinstance(node, DictConfig) and len(node) == 0):
        return None  # an empty group option such as views=none
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, ConfigError):  # already names its key: not wrapped twice
            raise cause from None
        if isinstance(cause, ArgumentError):  # an argument out of range: its full key
            raise ConfigError([cause.under(key)]) from cause
        raise ConfigError([f"{key}: {type(cause).__name__}: {cause}"]) from cause
    except ConfigError:
        raise
    except ArgumentError as e:
        raise ConfigError([e.under(key)]) from e
    except Exception as e:  # noqa: BLE001
        raise ConfigError([f"{key}: {type(e).__name__}: {e}"]) from e


def exit_on_config_error(body: Callable[[], Any]) -> Any:
    """Run a command's body. A :class:`ConfigError` is logged as one message and the
    process exits with code 2, no traceback (``HYDRA_FULL_ERROR=1`` shows it). In a
    multirun the error is re-raised, so the sweeper records the failed job and goes on."""
    try:
        return body()
    except ConfigError as e:
        logging.getLogger("distillery").error(str(e))
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or _in_multirun():
            raise
        sys.exit(2)


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):
        return False


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


# Config keys whose values are credentials, and environment variables that hold them.
SECRET_KEYS = ("token", "hf_token", "api_key", "apikey", "access_token", "auth_token", "secret",
               "password", "passwd")  # fmt: skip
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY")
REDACTED = "<redacted>"


def to_record(cfg: DictConfig) -> dict:
    """The resolved config as it may be written down (checkpoints, logger hyperparameters,
    teacher provenance): credentials redacted, by key (``SECRET_KEYS``, ``*_api_key``,
    ``*_secret``, ``*_password``) and by value (the contents of ``SECRET_ENV``)."""
    return redact(to_container(cfg))


def redact(node: Any) -> Any:
    secrets = {os.environ[v] for v in SECRET_ENV if os.environ.get(v)}

    def secret_key(key: Any) -> bool:
        k = str(key).lower()
        return k in SECRET_KEYS or k.endswith(("_api_key", "_secret", "_password"))

    def walk(value: Any, key: Any = None) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(walk(v) for v in value)
        if isinstance(value, str) and value and (secret_key(key) or value in secrets):
            return REDACTED
        if isinstance(value, str) and any(s in value for s in secrets):
            for s in secrets:
                value = value.replace(s, REDACTED)
        return value

    return walk(node)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file next to ``path``, then rename it over ``path``:
    readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- run records: compared across runs, read back from older checkpoints and caches
# What an older checkpoint is rebuilt from (its student config, its teacher's recorded
# config) and a teacher cache's recorded teacher config name ``_target_``s at their old
# paths: each prefix here is replaced by today's, in order (format 1 -> 2 -> 3).
MOVED_TARGETS = (
    ("distillery.teacher.", "distillery.core.teacher."),  # format 1
    ("distillery.core.tasks.", "distillery.tasks."),  # format 2: core/ split into layers
    ("distillery.core.objective.", "distillery.losses.objective."),
    ("distillery.core.checkpoint.", "distillery.engine.checkpoint."),
    ("distillery.core.teacher.", "distillery.engine.teacher."),
    ("distillery.core.remote_teacher.", "distillery.engine.remote_teacher."),
    ("distillery.core.module.", "distillery.engine.module."),
    ("distillery.core.callbacks.", "distillery.engine.callbacks."),
    ("distillery.core.sharding.", "distillery.engine.sharding."),
)


def upgrade_targets(node: Any) -> Any:
    """``node`` (nested dicts and lists) with every moved ``_target_`` at today's path."""
    if isinstance(node, dict):
        node = {k: upgrade_targets(v) for k, v in node.items()}
        target = node.get("_target_")
        for old, new in MOVED_TARGETS:
            if isinstance(target, str) and target.startswith(old):
                node["_target_"] = target = new + target[len(old) :]
        return node
    return [upgrade_targets(v) for v in node] if isinstance(node, list) else node


# Keys of a run config that say where outputs go or how a run is shown, not what it trains.
VOLATILE_KEYS = ("paths", "hydra", "extras", "logger", "callbacks", "ckpt_path", "export_ckpt",
                 "tags", "task_name")  # fmt: skip


def abstract_paths(config: dict) -> dict:
    """The config with every occurrence of its own ``paths.*`` directories replaced by
    ``<paths.name>``: values derived from where a run writes (``trainer.default_root_dir``,
    a teacher under ``paths.artifacts_dir``) then compare equal across locations."""
    paths = {k: str(v).rstrip("/") for k, v in (config.get("paths") or {}).items()}
    order = sorted(((k, v) for k, v in paths.items() if len(v) > 1), key=lambda kv: -len(kv[1]))
    pattern = [(re.compile(re.escape(v) + r"(?=/|$)"), f"<paths.{k}>") for k, v in order]

    def sub(node):
        if isinstance(node, dict):
            return {k: sub(v) for k, v in node.items()}
        if isinstance(node, list):
            return [sub(v) for v in node]
        if isinstance(node, str):
            for regex, name in pattern:
                node = regex.sub(name, node)
        return node

    return sub(config)


def config_differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys where two resolved run configs differ: ``VOLATILE_KEYS`` aside, and
    locations compared relative to each config's own ``paths`` (:func:`abstract_paths`)."""
    if not prefix:
        recorded, current = abstract_paths(recorded), abstract_paths(current)
    missing = object()
    out = []
    for k in sorted(set(recorded) | set(current), key=str):
        if not prefix and k in VOLATILE_KEYS:
            continue
        a, b = recorded.get(k, missing), current.get(k, missing)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out

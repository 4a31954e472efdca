"""Provenance of benchmark results: what was measured, with which code, where and when.

Every script under ``benchmarks/`` that writes into ``benchmarks/results/`` writes its
results through :func:`write`: ``<stem>.json`` holds ``{"provenance": ..., "results":
...}`` and ``<stem>.md`` starts with a stamp line (:func:`stamp`), e.g.

    measured at commit 1a2b3c4 (dirty) on 2026-12-02, load 0.4→1.9, 2 cores, AMD EPYC with AVX-512

The provenance holds:

* ``session``: the process that wrote the file: its command line, start and end (UTC),
  wall seconds, 1-minute load average at start and end, and the git state (commit and a
  dirty flag: ``git status --porcelain`` non-empty, the results files left out);
* ``machine``: cores, the CPU's model and instruction sets (:func:`cpu`), platform,
  python, and the torch / transformers / lightning / hydra versions;
* ``runs``: one record per measured run (a subprocess, or an in-process measurement):
  its label and seed, the exact command line or config overrides, its own commit and
  dirty flag (taken when it ran: a resumable benchmark's seeds may span sessions and
  commits), start, end, seconds, load at start and end, and for training runs the
  resolved config (:func:`resolved_config`, paths made relative).

A file whose runs were measured at more than one commit is stamped **MIXED COMMITS**,
naming which runs ran where (:func:`stamp`); ``benchmarks/tables.py`` renders the
README and docs tables with the same stamps. :func:`recipe_differences` compares the resolved
configs a script is about to run with those recorded in a results file: a script that
extends or reproduces a table refuses when they differ.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PACKAGES = ("torch", "transformers", "lightning", "hydra-core")
# the machine keys two results files must share to be one table (merge_seeds.py) or to
# be stamped with this machine's CPU (stamp_cpu.py, which also compares the platform)
SAME_MACHINE = ("cpu_count", "python", *PACKAGES)
SCHEMA = 1
RESULTS_PREFIX = "benchmarks/results/"
# Nothing downloads at run time: in the environment of every run a benchmark starts, and
# in its own process before transformers is imported.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline"}


def offline_env(**extra: str) -> dict[str, str]:
    """The environment of a run a benchmark starts: this process's, offline, plus ``extra``."""
    return {**os.environ, **OFFLINE, **extra}


def go_offline() -> None:
    """This process offline (call before importing transformers); values already set stay."""
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)


def now() -> str:
    """The time in UTC, to the second, ISO 8601."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def git_state(ignore: Iterable[str | Path] = (), root: Path = ROOT) -> dict[str, Any]:
    """``{"commit": HEAD or None, "dirty": bool or None, "dirty_paths": [...]}``: the
    working tree's uncommitted changes, ``ignore`` (the results files being written) and
    everything under ``benchmarks/results/`` (results, not code: a benchmark resumed
    after writing its table is not dirty for it) left out. ``commit`` is None outside a
    git checkout (e.g. a copied tree). ``root``: the checkout (this project's)."""
    skip = {_relative(p, root) for p in ignore}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                                text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None, "dirty_paths": []}
    paths = []
    for line in status.splitlines():
        path = line[3:].split(" -> ")[-1].strip('"')
        if path not in skip and not path.startswith(RESULTS_PREFIX):
            paths.append(path)
    return {"commit": head, "dirty": bool(paths), "dirty_paths": paths[:50]}


def _relative(path: str | Path, root: Path = ROOT) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


# instruction sets that change which CPU kernels torch and its BLAS run, so the rounding
# of a run: the same seed and commit computed different numbers on an AMD EPYC with AVX2
# than on the machine that measured the arith table at 541db6f (docs/benchmarks.md)
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")


def cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU's model name and which of :data:`ISA_FLAGS` it has (``None`` where
    ``cpuinfo`` cannot be read, e.g. not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {"cpu": platform.processor() or None, "cpu_isa": None}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    flags = set(fields.get("flags", "").split())
    return {"cpu": fields.get("model name"), "cpu_isa": [f for f in ISA_FLAGS if f in flags]}


def machine() -> dict[str, Any]:
    """Cores, CPU model and instruction sets, platform, python and package versions (no
    package is imported)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu_count": os.cpu_count(),
        **cpu(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **versions,
    }


def command_line(cmd: Iterable[str]) -> str:
    """``cmd`` as a shell line, this interpreter written as ``python``."""
    return shlex.join("python" if c == sys.executable else str(c) for c in cmd)


class Run:
    """One measured run: ``with Run(label, seed=..., command=...) as run: ...`` records
    its commit, start, end, seconds and load; ``run.record`` is the dict (add fields to
    it, e.g. ``config`` or raw numbers)."""

    def __init__(self, label: str, seed: int | None = None, command: Any = None,
                 ignore: Iterable[str | Path] = (), **fields: Any) -> None:  # fmt: skip
        self.record: dict[str, Any] = {"label": label, "seed": seed}
        if command is not None:
            self.record["command"] = command if isinstance(command, str) else command_line(command)
        self.record.update(fields)
        self.ignore = list(ignore)

    def __enter__(self) -> Run:
        git = git_state(self.ignore)
        self.record.update(commit=git["commit"], dirty=git["dirty"], started=now(),
                           load=[load_average(), None])  # fmt: skip
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.record.update(ended=now(), seconds=round(time.perf_counter() - self._t0, 1))
        self.record["load"][1] = load_average()


def run_command(cmd: list[str], log: Path, env: Mapping[str, str], label: str,
                seed: int | None = None, ok: tuple[int, ...] = (0,),
                **fields: Any) -> dict[str, Any]:  # fmt: skip
    """Run ``cmd`` in ``ROOT`` (output to ``log``) and return its record; exits unless its
    return code is in ``ok``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with Run(label, seed, cmd, **fields) as run, log.open("w") as f:
        done = subprocess.run(cmd, cwd=ROOT, env=dict(env), stdout=f, stderr=subprocess.STDOUT)
    run.record["returncode"] = done.returncode
    if done.returncode not in ok:
        raise SystemExit(f"failed (exit {done.returncode}): {command_line(cmd)}; see {log}")
    return run.record


def legacy_run(label: str, seed: int | None = None) -> dict[str, Any]:
    """The record standing for runs measured before provenance was recorded."""
    return {"label": label, "seed": seed, "commit": None, "legacy": True}


class Session:
    """The process writing a results file: created at its start, :meth:`finish` at its end."""

    def __init__(self, script: str | Path, outputs: Iterable[str | Path] = ()) -> None:
        self.outputs = [Path(o) for o in outputs]
        self.git = git_state(self.ignore)
        self.record: dict[str, Any] = {
            "script": _relative(script),
            "argv": [_relative(sys.argv[0]) if sys.argv else "", *sys.argv[1:]],
            "started": now(),
            "load": [load_average(), None],
            "commit": self.git["commit"],
            "dirty": self.git["dirty"],
            "dirty_paths": self.git["dirty_paths"],
        }
        self._t0 = time.perf_counter()

    @property
    def ignore(self) -> list[Path]:
        return [p for o in self.outputs for p in (o.with_suffix(".json"), o.with_suffix(".md"))]

    def run(self, label: str, seed: int | None = None, command: Any = None, **fields: Any) -> Run:
        """A :class:`Run` whose git state leaves this session's outputs out."""
        return Run(label, seed, command, ignore=self.ignore, **fields)

    def finish(
        self, runs: Iterable[Mapping[str, Any]] | None = None, **fields: Any
    ) -> dict[str, Any]:
        """The provenance: this session, the machine, ``runs`` (None: one record for the
        whole session, an in-process measurement) and ``fields``."""
        session = dict(self.record, ended=now(), seconds=round(time.perf_counter() - self._t0, 1))
        session["load"] = [session["load"][0], load_average()]
        in_process = runs is None
        runs = [dict(r) for r in runs or ()]
        if in_process:
            runs = [{"label": "session", "seed": None, "command": command_line(
                [sys.executable, *session["argv"]]), **{k: session[k] for k in (
                    "commit", "dirty", "started", "ended", "seconds", "load")}}]  # fmt: skip
        return {"schema": SCHEMA, "session": session, "machine": machine(), "runs": runs,
                **fields}  # fmt: skip


# ---------------------------------------------------------------------------- stamps


def short(commit: str | None) -> str:
    return commit[:7] if commit else "unknown"


def _day(iso: str | None) -> str:
    return iso[:10] if iso else "?"


def _load(x: float | None) -> str:
    return "?" if x is None else f"{x:.1f}"


def commits(prov: Mapping[str, Any]) -> list[str | None]:
    """The distinct commits of the measured runs, in order of appearance."""
    seen: list[str | None] = []
    for run in prov.get("runs") or []:
        if run.get("commit") not in seen:
            seen.append(run.get("commit"))
    return seen


def _who(runs: list[Mapping[str, Any]]) -> str:
    seeds = sorted({r["seed"] for r in runs if r.get("seed") is not None})
    labels = list(dict.fromkeys(str(r.get("label")) for r in runs))
    what = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}" if seeds else ""
    if len(labels) <= 4:
        what = (what + ": " if what else "") + ", ".join(labels)
    return what or f"{len(runs)} runs"


def _unknown(runs: list[Mapping[str, Any]]) -> str:
    if all(r.get("legacy") for r in runs):
        return "commit unknown: measured before provenance was recorded"
    return "commit unknown: outside git"


def cpu_name(machine: Mapping[str, Any]) -> str:
    """``AMD EPYC with AVX-512`` (or ``AVX2``, ``neither AVX2 nor AVX-512``) from a
    machine record; ``CPU not recorded`` where it has no ``cpu_isa`` (a file written
    before the CPU was recorded, 5cdf2f8, and not stamped since by ``stamp_cpu.py``)."""
    isa = machine.get("cpu_isa")
    if isa is None:
        return "CPU not recorded"
    name = (
        "AVX-512" if "avx512f" in isa else "AVX2" if "avx2" in isa else "neither AVX2 nor AVX-512"
    )
    return f"{machine.get('cpu') or 'CPU'} with {name}"


def cpu_text(prov: Mapping[str, Any]) -> str:
    """The CPU a results file's runs ran on; for a file joined from per-seed files
    (``merge_seeds.py``) on different CPUs, each file's: ``CPUs differ: ... (seeds 0,
    1); ... (seeds 2, 3, 4)``. The same seed and commit compute different numbers on
    CPUs of different instruction sets (docs/benchmarks.md)."""
    machine = prov.get("machine") or {}
    parts = [p for p in prov.get("merged_from") or [] if p.get("machine")]
    if "cpu_isa" in machine or not parts:
        return cpu_name(machine)
    seeds: dict[str, list] = {}  # CPU -> its seeds, files of one CPU together
    for p in parts:
        seeds.setdefault(cpu_name(p["machine"]), []).extend(p["seeds"])
    return "CPUs differ: " + "; ".join(
        f"{cpu} (seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))})"
        for cpu, s in seeds.items())  # fmt: skip


def stamp(prov: Mapping[str, Any]) -> str:
    """One line: the commit(s), date(s), load, cores and CPU of a results file's
    measurements.

    One commit: ``measured at commit <short> (dirty) on <date>, load <a>→<b>, <n> cores,
    <CPU>`` (:func:`cpu_text`)
    (several runs: the load at the first run's start and the last run's end, and the
    range over all runs). Several commits: **MIXED COMMITS**, each with its runs."""
    runs = list(prov.get("runs") or [])
    cores = (prov.get("machine") or {}).get("cpu_count")
    cores_text = (f"{cores} cores" if cores else "cores unknown") + ", " + cpu_text(prov)
    if not runs:
        return "no measured runs recorded"
    found = commits(prov)
    if len(found) > 1:
        parts = []
        for c in found:
            mine = [r for r in runs if r.get("commit") == c]
            dirty = " (dirty)" if any(r.get("dirty") for r in mine) else ""
            name = short(c) if c else _unknown(mine)
            parts.append(f"{name}{dirty} ({_who(mine)})")
        return (f"**MIXED COMMITS: not one code version; do not compare rows measured at "
                f"different commits**: {'; '.join(parts)}; {cores_text}")  # fmt: skip
    commit = found[0]
    dirty = " (dirty)" if any(r.get("dirty") for r in runs) else ""
    if commit is None and all(r.get("legacy") for r in runs):
        return "measured before provenance was recorded (commit unknown)"
    where = (
        "measured at commit " + short(commit) if commit else "measured outside git (commit unknown)"
    )
    days = sorted({_day(r.get("started")) for r in runs} | {_day(r.get("ended")) for r in runs})
    when = days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"
    first, last = runs[0].get("load") or [None, None], runs[-1].get("load") or [None, None]
    load = f"load {_load(first[0])}→{_load(last[1])}"
    if len(runs) > 1:
        values = [x for r in runs for x in (r.get("load") or []) if x is not None]
        if values:
            load += f" (range {min(values):.1f}-{max(values):.1f} over {len(runs)} runs)"
    return f"{where}{dirty} on {when}, {load}, {cores_text}"


# ------------------------------------------------------------------------- writing


def write(stem: str, results: Any, body: str, prov: Mapping[str, Any],
          out_dir: Path = RESULTS) -> str:  # fmt: skip
    """``<out_dir>/<stem>.json`` (``{"provenance", "results"}``) and ``<stem>.md`` (the stamp
    line, then ``body``); returns the md text."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(
        json.dumps({"provenance": prov, "results": results}, indent=2, default=str) + "\n"
    )
    text = stamp(prov) + "\n\n" + body.rstrip("\n") + "\n"
    (out_dir / f"{stem}.md").write_text(text)
    return text


def load(path: Path) -> tuple[Any, dict | None]:
    """``(results, provenance)`` of a results json; provenance None for a file written
    before provenance was recorded (its whole content is the results)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and set(data) == {"provenance", "results"}:
        return data["results"], data["provenance"]
    return data, None


# ------------------------------------------------------------------- configs, recipes

# Keys whose values name where a run writes or reads files, not what it computes.
LOCATION_KEYS = ("paths", "hydra", "export_ckpt", "ckpt_path", "output_dir", "extras")


def resolved_config(overrides: list[str], config_name: str = "train",
                    replace: Mapping[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """The resolved config ``python -m distillery.<config_name> <overrides>`` runs with
    (hydra.* overrides dropped; ``paths.output_dir`` defaults to ``RUN_DIR``), every string
    holding a path of ``replace`` (default: the repository root -> ``<root>``) rewritten,
    so that configs measured in different directories compare."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from distillery.config.resolvers import CONFIG_DIR

    overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]
    if not any(o.lstrip("+").startswith("paths.output_dir=") for o in overrides):
        overrides.append("paths.output_dir=RUN_DIR")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    GlobalHydra.instance().clear()
    return relocated(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False),
                     replace or {str(ROOT): "<root>"})  # fmt: skip


def relocated(value: Any, replace: Mapping[str, str]) -> Any:
    """``value`` with each key of ``replace`` in its strings replaced (longest first)."""
    if isinstance(value, dict):
        return {k: relocated(v, replace) for k, v in value.items()}
    if isinstance(value, list):
        return [relocated(v, replace) for v in value]
    if isinstance(value, str):
        for old in sorted(replace, key=len, reverse=True):
            value = value.replace(old, replace[old])
    return value


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": leaf}`` of nested dicts (lists are leaves)."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: value}


def config_differences(recorded: Mapping[str, Any], now_: Mapping[str, Any],
                       ignore: Iterable[str] = LOCATION_KEYS) -> list[str]:  # fmt: skip
    """``key: recorded <a>, now <b>`` for every key whose value differs (or exists in one
    config only), keys under ``ignore`` (top-level names or dotted prefixes) left out."""
    skip = tuple(ignore)
    a, b = flatten(recorded), flatten(now_)
    lines = []
    for key in sorted(set(a) | set(b)):
        if any(key == s or key.startswith(s + ".") for s in skip):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(
                f"{key}: recorded {a.get(key, '<absent>')!r}, now {b.get(key, '<absent>')!r}"
            )
    return lines


def recipe_differences(recorded: Mapping[Any, Mapping | None], planned: Mapping[Any, Mapping],
                       table: str) -> list[str]:  # fmt: skip
    """Why the runs ``planned`` ({key: resolved config}) would not reproduce or extend the
    table whose runs are ``recorded`` ({key: resolved config, or None where the file
    recorded none}), one message per problem; empty when every planned key that the
    table holds has the recorded config and the table records configs at all.

    A key is e.g. ``(method, seed)``; a planned key the table lacks (a new seed) is
    compared with the recorded runs of the same first element (method) instead, its
    seed-valued keys aside. Recorded ``_target_``s are read at today's paths (code that
    moved is the same recipe: ``distillery.config.MOVED_TARGETS``)."""
    from distillery.config import upgrade_targets

    recorded = {k: None if v is None else upgrade_targets(dict(v)) for k, v in recorded.items()}
    problems = []
    missing = [k for k, v in recorded.items() if v is None]
    if missing and len(missing) == len(recorded):
        return [f"{table} records no resolved configs (measured before they were recorded): "
                f"what it was measured with cannot be checked, so it cannot be reproduced or "
                f"extended; measure a new table instead"]  # fmt: skip
    if missing:
        problems.append(f"{table} holds runs without a recorded config: "
                        + ", ".join(_key(k) for k in missing))  # fmt: skip
    for key, config in planned.items():
        if key in recorded:
            if recorded[key] is None:
                continue
            diffs = config_differences(recorded[key], config)
            ref = key
        else:
            group = key[0] if isinstance(key, tuple) else None
            refs = [k for k in recorded if isinstance(k, tuple) and k[0] == group
                    and recorded[k] is not None]  # fmt: skip
            if not refs:
                continue  # a new row: nothing to compare with
            ref = refs[0]
            diffs = other_seed_differences(recorded[ref], config, ref[-1], key[-1])
        if diffs:
            problems.append(f"{table} {_key(ref)} was measured with a different config than "
                            f"{_key(key)} would run now:\n    " + "\n    ".join(diffs))  # fmt: skip
    return problems


def other_seed_differences(recorded: Mapping, planned: Mapping, seed_was: Any,
                           seed_now: Any) -> list[str]:  # fmt: skip
    """The differences of two runs' configs at different seeds, leaving out keys that
    hold each run's own seed (``seed``, ``data.seed: ${seed}``) and strings that differ
    only by it (``.../seed0/...`` vs ``.../seed3/...``). A value equal in both runs is
    the same recipe, even where it names a seed: the control table's shared teacher
    (``teachers/text_lm_teacher_seed0.ckpt`` at every student seed) is not seed 0's own."""

    def own(value: Any, seed: Any) -> Any:
        return value.replace(f"seed{seed}", "seed<seed>") if isinstance(value, str) else value

    raw_a, raw_b = flatten(recorded), flatten(planned)
    a = {k: v if raw_b.get(k) == v else own(v, seed_was) for k, v in raw_a.items()}
    b = {k: v if raw_a.get(k) == v else own(v, seed_now) for k, v in raw_b.items()}
    for k in set(a) & set(b):  # ints that are each run's own seed
        if type(a[k]) is int and type(b[k]) is int and (a[k], b[k]) == (seed_was, seed_now):
            a[k] = b[k] = "<seed>"
    return config_differences(a, b)


def _key(key: Any) -> str:
    if isinstance(key, tuple):
        return " ".join(f"seed {k}" if i == len(key) - 1 and isinstance(k, int) else str(k)
                        for i, k in enumerate(key))  # fmt: skip
    return str(key)

"""How long the README's two commands take: ``make distill`` (``--target distill``, the
default) or ``make test`` (``--target test``) on a fresh clone.

Each repeat clones this repository's HEAD into a scratch directory (committed files
only, no ``artifacts/``: the teacher is trained as on a user's first run), then times,
separately, ``make setup`` (creating ``.venv`` and installing; pip's download cache is
whatever this machine has, recorded as such) and ``make <target>`` (the job); for
``distill`` it reads each stage's wall time from the run's ``stages.json``, for ``test``
pytest's summary line (the counts of passed, skipped, failed tests, and its own time). The clone is deleted afterwards
(its logs are kept under ``--out``). Install and job are reported apart: the first
depends on the network and the cache, the second on the cores and their load, which
each repeat records at start and end.

    python benchmarks/make_distill_time.py [--target distill|test] [--repeats 3]
        [--out logs/bench_make_<target>] [--args "seed=1"]

Writes ``benchmarks/results/make_<target>.md`` and ``make_<target>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

ROOT = provenance.ROOT


def timed(session: provenance.Session, label: str, seed: int, cmd: list[str], cwd: Path,
          log: Path, env: dict) -> dict:  # fmt: skip
    """Run ``cmd`` in ``cwd`` (output to ``log``) as one measured run; exits on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with session.run(label, seed, cmd) as run, log.open("w") as f:
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    run.record["returncode"] = done.returncode
    if done.returncode != 0:
        raise SystemExit(f"failed (exit {done.returncode}): {' '.join(cmd)} in {cwd}; see {log}")
    return run.record


def stage_seconds(clone: Path) -> dict[str, float]:
    """Each stage's wall seconds from the run's ``stages.json`` (the newest run)."""
    found = sorted((clone / "logs" / "distill").glob("runs/*/stages.json"))
    if not found:
        raise SystemExit(f"no stages.json under {clone / 'logs' / 'distill'}")
    stages = json.loads(found[-1].read_text())
    return {name: float(s["seconds"]) for name, s in stages.items() if "seconds" in s}


PYTEST_SUMMARY = re.compile(r"^=* ?(?P<counts>\d+ (?:passed|failed)[^=]*?) in (?P<s>[\d.]+)s", re.M)


def pytest_summary(log: Path) -> dict:
    """``{passed: n, skipped: n, ..., seconds: s}`` from pytest's last summary line."""
    found = PYTEST_SUMMARY.findall(log.read_text())
    if not found:
        raise SystemExit(f"no pytest summary line in {log}")
    counts, seconds = found[-1]
    parsed = {w: int(n) for n, w in re.findall(r"(\d+) (\w+)", counts)}
    return {**parsed, "seconds": float(seconds)}


def repeat(session: provenance.Session, i: int, out: Path, make_args: str, env: dict,
           target: str = "distill") -> dict:  # fmt: skip
    scratch = Path(tempfile.mkdtemp(prefix=f"make_{target}_"))
    clone = scratch / "distillery"
    log = out / f"repeat{i}" / f"{target}.log"
    try:
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        install = timed(session, "make setup", i, ["make", "setup"], clone,
                        out / f"repeat{i}" / "setup.log", env)  # fmt: skip
        cmd = ["make", target] + ([f"ARGS={make_args}"] if make_args else [])
        job = timed(session, f"make {target}", i, cmd, clone, log, env)
        stages = stage_seconds(clone) if target == "distill" else {}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    found = {"repeat": i, "install_s": install["seconds"], "job_s": job["seconds"],
             "stages_s": stages, "runs": [install, job]}  # fmt: skip
    if target == "test":
        found["pytest"] = pytest_summary(log)
    return found


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.0f} s"
    return (f"{statistics.mean(values):.0f} ± {statistics.stdev(values):.0f} s "
            f"({min(values):.0f}-{max(values):.0f})")  # fmt: skip


def table(results: list[dict]) -> str:
    """Install, job and each stage (for ``make test``: pytest's own time and counts):
    mean ± std (min-max) over the repeats, in seconds."""
    target = "test" if "pytest" in results[0] else "distill"
    rows = [("install (`make setup` on the fresh clone)", [r["install_s"] for r in results]),
            (f"job (`make {target}` once installed)", [r["job_s"] for r in results])]  # fmt: skip
    for name in results[0]["stages_s"]:
        rows.append((f"stage `{name}`", [r["stages_s"].get(name, 0.0) for r in results]))
    if target == "test":
        rows.append(("pytest's own time (its summary line)",
                     [r["pytest"]["seconds"] for r in results]))  # fmt: skip
    loads = [x for r in results for run in r["runs"] for x in run["load"] if x is not None]
    lines = [f"`make {target}` on a fresh clone, {len(results)} repeat(s), wall seconds "
             "(mean ± std, min-max):", "", "| part | seconds |", "|---|---|"]  # fmt: skip
    lines += [f"| {name} | {_cell(v)} |" for name, v in rows]
    if target == "test":
        counts = [", ".join(f"{n} {w}" for w, n in r["pytest"].items() if w != "seconds")
                  for r in results]  # fmt: skip
        lines += ["", "Tests per repeat: " + "; ".join(counts) + "."]
    if loads:
        lines += ["", f"Load average during the repeats: {min(loads):.1f}-{max(loads):.1f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("distill", "test"), default="distill")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="logs (default: logs/bench_make_<target>)")
    parser.add_argument(
        "--args", default="", help="ARGS passed to make (pipeline overrides, pytest options)"
    )
    parser.add_argument("--results-dir", type=Path, default=provenance.RESULTS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    stem = f"make_{args.target}"
    out = args.out or ROOT / "logs" / f"bench_{stem}"
    session = provenance.Session(__file__, [args.results_dir / f"{stem}.json"])
    if session.git["dirty"]:
        print(f"note: uncommitted changes are not in the clone: {session.git['dirty_paths']}")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    results = [repeat(session, i, out, args.args, env, args.target) for i in range(args.repeats)]
    prov = session.finish([run for r in results for run in r["runs"]], target=args.target,
                          make_args=args.args, pip_cache=_pip_cache())  # fmt: skip
    print(provenance.write(stem, results, table(results), prov, args.results_dir))


def _pip_cache() -> str | None:
    """pip's cache directory as this machine's pip reports it (None: none or no pip)."""
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


if __name__ == "__main__":
    main()

"""How long the README's first command takes: ``make distill`` on a fresh clone.

Each repeat clones this repository's HEAD into a scratch directory (committed files
only, no ``artifacts/``: the teacher is trained as on a user's first run), then times,
separately, ``make setup`` (creating ``.venv`` and installing; pip's download cache is
whatever this machine has, recorded as such) and ``make distill`` (the job), and reads
each stage's wall time from the run's ``stages.json``. The clone is deleted afterwards
(its logs are kept under ``--out``). Install and job are reported apart: the first
depends on the network and the cache, the second on the cores and their load, which
each repeat records at start and end.

    python benchmarks/make_distill_time.py [--repeats 3] [--out logs/bench_make_distill]
        [--args "seed=1"]

Writes ``benchmarks/results/make_distill.md`` and ``make_distill.json``.
"""

from __future__ import annotations

import argparse
import json
import os
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


def repeat(session: provenance.Session, i: int, out: Path, make_args: str, env: dict) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="make_distill_"))
    clone = scratch / "distillery"
    try:
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        install = timed(session, "make setup", i, ["make", "setup"], clone,
                        out / f"repeat{i}" / "setup.log", env)  # fmt: skip
        cmd = ["make", "distill"] + ([f"ARGS={make_args}"] if make_args else [])
        job = timed(session, "make distill", i, cmd, clone, out / f"repeat{i}" / "distill.log", env)
        stages = stage_seconds(clone)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"repeat": i, "install_s": install["seconds"], "job_s": job["seconds"],
            "stages_s": stages, "runs": [install, job]}  # fmt: skip


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.0f} s"
    return (f"{statistics.mean(values):.0f} ± {statistics.stdev(values):.0f} s "
            f"({min(values):.0f}-{max(values):.0f})")  # fmt: skip


def table(results: list[dict]) -> str:
    """Install, job and each stage: mean ± std (min-max) over the repeats, in seconds."""
    rows = [("install (`make setup` on the fresh clone)", [r["install_s"] for r in results]),
            ("job (`make distill` once installed)", [r["job_s"] for r in results])]  # fmt: skip
    for name in results[0]["stages_s"]:
        rows.append((f"stage `{name}`", [r["stages_s"].get(name, 0.0) for r in results]))
    loads = [x for r in results for run in r["runs"] for x in run["load"] if x is not None]
    lines = [f"`make distill` on a fresh clone, {len(results)} repeat(s), wall seconds "
             "(mean ± std, min-max):", "", "| part | seconds |", "|---|---|"]  # fmt: skip
    lines += [f"| {name} | {_cell(v)} |" for name, v in rows]
    if loads:
        lines += ["", f"Load average during the repeats: {min(loads):.1f}-{max(loads):.1f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "bench_make_distill")
    parser.add_argument(
        "--args", default="", help="ARGS passed to make distill (pipeline overrides)"
    )
    parser.add_argument("--results-dir", type=Path, default=provenance.RESULTS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    session = provenance.Session(__file__, [args.results_dir / "make_distill.json"])
    if session.git["dirty"]:
        print(f"note: uncommitted changes are not in the clone: {session.git['dirty_paths']}")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    results = [repeat(session, i, args.out, args.args, env) for i in range(args.repeats)]
    prov = session.finish([run for r in results for run in r["runs"]],
                          make_args=args.args, pip_cache=_pip_cache())  # fmt: skip
    print(provenance.write("make_distill", results, table(results), prov, args.results_dir))


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

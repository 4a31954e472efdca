"""Distillation vs its control: every shipped distillation experiment that runs on this
machine, next to the same student trained without its teacher, over seeds.

For each experiment and seed this runs the main job (``python -m distillery.pipeline``)
with ``stages.teacher`` = the experiment's teacher run, ``stages.student`` = the
experiment, and the default ``stages.control`` (the experiment + ``control=true``: same
student, data, views, schedule and seed, no teacher and no teacher-only term), in a
fresh subprocess. Each seed trains its own teacher once (shared by every experiment of
that seed: the pipeline reuses a teacher checkpoint made by the same configuration).
A finished (experiment, seed), in ``--out`` or in the committed ``controls.json``, is
not run again: rerun the script to resume; ``--report`` tabulates what has finished
without running anything.

Writes ``benchmarks/results/controls.md`` (the README table) and ``controls.json``
(every number) and prints the table: teacher, control and distilled student on the test
split (mean ± std over seeds), distilled - control, and the mean wall time of the
control and distilled runs.

    python benchmarks/controls.py [--seeds 0 1 2] [--only digits_fm mnist1d_kd ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# These teachers take 10-25 minutes each to train here: one (seed 0) serves every student
# seed, so those rows' spread is the students' alone.
SHARED_TEACHER = {"text_lm_teacher", "digits_bert_teacher"}

# experiment -> (teacher experiment, report metric, higher is better)
ROWS = {
    "digits_kd": ("digits_teacher", "accuracy", True),
    "digits_fm": ("digits_teacher", "accuracy", True),
    "mnist1d_kd": ("mnist1d_teacher", "accuracy", True),
    "mnist1d_dkd": ("mnist1d_teacher", "accuracy", True),
    "mnist1d_fitnet": ("mnist1d_teacher", "accuracy", True),
    "mnist1d_fm": ("mnist1d_teacher", "accuracy", True),
    "bert_hidden_attention": ("digits_bert_teacher", "accuracy", True),
    "text_lm_kd": ("text_lm_teacher", "ppl", False),
    "text_lm_kd_hidden": ("text_lm_teacher", "ppl", False),
}


def mean_std(values: list[float], fmt: str) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{fmt}} ± {std:{fmt.lstrip('+')}}"


def run_one(name: str, seed: int, out: Path, env: dict, run: bool = True) -> dict | None:
    """One pipeline run (teacher reused when present, control, distilled) -> its numbers;
    ``run=False``: the numbers of a finished run, or None."""
    teacher, metric, _ = ROWS[name]
    run_dir = out / name / f"seed{seed}"
    if not ((run_dir / "report.json").is_file() and (run_dir / "stages.json").is_file()):
        if not run:
            return None
        teacher_seed = 0 if teacher in SHARED_TEACHER else seed
        cmd = [
            sys.executable, "-m", "distillery.pipeline", f"seed={seed}",
            f"stages.teacher=['experiment={teacher}','seed={teacher_seed}']", f"stages.student=['experiment={name}']",
            "extra_students=null", f"teacher_ckpt={out / 'teachers' / f'{teacher}_seed{teacher_seed}.ckpt'}",
            f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        log = run_dir.with_suffix(".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode:
            raise SystemExit(f"{name} seed {seed} failed (exit {done.returncode}): see {log}")
    models = json.loads((run_dir / "report.json").read_text())["models"]
    stages = json.loads((run_dir / "stages.json").read_text())
    return {
        "teacher": models["teacher"][metric],
        "control": models["control"][metric],
        "distilled": models["student"][metric],
        "control_s": stages["control"]["seconds"],
        "distilled_s": stages["student"]["seconds"],
        "seed": seed,
    }


def table(results: dict[str, list[dict]]) -> str:
    lines = [
        "| experiment | metric | seeds | teacher | control (no teacher) | distilled | "
        "distilled - control | time: control / distilled |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        _, metric, higher = ROWS[name]
        fmt = ".4f" if metric == "accuracy" else ".2f"
        diff = [r["distilled"] - r["control"] for r in runs]
        better = statistics.mean(diff) > 0 if higher else statistics.mean(diff) < 0
        cells = [
            f"`{name}`",
            metric + (" (higher is better)" if higher else " (lower is better)"),
            ", ".join(str(r["seed"]) for r in runs),
            *(mean_std([r[k] for r in runs], fmt) for k in ("teacher", "control", "distilled")),
            ("**" if better else "") + mean_std(diff, "+" + fmt) + ("**" if better else ""),
            f"{statistics.mean(r['control_s'] for r in runs):.0f} s / "
            f"{statistics.mean(r['distilled_s'] for r in runs):.0f} s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "bench_controls")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: tabulate the finished (experiment, seed) runs")  # fmt: skip
    args = parser.parse_args()
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    results_json = ROOT / "benchmarks" / "results" / "controls.json"
    saved = json.loads(results_json.read_text()) if results_json.is_file() else {}
    done = {(name, r["seed"]): r for name, runs in saved.items() for r in runs}
    if not args.report:
        for name in args.only:
            for seed in args.seeds:
                if (name, seed) in done:  # measured before (committed results)
                    continue
                start = time.perf_counter()
                numbers = run_one(name, seed, args.out, env)
                print(
                    f"{name} seed {seed} ({time.perf_counter() - start:.0f} s): {numbers}",
                    flush=True,
                )
    results = {}
    for name in ROWS:
        runs = [
            r
            for seed in args.seeds
            if (r := done.get((name, seed)) or run_one(name, seed, args.out, env, run=False))
        ]
        if runs:
            results[name] = runs
    results_json.parent.mkdir(parents=True, exist_ok=True)
    results_json.write_text(json.dumps(results, indent=2))
    text = (
        "Test split, mean ± std over the seeds listed; each seed trains its own teacher "
        "(BERT and language-model rows: one teacher, seed 0, for every student seed). "
        "Control: the same experiment with `control=true`. Times: wall seconds per run on "
        "this machine (2 CPU cores, shared with other jobs while measured).\n\n" + table(results)
    )
    (ROOT / "benchmarks" / "results" / "controls.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

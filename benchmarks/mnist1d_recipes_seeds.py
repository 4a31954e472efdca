"""MNIST-1D: teacher vs scratch student vs distillation recipes, over seeds.

Runs the `make distill` pipeline (python -m distillery.pipeline) once per seed, each
with its own teacher trained at that seed, in fresh subprocesses. Besides the pipeline's
own student (function matching, `experiment=mnist1d_fm`) it distills two more students
for comparison: plain KD on the labeled set (`kd_labeled`) and KD with the 50k
unlabeled transfer set (`kd_transfer`). Prints mean and std of the report-card metrics,
the share of the teacher-student gap each recipe recovers, and the wall time of each
pipeline run; writes the tables to benchmarks/results/mnist1d_recipes_seeds.md.

    python benchmarks/mnist1d_recipes_seeds.py [--seeds 0 1 2] [extra pipeline overrides...]
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
METRICS = ("accuracy", "nll", "ece", "agreement", "kl_to_teacher")
# kd_transfer is one of the pipeline's own extra students (conf/pipeline.yaml).
EXTRA_STUDENTS = ["+extra_students.kd_labeled=['experiment=mnist1d_kd','data.transfer_size=0']"]
# The comparison here is the scratch MLP on the labeled set (the pipeline's default is the
# student's own no-teacher control; benchmarks/controls.py compares those).
SCRATCH = "stages.control=['experiment=mnist1d_baseline']"


def mean_std(vals: list[float], fmt: str = ".4f") -> str:
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):{fmt}} ± {std:{fmt}}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "bench_mnist1d_recipes")
    args, extra = parser.parse_known_args()
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    reports, times = [], []
    for seed in args.seeds:
        run_dir = args.out / f"seed{seed}"
        cmd = [
            sys.executable, "-m", "distillery.pipeline", f"seed={seed}", "retrain_teacher=true",
            f"teacher_ckpt={args.out / f'teacher_seed{seed}.ckpt'}", f"hydra.run.dir={run_dir}",
            SCRATCH, *EXTRA_STUDENTS, *extra,
        ]  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
        reports.append(json.loads((run_dir / "report.json").read_text()))
        acc = {m: round(r["accuracy"], 4) for m, r in reports[-1]["models"].items()}
        print(f"seed {seed}: {times[-1]:.0f} s, accuracy {acc}", flush=True)

    models = list(reports[0]["models"])
    lines = [
        f"MNIST-1D, {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), test split, mean ± std. "
        f"One pipeline run per seed (teacher, scratch MLP (`control`) and three students trained): "
        f"{statistics.mean(times):.0f} s on average.",
        "",
        "| metric | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for key in METRICS:
        cells = [mean_std([r["models"][m][key] for r in reports]) for m in models]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "| recipe | accuracy gain over scratch | gap recovered: (student - scratch) / (teacher - scratch) |",
              "|---|---|---|"]  # fmt: skip
    for m in models:
        if m in ("teacher", "control"):
            continue
        gain = [r["models"][m]["accuracy"] - r["models"]["control"]["accuracy"] for r in reports]
        gap = [
            (r["models"][m]["accuracy"] - r["models"]["control"]["accuracy"])
            / (r["models"]["teacher"]["accuracy"] - r["models"]["control"]["accuracy"])
            for r in reports
        ]
        lines.append(f"| {m} | {mean_std(gain, '+.4f')} | {mean_std(gap, '.1%')} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results" / "mnist1d_recipes_seeds.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()

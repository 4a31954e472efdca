"""MNIST-1D: teacher vs scratch student vs distilled student over seeds.

Runs the `make distill` pipeline (python -m distillery.pipeline) once per seed, each
with its own teacher trained at that seed, in fresh subprocesses, and prints mean and
std of the report-card metrics plus the wall time of each pipeline run. Writes the
table to benchmarks/results/mnist1d_kd_seeds.md.

    python benchmarks/mnist1d_kd_seeds.py [--seeds 0 1 2] [extra pipeline overrides...]
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "bench_mnist1d_kd")
    args, extra = parser.parse_known_args()
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    reports, times = [], []
    for seed in args.seeds:
        run_dir = args.out / f"seed{seed}"
        cmd = [
            sys.executable,
            "-m",
            "distillery.pipeline",
            f"seed={seed}",
            "retrain_teacher=true",
            f"teacher_ckpt={args.out / f'teacher_seed{seed}.ckpt'}",
            f"hydra.run.dir={run_dir}",
            *extra,
        ]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
        reports.append(json.loads((run_dir / "report.json").read_text()))
        acc = {m: r["accuracy"] for m, r in reports[-1]["models"].items()}
        print(f"seed {seed}: {times[-1]:.0f} s, accuracy {acc}", flush=True)

    models = list(reports[0]["models"])
    lines = [
        f"MNIST-1D, {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), mean ± std; "
        f"pipeline wall time per seed {statistics.mean(times):.0f} s (teacher trained each time).",
        "",
        "| metric | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for key in METRICS:
        cells = []
        for m in models:
            vals = [r["models"][m][key] for r in reports]
            cells.append(
                f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.4f}"
            )
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    gain = [
        r["models"]["student"]["accuracy"] - r["models"]["baseline"]["accuracy"] for r in reports
    ]
    gap = [
        (r["models"]["student"]["accuracy"] - r["models"]["baseline"]["accuracy"])
        / (r["models"]["teacher"]["accuracy"] - r["models"]["baseline"]["accuracy"])
        for r in reports
    ]
    lines += [
        "",
        f"distilled - scratch accuracy: {statistics.mean(gain):+.4f} ± {statistics.stdev(gain) if len(gain) > 1 else 0:.4f}",
        f"teacher-student gap recovered (student - scratch) / (teacher - scratch): "
        f"{statistics.mean(gap):.1%} ± {statistics.stdev(gap) if len(gap) > 1 else 0:.1%}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results" / "mnist1d_kd_seeds.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()

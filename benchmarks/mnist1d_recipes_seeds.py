"""MNIST-1D: teacher vs scratch student vs distillation recipes, over seeds.

Runs the `make distill` pipeline (python -m distillery.pipeline) once per seed, each
with its own teacher trained at that seed, in fresh subprocesses. Besides the pipeline's
own student (function matching, `experiment=mnist1d_fm`) it distills two more students
for comparison: plain KD on the labeled set (`kd_labeled`) and KD with the 50k
unlabeled transfer set (`kd_transfer`). Prints mean and std of the report-card metrics,
the share of the teacher-student gap each recipe recovers, and the wall time of each
pipeline run, with each recipe's gain over scratch paired by seed (95 % interval and
verdict, ``stats.py``); writes benchmarks/results/mnist1d_recipes_seeds.md and .json
(per-seed report cards and each seed's pipeline command, commit, times and load:
``provenance.py``).

    python benchmarks/mnist1d_recipes_seeds.py [--seeds 0 1 2] [extra pipeline overrides...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
import stats  # noqa: E402

ROOT = provenance.ROOT
METRICS = ("accuracy", "nll", "ece", "agreement", "kl_to_teacher")
# kd_transfer is one of the pipeline's own extra students (conf/pipeline.yaml).
EXTRA_STUDENTS = ["+extra_students.kd_labeled=['experiment=mnist1d_kd','data.transfer_size=0']"]
# The comparison here is the scratch MLP on the labeled set (the pipeline's default is the
# student's own no-teacher control; benchmarks/controls.py compares those). The report
# card names it `control`.
SCRATCH = "stages.control=['experiment=mnist1d_baseline']"
LABELS = {
    "teacher": "teacher (CNN, `mnist1d_teacher`)",
    "student": "function matching (MLP, `mnist1d_fm`)",
    "kd_transfer": "KD + transfer set (`mnist1d_kd`)",
    "kd_labeled": "KD, labeled set only",
    "control": "scratch MLP (`mnist1d_baseline`)",
}


def mean_std(vals: list[float], fmt: str = ".4f") -> str:
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):{fmt}} ± {std:{fmt.lstrip('+')}}"


def table(results: list[dict]) -> str:
    """The report-card metrics of every model (mean ± std over the seeds), then each
    recipe's accuracy gain over the scratch MLP, paired by seed, with its 95 % interval
    and verdict, and the share of the teacher-scratch gap it recovers."""
    models = list(results[0]["models"])
    seconds = [r["seconds"] for r in results if r.get("seconds")]
    lines = [
        f"MNIST-1D, {len(results)} seeds ({', '.join(str(r['seed']) for r in results)}), test split, "
        f"mean ± std. One pipeline run per seed (teacher, scratch MLP and three students trained)"
        + (f": {statistics.mean(seconds):.0f} s on average." if seconds else "."),
        "",
        "| metric | " + " | ".join(LABELS.get(m, m) for m in models) + " |",
        "|---|" + "---|" * len(models),
    ]  # fmt: skip
    for key in METRICS:
        cells = [mean_std([r["models"][m][key] for r in results]) for m in models]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "| recipe | accuracy gain over scratch (mean ± std) | 95 % interval (paired t) | verdict "
              "| gap recovered: (student - scratch) / (teacher - scratch) |", "|---|---|---|---|---|"]  # fmt: skip
    for m in models:
        if m in ("teacher", "control"):
            continue
        gain = [r["models"][m]["accuracy"] - r["models"]["control"]["accuracy"] for r in results]
        gap = [
            (r["models"][m]["accuracy"] - r["models"]["control"]["accuracy"])
            / (r["models"]["teacher"]["accuracy"] - r["models"]["control"]["accuracy"])
            for r in results
        ]
        interval = stats.interval_text(gain, "+.4f").split(" ", 1)[-1] if len(gain) > 1 else ""
        verdict = stats.verdict(gain, a=LABELS.get(m, m), b="scratch")
        lines.append(f"| {LABELS.get(m, m)} | {mean_std(gain, '+.4f')} | {interval} | {verdict} "
                     f"| {mean_std(gap, '.1%')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "bench_mnist1d_recipes")
    parser.add_argument("--results-dir", type=Path, default=provenance.RESULTS)
    args, extra = parser.parse_known_args()
    session = provenance.Session(__file__, [args.results_dir / "mnist1d_recipes_seeds.json"])
    env = provenance.offline_env()
    results = []
    for seed in args.seeds:
        run_dir = args.out / f"seed{seed}"
        cmd = [
            sys.executable, "-m", "distillery.pipeline", f"seed={seed}", "retrain_teacher=true",
            f"teacher_ckpt={args.out / f'teacher_seed{seed}.ckpt'}", f"hydra.run.dir={run_dir}",
            SCRATCH, *EXTRA_STUDENTS, *extra,
        ]  # fmt: skip
        run = provenance.run_command(cmd, run_dir.with_suffix(".log"), env, "pipeline", seed)
        report = json.loads((run_dir / "report.json").read_text())
        run["stages"] = json.loads((run_dir / "stages.json").read_text())  # each stage's overrides
        results.append({"seed": seed, "models": report["models"], "seconds": run["seconds"],
                        "run": run})  # fmt: skip
        acc = {m: round(r["accuracy"], 4) for m, r in report["models"].items()}
        print(f"seed {seed}: {run['seconds']:.0f} s, accuracy {acc}", flush=True)
    prov = session.finish([r["run"] for r in results], seeds=args.seeds, extra_overrides=extra)
    print(
        provenance.write("mnist1d_recipes_seeds", results, table(results), prov, args.results_dir)
    )


if __name__ == "__main__":
    main()

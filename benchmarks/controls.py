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
split (mean ± std over seeds), distilled - control with its paired 95 % interval and
verdict (``stats.py``), and the mean wall time of the control and distilled runs.

Each (experiment, seed) keeps the record of its pipeline run (``provenance.py``: command,
commit, dirty flag, times, load, and the resolved configs of its control and distilled
stages), so a table whose rows ran at different commits is stamped so. A new seed is
added to a row only if the configs it would run equal those recorded for the row's other
seeds (rows measured before configs were recorded: never); ``--new-table`` drops the
committed rows of ``--only`` and measures them afresh.

    python benchmarks/controls.py [--seeds 0 1 2 3 4] [--only digits_fm mnist1d_kd ...] [--new-table]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
import stats  # noqa: E402

ROOT = provenance.ROOT

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

# Rows compared with each other, paired by seed (the same teachers, data and schedule):
# (row, other row, what their difference measures). Only rows whose every seed ran at
# one commit, the same for both, are compared.
BETWEEN = (
    ("mnist1d_fitnet", "mnist1d_kd", "the FitNet hint on top of KD"),
    ("mnist1d_dkd", "mnist1d_kd", "DKD in place of KD"),
    ("text_lm_kd_hidden", "text_lm_kd", "hidden-state matching on top of token KD"),
)


def mean_std(values: list[float], fmt: str) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{fmt}} ± {std:{fmt.lstrip('+')}}"


def pipeline_command(name: str, seed: int, out: Path) -> tuple[list[str], Path]:
    """The pipeline command of one (experiment, seed) and its run directory."""
    teacher = ROWS[name][0]
    teacher_seed = 0 if teacher in SHARED_TEACHER else seed
    run_dir = out / name / f"seed{seed}"
    cmd = [
        sys.executable, "-m", "distillery.pipeline", f"seed={seed}",
        f"stages.teacher=['experiment={teacher}','seed={teacher_seed}']", f"stages.student=['experiment={name}']",
        "extra_students=null", f"teacher_ckpt={out / 'teachers' / f'{teacher}_seed{teacher_seed}.ckpt'}",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    return cmd, run_dir


def stage_configs(name: str, seed: int, out: Path) -> dict[str, dict]:
    """The resolved configs of the control and distilled stages the pipeline runs for
    (``name``, ``seed``): the stage's overrides, the seed and the stage's output dir, as
    ``distillery.pipeline.stage_config`` composes them; paths relative to ``out``."""
    teacher = ROWS[name][0]
    teacher_seed = 0 if teacher in SHARED_TEACHER else seed
    ckpt = out / "teachers" / f"{teacher}_seed{teacher_seed}.ckpt"
    run_dir = out / name / f"seed{seed}"
    stages = {"control": [f"experiment={name}", "control=true"],
              "distilled": [f"experiment={name}", f"teacher.ckpt_path={ckpt}"]}  # fmt: skip
    replace = {str(out): "<out>", str(ROOT): "<root>"}
    return {
        stage: provenance.resolved_config(
            [*overrides, f"seed={seed}", f"paths.output_dir={run_dir / stage}"], replace=replace
        )
        for stage, overrides in stages.items()
    }


def run_one(name: str, seed: int, out: Path, env: dict, run: bool = True) -> dict | None:
    """One pipeline run (teacher reused when present, control, distilled) -> its numbers
    and run record; ``run=False``: the numbers of a finished run, or None."""
    _, metric, _ = ROWS[name]
    cmd, run_dir = pipeline_command(name, seed, out)
    record_path = run_dir / "run.json"
    if not ((run_dir / "report.json").is_file() and (run_dir / "stages.json").is_file()):
        if not run:
            return None
        configs = stage_configs(name, seed, out)
        record = provenance.run_command(cmd, run_dir.with_suffix(".log"), env, name, seed,
                                        config=configs)  # fmt: skip
        record_path.write_text(json.dumps(record, indent=2))
    models = json.loads((run_dir / "report.json").read_text())["models"]
    stages = json.loads((run_dir / "stages.json").read_text())
    numbers = {
        "teacher": models["teacher"][metric],
        "control": models["control"][metric],
        "distilled": models["student"][metric],
        "control_s": stages["control"]["seconds"],
        "distilled_s": stages["student"]["seconds"],
        "seed": seed,
    }
    if record_path.is_file():
        numbers["run"] = json.loads(record_path.read_text())
    return numbers


def run_records(results: dict[str, list[dict]]) -> list[dict]:
    """Every (experiment, seed)'s run record; a placeholder (commit unknown) for rows
    measured before records were kept."""
    return [r.get("run") or provenance.legacy_run(name, r["seed"])
            for name, runs in results.items() for r in runs]  # fmt: skip


def recorded_configs(results: dict[str, list[dict]]) -> dict[tuple[str, int], dict | None]:
    return {(name, r["seed"]): (r.get("run") or {}).get("config")
            for name, runs in results.items() for r in runs}  # fmt: skip


def table(results: dict[str, list[dict]]) -> str:
    lines = [
        "| experiment | metric | seeds | teacher | control (no teacher) | distilled | "
        "distilled - control (mean ± std) | 95 % interval (paired t) | verdict | "
        "time: control / distilled |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        _, metric, higher = ROWS[name]
        fmt = ".4f" if metric == "accuracy" else ".2f"
        diff = [r["distilled"] - r["control"] for r in runs]
        verdict = stats.verdict(diff, higher, a="distilled", b="control")
        decided = verdict.startswith(("distilled better", "control better"))
        interval = stats.interval_text(diff, "+" + fmt).split(" ", 1)[-1] if len(diff) > 1 else ""
        cells = [
            f"`{name}`",
            metric + (" (higher is better)" if higher else " (lower is better)"),
            ", ".join(str(r["seed"]) for r in runs),
            *(mean_std([r[k] for r in runs], fmt) for k in ("teacher", "control", "distilled")),
            mean_std(diff, "+" + fmt),
            interval,
            f"**{verdict}**" if decided else verdict,
            f"{statistics.mean(r['control_s'] for r in runs):.0f} s / "
            f"{statistics.mean(r['distilled_s'] for r in runs):.0f} s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + between_rows(results)


def row_commit(runs: list[dict]) -> str | None:
    """The one commit every seed of a row ran at (clean tree); None if mixed or unknown."""
    states = [((r.get("run") or {}).get("commit"), (r.get("run") or {}).get("dirty")) for r in runs]
    commit, dirty = states[0]
    return commit if commit and dirty is False and all(x == states[0] for x in states) else None


def between_rows(results: dict[str, list[dict]]) -> str:
    """The distilled students of two rows (:data:`BETWEEN`), paired by seed: mean
    difference, its 95 % t interval and the verdict; rows at different or unknown commits
    are listed as not compared."""
    lines = ["| distilled: row - other row | what it measures | seeds | difference [95 % interval] | verdict |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, other, what in BETWEEN:
        if name not in results or other not in results:
            continue
        _, metric, higher = ROWS[name]
        commit = row_commit(results[name])
        if commit is None or commit != row_commit(results[other]):
            lines.append(f"| `{name}` - `{other}` | {what} | | | not compared: the rows ran at "
                         "different or unrecorded commits |")  # fmt: skip
            continue
        mine = {r["seed"]: r["distilled"] for r in results[name]}
        theirs = {r["seed"]: r["distilled"] for r in results[other]}
        seeds = sorted(set(mine) & set(theirs))
        diff = stats.paired([mine[s] for s in seeds], [theirs[s] for s in seeds])
        fmt = "+.4f" if metric == "accuracy" else "+.2f"
        verdict = stats.verdict(diff, higher, a=f"`{name}`", b=f"`{other}`")
        lines.append(f"| `{name}` - `{other}` | {what} | {', '.join(map(str, seeds))} | "
                     f"{stats.interval_text(diff, fmt)} | {verdict} |")  # fmt: skip
    return stats.paired_section(lines if len(lines) > 2 else [], noun="row")


HEADER = (
    "Test split, mean ± std over the seeds listed; each seed trains its own teacher "
    "(BERT and language-model rows: one teacher, seed 0, for every student seed). "
    "Control: the same experiment with `control=true`. Verdict: distilled or control "
    f"better only with at least {stats.MIN_SEEDS} paired seeds and a 95 % interval of the "
    "paired difference that excludes 0. Times: wall seconds per run on this machine "
    "(2 CPU cores, shared with other jobs while measured).\n\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "bench_controls")
    parser.add_argument("--results-dir", type=Path, default=provenance.RESULTS)
    parser.add_argument("--report", action="store_true",
                        help="run nothing: tabulate the finished (experiment, seed) runs")  # fmt: skip
    parser.add_argument("--new-table", action="store_true",
                        help="drop the committed rows of --only and measure them afresh")  # fmt: skip
    args = parser.parse_args()
    env = provenance.offline_env()
    results_json = args.results_dir / "controls.json"
    session = provenance.Session(__file__, [results_json])
    saved = provenance.load(results_json)[0] if results_json.is_file() else {}
    if args.new_table:
        saved = {name: runs for name, runs in saved.items() if name not in args.only}
    done = {(name, r["seed"]): r for name, runs in saved.items() for r in runs}
    if not args.report:
        todo = [(n, s) for n in args.only for s in args.seeds
                if (n, s) not in done and run_one(n, s, args.out, env, run=False) is None]  # fmt: skip
        recorded = recorded_configs(saved)
        problems = []
        for name, seed in todo:
            mine = {k: v for k, v in recorded.items() if k[0] == name}
            if not mine:
                continue  # a new row
            planned = stage_configs(name, seed, args.out)
            for stage, config in planned.items():
                row = {(name, s): (c or {}).get(stage) if c else None for (_, s), c in mine.items()}
                problems += provenance.recipe_differences(
                    row, {(name, seed): config}, f"{_rel(results_json)} `{name}` ({stage})"
                )
        if problems:
            raise SystemExit(
                "refusing to extend the table:\n- " + "\n- ".join(dict.fromkeys(problems))
                + "\nPass --new-table (with --only <rows>) to measure those rows afresh."
            )  # fmt: skip
        for name, seed in todo:
            start = time.perf_counter()
            numbers = run_one(name, seed, args.out, env)
            print(
                f"{name} seed {seed} ({time.perf_counter() - start:.0f} s): {numbers}", flush=True
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
    prov = session.finish(run_records(results), seeds=args.seeds, out=_rel(args.out))
    print(provenance.write("controls", results, HEADER + table(results), prov, args.results_dir))


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    main()

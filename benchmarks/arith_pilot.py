"""Pilot of the arith task regime: a setting in which the teacher solves the task and the
no-teacher baseline (``arith_sft``) clearly does not, so that a benchmark can show what
distillation adds (issue #24, item 5).

For each seed, in fresh subprocesses (``python -m distillery.train``): the teacher as
shipped (``experiment=arith_teacher``: every training answer, ``data.labeled`` null, so
one teacher per seed serves every candidate), and ``experiment=arith_sft`` at each
candidate setting (:data:`CANDIDATES`: fewer labeled answers, or fewer steps). The test
exact match of each run is read from its CSV log (``test/exact_match``, of the best
checkpoint by ``val/exact_match``), with the validation curve.

A finished run (its record ``<out>/<candidate>/seed<N>/run.json``) is not run again:
rerun to resume; ``--report`` tabulates what has finished without running anything.
Every record holds its command line, commit, dirty flag, times, load and resolved config
(``provenance.py``). The table is rewritten after every finished run.

Decision (:func:`decide`): the first candidate, in :data:`CANDIDATES` order (the
smallest change to the shipped recipe first), measured at >= ``stats.MIN_SEEDS`` seeds
(the teacher at >= :data:`TEACHER_MIN_SEEDS`: it does not depend on the candidate),
whose teacher mean is >= :data:`TEACHER_MIN`, whose ``arith_sft`` mean is <=
:data:`RATIO_MAX` x the teacher's, and whose 95 % t interval of the ratio sft / teacher
(per seed, paired by seed, where >= ``stats.MIN_SEEDS`` seeds pair; else the sft mean's
interval over the teacher mean) stays below :data:`RATIO_CEILING`.

Writes ``benchmarks/results/arith_pilot.md`` and ``arith_pilot.json``:

    python benchmarks/arith_pilot.py [--candidates labeled300 labeled100 ...]
        [--seeds 0 1 2 3 4] [--teacher-seeds 0 1 2 3 4] [--out logs/bench_arith_pilot]
        [--results-dir DIR] [--report]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
import stats  # noqa: E402

ROOT = provenance.ROOT
STEM = "arith_pilot"
THRESHOLD = 0.9  # exact match a seed must reach to count as having learned the task
TEACHER_MIN = 0.95  # the teacher must stay this good
TEACHER_MIN_SEEDS = 3  # the teacher does not depend on the candidate: fewer seeds suffice
RATIO_MAX = 0.7  # arith_sft's mean at most this share of the teacher's
RATIO_CEILING = 0.8  # ... and the upper end of the ratio's 95 % interval below this

# name -> overrides of experiment=arith_sft, in the order they are considered: the
# shipped recipe (the reference), then fewer labeled answers at the same budget (the
# smallest change first), then fewer steps as well.
CANDIDATES: dict[str, tuple[str, ...]] = {
    "shipped": ("data.labeled=1000",),  # the recipe shipped before this pilot chose 700
    "labeled800": ("data.labeled=800",),
    "labeled700": ("data.labeled=700",),
    "labeled600": ("data.labeled=600",),
    "labeled500": ("data.labeled=500",),
    "labeled300": ("data.labeled=300",),
    "labeled100": ("data.labeled=100",),
    "labeled300_steps1000": ("data.labeled=300", "trainer.max_steps=1000"),
}
TEACHER = "teacher"


def command(label: str, seed: int, out: Path) -> list[str]:
    """The training command of ``label`` (the teacher or a candidate) at ``seed``. No
    checkpoint is exported (``export_ckpt=null``: the shared ``artifacts/`` stay as
    they are); the run's best checkpoint stays in its own directory."""
    if label == TEACHER:
        experiment, extra = "arith_teacher", ()
    else:
        experiment, extra = "arith_sft", CANDIDATES[label]
    return [sys.executable, "-m", "distillery.train", f"experiment={experiment}", f"seed={seed}",
            *extra, "export_ckpt=null", f"hydra.run.dir={run_dir(label, seed, out)}"]  # fmt: skip


def run_dir(label: str, seed: int, out: Path) -> Path:
    return out / label / f"seed{seed}"


def read_metrics(d: Path) -> dict:
    """``{"exact_match": test/exact_match, "curve": [[step, val/exact_match], ...]}`` from
    the run's CSV logs (every version merged, the later value of a step kept)."""
    test, curve = None, {}
    for path in sorted((d / "csv").glob("version_*/metrics.csv"),
                       key=lambda p: int(p.parent.name.split("_")[1])):  # fmt: skip
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get("test/exact_match"):
                    test = float(row["test/exact_match"])
                if row.get("val/exact_match"):
                    curve[int(row["step"])] = float(row["val/exact_match"])
    return {"exact_match": test, "curve": [[s, v] for s, v in sorted(curve.items())]}


def record_path(label: str, seed: int, out: Path) -> Path:
    return run_dir(label, seed, out) / "run.json"


def run_one(label: str, seed: int, out: Path, env: dict) -> dict:
    """Train ``label`` at ``seed`` unless its record exists; returns the record."""
    path = record_path(label, seed, out)
    if path.is_file():
        return json.loads(path.read_text())
    d = run_dir(label, seed, out)
    cmd = command(label, seed, out)
    config = provenance.resolved_config(cmd[3:], "train", {str(out): "<out>", str(ROOT): "<root>"})
    record = provenance.run_command(cmd, d.with_suffix(".log"), env, label, seed, config=config)
    metrics = read_metrics(d)
    if metrics["exact_match"] is None:
        raise SystemExit(f"no test/exact_match in {d / 'csv'}; see {d.with_suffix('.log')}")
    record.update(metrics)
    path.write_text(json.dumps(record, indent=2))
    return record


def finished(out: Path) -> dict[str, dict[int, dict]]:
    """``{label: {seed: record}}`` of every finished run under ``out``."""
    found: dict[str, dict[int, dict]] = {}
    for label in (TEACHER, *CANDIDATES):
        for path in sorted((out / label).glob("seed*/run.json")):
            record = json.loads(path.read_text())
            found.setdefault(label, {})[int(record["seed"])] = record
    return {k: dict(sorted(v.items())) for k, v in found.items()}


# --------------------------------------------------------------------------- tables


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def summary(runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per setting: its seeds and exact matches, mean, sd and the share reaching
    :data:`THRESHOLD`; for a candidate, against the teacher:

    * paired by seed (teacher seed s vs sft seed s, the seeds both hold): the per-seed
      ratios sft / teacher with their mean and 95 % t interval, and the paired
      difference sft - teacher with its interval;
    * over all seeds of each: the ratio of the means, and the 95 % t interval of the
      sft mean divided by the teacher mean (``ratio_interval_unpaired``: used where
      fewer teacher seeds than sft seeds ran; the teacher's own spread is reported)."""
    teacher = {s: r["exact_match"] for s, r in runs.get(TEACHER, {}).items()}
    t_mean = statistics.mean(teacher.values()) if teacher else None
    out = {}
    for label in (TEACHER, *CANDIDATES):
        if label not in runs:
            continue
        em = {s: r["exact_match"] for s, r in runs[label].items()}
        values = list(em.values())
        row = {"seeds": list(em), "exact_match": em, "mean": statistics.mean(values),
               "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
               "reaching": stats.share_reaching(values, THRESHOLD),
               "seconds": statistics.mean(r["seconds"] for r in runs[label].values()),
               "overrides": list(CANDIDATES.get(label, ()))}  # fmt: skip
        if label != TEACHER and teacher:
            paired = [s for s in em if s in teacher]
            ratios = [em[s] / teacher[s] for s in paired]
            row.update(paired_seeds=paired, ratios=ratios, teacher_mean=t_mean,
                       teacher_seeds=list(teacher), ratio_of_means=row["mean"] / t_mean)  # fmt: skip
            if len(paired) > 1:
                row["ratio_interval"] = list(stats.t_interval(ratios))
                diffs = stats.paired([em[s] for s in paired], [teacher[s] for s in paired])
                row["difference_interval"] = list(stats.t_interval(diffs))
            if len(values) > 1:
                mean, low, high = stats.t_interval(values)
                row["ratio_interval_unpaired"] = [mean / t_mean, low / t_mean, high / t_mean]
        out[label] = row
    return out


def decide(rows: dict[str, dict]) -> tuple[str | None, list[str]]:
    """The chosen candidate (None if none qualifies) and one line per candidate saying
    why: at least ``stats.MIN_SEEDS`` sft seeds and :data:`TEACHER_MIN_SEEDS` teacher
    seeds, teacher mean >= :data:`TEACHER_MIN`, sft mean <= :data:`RATIO_MAX` x the
    teacher's, and the upper end of the ratio's 95 % interval below
    :data:`RATIO_CEILING` (paired by seed with >= ``stats.MIN_SEEDS`` paired seeds; else
    the sft mean's interval over the teacher mean)."""
    chosen, lines = None, []
    for label in CANDIDATES:
        if label not in rows:
            continue
        row = rows[label]
        n, why = len(row["seeds"]), []
        if n < stats.MIN_SEEDS:
            why.append(f"{n} seed{'s' if n != 1 else ''} < {stats.MIN_SEEDS}")
        if "teacher_mean" not in row:
            why.append("no teacher run")
        else:
            k = len(row["teacher_seeds"])
            if k < TEACHER_MIN_SEEDS:
                why.append(f"{k} teacher seed{'s' if k != 1 else ''} < {TEACHER_MIN_SEEDS}")
            if row["teacher_mean"] < TEACHER_MIN:
                why.append(f"teacher {row['teacher_mean']:.3f} < {TEACHER_MIN}")
            if row["ratio_of_means"] > RATIO_MAX:
                why.append(f"sft / teacher (means) {row['ratio_of_means']:.3f} > {RATIO_MAX}")
            paired = len(row["paired_seeds"]) >= stats.MIN_SEEDS
            key = "ratio_interval" if paired else "ratio_interval_unpaired"
            high = row.get(key, [math.inf] * 3)[2]
            if key not in row:
                why.append("no interval at 1 seed")
            elif not high < RATIO_CEILING:
                why.append(f"ratio interval reaches {high:.3f} >= {RATIO_CEILING}")
            elif not why:
                why_ok = ("paired by seed" if paired else
                          f"the sft mean's interval over the teacher mean ({k} teacher seeds)")  # fmt: skip
                lines.append(f"- `{label}`: qualifies (ratio {row['ratio_of_means']:.3f}, "
                             f"upper end of its 95 % interval {high:.3f}, {why_ok})")  # fmt: skip
                chosen = chosen or label
                continue
        lines.append(f"- `{label}`: does not qualify: " + "; ".join(why))
    return chosen, lines


def _ratio_cell(row: dict, key: str) -> str:
    if key not in row:
        return ""
    mean, low, high = row[key]
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def table(runs: dict[str, dict[int, dict]]) -> str:
    rows = summary(runs)
    seeds = sorted({s for r in runs.values() for s in r})
    head = ["setting", "overrides of `experiment=arith_sft`", *(f"seed {s}" for s in seeds),
            "mean ± sd", f"seeds >= {THRESHOLD}", "sft / teacher (means)",
            "sft / teacher per seed, paired: mean [95 % t]",
            "sft mean [95 % t] / teacher mean", "sft - teacher, paired [95 % t]",
            "time per run"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in rows.items():
        em = row["exact_match"]
        what = ("`experiment=arith_teacher` (shipped; `data.labeled` null)" if label == TEACHER
                else " ".join(f"`{o}`" for o in row["overrides"]) + (" (shipped before this "
                "pilot)" if label == "shipped" else ""))  # fmt: skip
        diff = row.get("difference_interval")
        cells = [
            f"`{label}`",
            what,
            *(f"{em[s]:.4f}" if s in em else "" for s in seeds),
            _mean_sd(list(em.values())),
            "{} / {}".format(*row["reaching"]),
            f"{row['ratio_of_means']:.3f}" if "ratio_of_means" in row else "",
            _ratio_cell(row, "ratio_interval"),
            _ratio_cell(row, "ratio_interval_unpaired"),
            f"{diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]" if diff else "",
            f"{row['seconds']:.0f} s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    chosen, why = decide(rows)
    verdict = (
        f"**Chosen: `{chosen}`** (`experiment=arith_sft "
        + " ".join(CANDIDATES[chosen])
        + "`): the first candidate, in the order listed, that qualifies."
        if chosen
        else "**No candidate qualifies.**"
    )
    intro = (
        f"Test exact match (greedy, 2000 problems, the best checkpoint by validation exact "
        f"match) of the shipped teacher and of `arith_sft` at candidate settings, per seed. "
        f"Ratios and differences against the teacher: paired by seed (teacher seed s vs "
        f"sft seed s, the seeds both ran), and the sft mean's 95 % t interval over the "
        f"teacher's mean (all seeds of each; `benchmarks/stats.py`). A setting qualifies "
        f"with at least {stats.MIN_SEEDS} sft seeds and {TEACHER_MIN_SEEDS} teacher seeds, "
        f"teacher mean >= {TEACHER_MIN}, sft mean <= {RATIO_MAX} x the teacher's, and the "
        f"upper end of the ratio's interval below {RATIO_CEILING} (paired where at least "
        f"{stats.MIN_SEEDS} seeds pair). Candidates were screened at one seed first; the "
        f"promising ones were run at more. Times: wall seconds per run, one thread, on a "
        f"machine shared with other jobs (the load is in the json).\n\n"
    )
    parts = [intro + code_note(runs), "\n".join(lines), verdict, "\n".join(why), curve_table(runs)]
    return "\n\n".join(p.rstrip("\n") for p in parts if p) + "\n"


def code_note(runs: dict[str, dict[int, dict]]) -> str:
    """Where runs ran at several commits: whether the code and configs that train
    (``src/``, ``conf/``) differ between them (``git diff``)."""
    records = sorted((r for v in runs.values() for r in v.values()),
                     key=lambda r: r.get("started") or "")  # fmt: skip
    found = list(dict.fromkeys(r.get("commit") for r in records))
    if len(found) < 2 or None in found:
        return ""
    try:
        changed = sorted({path for a, b in zip(found, found[1:], strict=False)
                          for path in subprocess.run(
                              ["git", "diff", "--name-only", a, b, "--", "src", "conf"],
                              cwd=ROOT, capture_output=True, text=True, check=True,
                          ).stdout.split()})  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return ""
    names = ", ".join(provenance.short(c) for c in found)
    if not changed:
        return (f"The runs span commits {names}; `src/` and `conf/` are identical at all of "
                f"them (`git diff`): the commits differ in benchmarks, tests and docs only.\n\n")  # fmt: skip
    return f"The runs span commits {names}, which differ in: {', '.join(changed)}.\n\n"


def curve_table(runs: dict[str, dict[int, dict]]) -> str:
    """Mean validation exact match (500 problems) against steps, per setting."""
    lines = []
    for label, by_seed in runs.items():
        steps: dict[int, list[float]] = {}
        for r in by_seed.values():
            for s, v in r.get("curve", []):
                steps.setdefault(s, []).append(v)
        if steps:
            cells = ", ".join(
                f"{s + 1}: {statistics.mean(v):.3f}" for s, v in sorted(steps.items())
            )
            lines.append(f"- `{label}` ({len(by_seed)} seeds): {cells}")
    if not lines:
        return ""
    return (
        "Validation exact match (mean over seeds) by optimizer step:\n\n" + "\n".join(lines) + "\n"
    )


def write(session: provenance.Session, out: Path, results_dir: Path) -> str:
    runs = finished(out)
    records = [r for by_seed in runs.values() for r in by_seed.values()]
    records.sort(key=lambda r: r.get("started") or "")
    rows = summary(runs)
    chosen, _ = decide(rows)
    results = {"runs": {label: {str(s): {k: r.get(k) for k in ("exact_match", "curve", "seconds")}
                                for s, r in by_seed.items()} for label, by_seed in runs.items()},
               "summary": rows, "chosen": chosen,
               "chosen_overrides": list(CANDIDATES[chosen]) if chosen else None,
               "criteria": {"teacher_min": TEACHER_MIN, "ratio_max": RATIO_MAX,
                            "ratio_ceiling": RATIO_CEILING, "min_seeds": stats.MIN_SEEDS,
                            "teacher_min_seeds": TEACHER_MIN_SEEDS,
                            "threshold": THRESHOLD},
               "candidates": {k: list(v) for k, v in CANDIDATES.items()}}  # fmt: skip
    prov = session.finish(records, out=_rel(out))
    return provenance.write(STEM, results, table(runs), prov, results_dir)


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", nargs="+", choices=list(CANDIDATES),
                        default=["labeled300", "labeled100"])  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--teacher-seeds", type=int, nargs="*", default=None,
                        help="seeds of the teacher (default: --seeds)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "bench_arith_pilot")
    parser.add_argument("--results-dir", type=Path, default=provenance.RESULTS)
    parser.add_argument("--report", action="store_true",
                        help="run nothing: tabulate the finished runs")  # fmt: skip
    args = parser.parse_args()
    out = args.out.resolve()
    session = provenance.Session(__file__, [args.results_dir / f"{STEM}.json"])
    env = provenance.offline_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if not args.report:
        teacher_seeds = args.seeds if args.teacher_seeds is None else args.teacher_seeds
        # seed by seed: a candidate's seed is paired as soon as its teacher has run
        todo = []
        for seed in sorted(set(args.seeds) | set(teacher_seeds)):
            if seed in teacher_seeds:
                todo.append((TEACHER, seed))
            todo += [(c, seed) for c in args.candidates if seed in args.seeds]
        for label, seed in todo:
            if record_path(label, seed, out).is_file():
                continue
            start = time.perf_counter()
            record = run_one(label, seed, out, env)
            print(f"{label} seed {seed}: exact match {record['exact_match']:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
            write(session, out, args.results_dir)
    print(write(session, out, args.results_dir))


if __name__ == "__main__":
    main()

"""Generative distillation on the embedded arith task, over seeds: the table in docs/llm.md.

For each seed, in fresh subprocesses: the teacher (``experiment=arith_teacher``), its
greedy answers to every training prompt (``distillery.generate --config-name
generate_arith``, the data of ``arith_seqkd``), then each student method with that seed
and teacher, and one report card (``distillery.evaluate``) over the test split with the
teacher and every student side by side: greedy exact match, the teacher's per-token
NLL of each model's answers, params and tokens/s. A finished step (its checkpoint,
jsonl or report exists) is not run again: rerun to resume; ``--report`` tabulates.

Every run leaves a record in ``<out>/seed<N>/runs/<label>.json`` (``provenance.py``: its
command line, commit, dirty flag, times, load and, for training and generation, the
resolved config), so seeds measured in different sessions keep their own commit, and a
table mixing commits is stamped so. Before running anything the script composes the
configs it is about to run and compares them with those recorded in the results file it
would rewrite: it refuses (listing the differing keys) unless they match, or
``--new-table`` says that this is a new table replacing the old one.

``--recipe shipped`` (default) runs the configs as shipped; ``--recipe published`` the
budgets the pre-provenance table states (:data:`PUBLISHED`: a 4-head teacher and
every student but ``arith_dpo`` at 6000 steps), e.g. to see whether its numbers still
come out at today's code.

Writes ``benchmarks/results/arith.md`` and ``arith.json``:

    python benchmarks/arith.py [--seeds 0 1 2 3 4] [--methods sft kd seqkd gkd dpo uld kd_sft gkd_sft gkd_sft_rkl]
        [--recipe shipped|published] [--override data.labeled=300 ...] [--new-table]
        [--results-dir DIR] [--report] [--train-only]
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
METHODS = ("sft", "kd", "seqkd", "gkd", "dpo", "uld", "kd_sft", "gkd_sft", "gkd_sft_rkl")
# fine-tunes of this seed's arith_sft student (student_init): DPO, and on-policy (GKD,
# JSD and reverse KL) against off-policy token KD on equal prompts and steps
FROM_SFT = ("dpo", "kd_sft", "gkd_sft", "gkd_sft_rkl")
CROSS = ("uld",)  # students of another tokenizer: a report card of their own (same test problems)
COLUMNS = (("exact_match", ".3f"), ("teacher_nll", ".3f"), ("params", ",.0f"),
           ("tokens_per_second", ",.0f"))  # fmt: skip
THRESHOLD = 0.9  # exact match a seed must reach to count as having learned the task

# The budgets the pre-provenance tables (README, benchmarks/results/arith.json and
# inherited.json, committed before the teacher was retuned in 64e0fb1) were measured
# with: a 4-head teacher and students at 6000 steps (they inherited the teacher's steps
# then); arith_dpo states its own 500. Those files record no configs, so whether
# anything else differed cannot be checked.
PUBLISHED = {"teacher": ("student.config.n_head=4", "trainer.max_steps=6000"),
             "student": ("trainer.max_steps=6000",)}  # fmt: skip
RECIPES = {"shipped": {"teacher": (), "student": ()}, "published": PUBLISHED}
OWN_BUDGET = FROM_SFT  # students whose file states a budget of their own


def seed_commands(seed: int, out: Path, methods: list[str], recipe: str = "shipped",
                  overrides: tuple[str, ...] = (), report_overrides: tuple[str, ...] = ()) -> list[tuple[str, str, list[str]]]:  # fmt: skip
    """``(label, config name, argv)`` of every run of one seed, in order: teacher, its
    answers, each method, the report cards. ``overrides`` go to every train and generate
    command (e.g. data options), ``report_overrides`` to the report cards."""
    py = [sys.executable, "-m"]
    d = out / f"seed{seed}"
    teacher, answers = d / "arith_teacher.ckpt", d / "arith_teacher.jsonl"
    budget = RECIPES[recipe]
    cmds = [
        ("teacher", "train", [*py, "distillery.train", "experiment=arith_teacher", f"seed={seed}", *budget["teacher"],
                              f"export_ckpt={teacher}", f"hydra.run.dir={d / 'teacher'}", *overrides]),
        ("generate", "generate_arith", [*py, "distillery.generate", "--config-name", "generate_arith",
                                        f"teacher_ckpt={teacher}", f"output={answers}",
                                        f"hydra.run.dir={d / 'generate'}", *overrides]),
    ]  # fmt: skip
    ckpts = {m: d / f"arith_{m}.ckpt" for m in methods}
    for m in methods:
        extra = {"sft": [], "seqkd": [f"data.responses={answers}"]}.get(
            m, [f"teacher.ckpt_path={teacher}"]
        )
        if m in FROM_SFT:  # starts from this seed's arith_sft student (DPO: its reference)
            extra.append(f"student_init.ckpt_path={d / 'arith_sft.ckpt'}")
        if m in ("uld", "kd_sft"):  # the teacher's answers, as arith_seqkd, + the teacher
            extra.append(f"data.responses={answers}")
        if m not in OWN_BUDGET:
            extra.extend(budget["student"])
        cmds.append((m, "train", [*py, "distillery.train", f"experiment=arith_{m}", f"seed={seed}", *extra,
                                  f"export_ckpt={ckpts[m]}", f"hydra.run.dir={d / m}", *overrides]))  # fmt: skip
    same = [m for m in methods if m not in CROSS]
    for group in ([same] if same else []) + [[m] for m in methods if m in CROSS]:
        name = "report" if group is same else f"report_{group[0]}"
        # the reference teacher is the seed's teacher (passed explicitly: sft has none)
        compare = [f"+compare.{m}={ckpts[m]}" for m in group]
        cmds.append((name, "evaluate", [*py, "distillery.evaluate", f"ckpt_path={ckpts[group[0]]}", *compare,
                                        "+teacher=run_checkpoint", f"teacher.ckpt_path={teacher}",
                                        f"output_dir={d / name}", "plots=false", "evaluators={}",
                                        f"hydra.run.dir={d / name}", *report_overrides]))  # fmt: skip
    # the outside reading: each model exported to plain transformers and scored on fresh
    # problems by benchmarks/outside_reading.py (its own process, no Distillery import)
    for m, ckpt in [("teacher", teacher), *ckpts.items()]:
        cmds.append((f"export_{m}", "export", [*py, "distillery.export", f"ckpt_path={ckpt}", "format=hf",
                                               f"output_dir={d / 'hf' / m}", f"hydra.run.dir={d / 'hf' / m}"]))  # fmt: skip
        cmds.append((f"outside_{m}", "outside", [sys.executable, str(ROOT / "benchmarks" / "outside_reading.py"),
                                                 str(d / "hf" / m), "--n", str(OUTSIDE_N), "--seed", str(seed),
                                                 "--out", str(d / "outside" / f"{m}.json")]))  # fmt: skip
    return cmds


OUTSIDE_N = 2000  # fresh problems per model in the outside reading


def outside_readings(d: Path, models: dict) -> dict:
    """Each model's outside reading (``<seed dir>/outside/<model>.json``) beside the report
    card's exact match: both numbers and whether they agree within sampling error
    (two-proportion z-test at 5 %, :func:`outside_reading.compare`)."""
    import outside_reading

    readings = {}
    for path in sorted((d / "outside").glob("*.json")) if (d / "outside").is_dir() else []:
        reading = json.loads(path.read_text())
        row, n_test = models.get(path.stem), test_size(d, path.stem)
        if row is not None and n_test:
            k = round(row["exact_match"] * n_test)
            reading["compare"] = outside_reading.compare(
                reading["correct"], reading["n"], k, n_test
            )
        readings[path.stem] = reading
    return readings


def test_size(d: Path, model: str) -> int | None:
    """``data.num_test`` of the run that trained ``model`` in seed directory ``d``."""
    for path in (d / "runs").glob("*.json") if (d / "runs").is_dir() else []:
        run = json.loads(path.read_text())
        if run.get("label") == model and run.get("config"):
            return int(run["config"]["data"]["num_test"])
    return None


def run_config(config_name: str, argv: list[str], seed_dir: Path) -> dict | None:
    """The resolved config of a train or generate command (paths relative to the seed's
    directory and the repository), None for a report card."""
    if config_name in ("evaluate", "export", "outside"):
        return None
    args = argv[argv.index("--config-name") + 2 :] if "--config-name" in argv else argv[3:]
    return provenance.resolved_config(
        args, config_name, {str(seed_dir): "<seed_dir>", str(ROOT): "<root>"}
    )


def save_run(d: Path, record: dict) -> None:
    """One file per run (methods of one seed may train in parallel processes)."""
    (d / "runs").mkdir(parents=True, exist_ok=True)
    (d / "runs" / f"{record['label']}.json").write_text(json.dumps(record, indent=2))


def save_seconds(d: Path, seconds: dict) -> None:
    """Merge into ``seconds.json`` (methods of one seed may train in parallel processes)."""
    path = d / "seconds.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(saved | seconds, indent=2))


def seed_runs(seed: int, out: Path) -> list[dict]:
    """The run records of a seed; one placeholder (commit unknown) for a seed whose runs
    were measured before records were kept."""
    d = out / f"seed{seed}"
    runs = [json.loads(p.read_text()) for p in sorted((d / "runs").glob("*.json"))]
    if not runs and d.is_dir():
        runs = [provenance.legacy_run("runs before provenance was recorded", seed)]
    return runs


def finished(seed: int, out: Path) -> dict:
    """What a seed has finished (its report cards, times and run records), running nothing."""
    d = out / f"seed{seed}"
    models = {}
    for report in sorted(d.glob("report*/report.json")):  # report (the main card) first
        for name, row in json.loads(report.read_text())["models"].items():
            if name != "student":
                models.setdefault(name, row)  # the teacher: as measured beside the main students
    seconds = json.loads((d / "seconds.json").read_text()) if (d / "seconds.json").is_file() else {}
    return {"seed": seed, "models": models, "seconds": seconds, "runs": seed_runs(seed, out),
            "curves": learning_curves(d), "outside": outside_readings(d, models)}  # fmt: skip


CURVE_METRIC = "val/exact_match"


def learning_curves(d: Path) -> dict[str, list[list[float]]]:
    """Each run's validation exact match against its optimizer step, ``{label: [[step,
    value], ...]}``, read from the run's CSV log (``<seed dir>/<label>/csv/.../metrics.csv``;
    a resumed run's versions merged, the later value of a step kept)."""
    import csv

    curves = {}
    for run_dir in sorted(p for p in d.iterdir() if p.is_dir()) if d.is_dir() else []:
        points: dict[int, float] = {}
        for log in sorted(run_dir.glob("csv/*/metrics.csv")):
            for row in csv.DictReader(log.read_text().splitlines()):
                if row.get(CURVE_METRIC):
                    points[int(row["step"])] = float(row[CURVE_METRIC])
        if points:
            curves[run_dir.name] = [[step, points[step]] for step in sorted(points)]
    return curves


def plot_curves(results: list[dict], methods: list[str], path: Path) -> Path | None:
    """Validation exact match against steps, one panel line per method (the mean over
    seeds, each seed thin): where learning is a phase transition, when each seed jumps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["teacher", *methods]
    if not any(r.get("curves", {}).get(m) for r in results for m in labels):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, label in enumerate(labels):
        runs = [r["curves"][label] for r in results if r.get("curves", {}).get(label)]
        if not runs:
            continue
        color = f"C{i % 10}"
        for run in runs:
            ax.plot(*zip(*run, strict=True), color=color, alpha=0.3, linewidth=0.8)
        steps = sorted(set.intersection(*({s for s, _ in run} for run in runs)))
        if steps:
            mean = [statistics.mean(dict(map(tuple, run))[s] for run in runs) for s in steps]
            name = label if label == "teacher" else f"arith_{label}"
            ax.plot(steps, mean, color=color, linewidth=2, label=f"{name} ({len(runs)} seeds)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(CURVE_METRIC)
    ax.axhline(THRESHOLD, color="grey", linestyle=":", linewidth=1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def done(label: str, d: Path) -> bool:
    """Whether a run's output exists (its checkpoint, answers or report card)."""
    if label == "teacher":
        return (d / "arith_teacher.ckpt").is_file()
    if label == "generate":
        answers = d / "arith_teacher.jsonl"
        return answers.is_file() and answers.with_name(answers.name + ".done").is_file()
    if label.startswith("report"):
        return (d / label / "report.json").is_file()
    if label.startswith("export_"):
        return (d / "hf" / label[len("export_") :] / "hf" / "config.json").is_file()
    if label.startswith("outside_"):
        return (d / "outside" / f"{label[len('outside_') :]}.json").is_file()
    return (d / f"arith_{label}.ckpt").is_file()


def one_seed(
    seed: int,
    out: Path,
    methods: list[str],
    env: dict,
    report: bool = True,
    overrides: tuple[str, ...] = (),
    report_overrides: tuple[str, ...] = (),
    recipe: str = "shipped",
) -> dict:
    """Train, generate and report one seed (what is missing); each run's record is saved."""
    d = out / f"seed{seed}"
    seconds = json.loads((d / "seconds.json").read_text()) if (d / "seconds.json").is_file() else {}
    for label, config_name, argv in seed_commands(
        seed, out, methods, recipe, overrides, report_overrides
    ):
        if label.startswith(("report", "export_", "outside_")) and not report:
            continue
        if done(label, d):
            continue
        config = run_config(config_name, argv, d)
        ok = (0, 1) if label.startswith("report") else (0,)  # 1: a gate failed, the card is written
        record = provenance.run_command(
            argv, d / f"{label}.log", env, label, seed, ok=ok, config=config
        )
        save_run(d, record)
        if label == "generate":
            (d / "arith_teacher.jsonl.done").touch()
        elif label.startswith("report"):
            if not (d / label / "report.json").is_file():
                raise SystemExit(f"no report card written: see {d / f'{label}.log'}")
        elif label.startswith(("export_", "outside_")):
            pass
        else:
            seconds[label] = record["seconds"]
            save_seconds(d, seconds)
    return finished(seed, out)


def planned_configs(seeds: list[int], out: Path, methods: list[str], recipe: str,
                    overrides: tuple[str, ...] = ()) -> dict[tuple[str, int], dict]:  # fmt: skip
    """``{(label, seed): resolved config}`` of the train and generate runs about to run."""
    planned = {}
    for seed in seeds:
        for label, config_name, argv in seed_commands(seed, out, methods, recipe, overrides):
            config = run_config(config_name, argv, out / f"seed{seed}")
            if config is not None:
                planned[(label, seed)] = config
    return planned


def recorded_configs(results: list[dict] | dict) -> dict[tuple[str, int], dict | None]:
    """``{(label, seed): resolved config or None}`` recorded in a results file's seeds."""
    seeds = results.values() if isinstance(results, dict) else results
    recorded = {}
    for r in seeds:
        if not r.get("runs"):  # a seed measured before run records were kept
            recorded[("*", r.get("seed"))] = None
        for run in r.get("runs") or []:
            if not str(run["label"]).startswith(("report", "export_", "outside_")):  # train nothing
                recorded[(run["label"], run["seed"])] = run.get("config")
    return recorded


def check_table(results_json: Path, planned: dict, new_table: bool) -> None:
    """Refuse to rewrite ``results_json`` with runs of another recipe than it records."""
    if new_table or not results_json.is_file():
        return
    results, _ = provenance.load(results_json)
    problems = provenance.recipe_differences(recorded_configs(results), planned, _rel(results_json))
    if problems:
        raise SystemExit(
            "refusing to reproduce or extend the table:\n- " + "\n- ".join(problems)
            + f"\nPass --new-table to measure a new table (it replaces {_rel(results_json)}; "
            "the old one stays in git history), or --results-dir to write elsewhere."
        )  # fmt: skip


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def paired_values(results: list[dict], name: str, other: str, key: str = "exact_match"):
    """``(seeds, a, b)``: the seeds holding a value of ``key`` for both models, and those."""
    runs = [r for r in results if all((r["models"].get(m) or {}).get(key) is not None
                                      for m in (name, other))]  # fmt: skip
    return ([r["seed"] for r in runs], [float(r["models"][name][key]) for r in runs],
            [float(r["models"][other][key]) for r in runs])  # fmt: skip


def comparisons(results: list[dict], pairs: list[tuple[str, str]], key: str = "exact_match",
                label=lambda m: f"`arith_{m}`", word: str = "better") -> list[str]:  # fmt: skip
    """A table of paired comparisons: mean difference, its 95 % t interval, the verdict
    (``word``: what a decided difference is called, :func:`stats.verdict`)."""
    lines = [f"| comparison ({key}) | seeds | mean paired difference [95 % t interval] | verdict |",
             "|---|---|---|---|"]  # fmt: skip
    for a, b in pairs:
        seeds, va, vb = paired_values(results, a, b, key)
        if not seeds:
            continue
        diffs = stats.paired(va, vb)
        lines.append(f"| {label(a)} - {label(b)} | {', '.join(map(str, seeds))} | "
                     f"{stats.interval_text(diffs)} | {stats.verdict(diffs, a=label(a), b=label(b), word=word)} |")  # fmt: skip
    return lines if len(lines) > 2 else []


def table(results: list[dict], methods: list[str]) -> str:
    """One row per model: mean ± std of exact match over the seeds that finished it (listed),
    how many seeds reach :data:`THRESHOLD`, means of the other columns; each method's share
    of the teacher-vs-sft gap; paired comparisons with their 95 % intervals."""
    head = ("| model | seeds | " + " | ".join(c for c, _ in COLUMNS)
            + f" | seeds with exact_match >= {THRESHOLD} | train time |")  # fmt: skip
    lines = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    em = {}
    for name in ("teacher", *methods):
        runs = [r for r in results if name in r["models"]]
        if not runs:
            continue
        em[name] = statistics.mean(r["models"][name]["exact_match"] for r in runs)
        row = [
            model_label(name),
            ", ".join(str(r["seed"]) for r in runs),
        ]
        for col, fmt in COLUMNS:
            vals = [
                float(r["models"][name][col])
                for r in runs
                if r["models"][name].get(col) is not None
            ]
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cell = f"{statistics.mean(vals):{fmt}}" if vals else ""
            row.append(cell + (f" ± {std:{fmt}}" if vals and col == "exact_match" else ""))
        k, n = stats.share_reaching([r["models"][name]["exact_match"] for r in runs], THRESHOLD)
        row.append(f"{k} / {n}")
        secs = [r["seconds"][name] for r in runs if r["seconds"].get(name)]
        row.append(f"{statistics.mean(secs):.0f} s" if secs else "")
        lines.append("| " + " | ".join(row) + " |")
    notes = []
    if "sft" in em and em.get("teacher", 0) > em["sft"]:
        gap = em["teacher"] - em["sft"]
        notes = [f"- `arith_{m}` recovers {100 * (em[m] - em['sft']) / gap:.0f} % of the "
                 f"teacher-vs-`arith_sft` exact-match gap (means)" for m in methods if m != "sft" and m in em]  # fmt: skip
    pairs = [(m, "sft") for m in methods if m != "sft"]
    for a, b in BETWEEN:
        if a in methods and b in methods:
            pairs.append((a, b))
    compared = comparisons(results, pairs)
    text = "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n" + outside_table(results, methods)
    return text + stats.paired_section(compared)


# Methods compared with each other, paired by seed, beside each against `arith_sft`:
# on-policy against off-policy (equal prompts and steps), and sequence KD against the
# other from-scratch methods (the claim that it is the strongest of them).
BETWEEN = (
    ("gkd", "kd"),
    ("gkd_sft", "kd_sft"),
    ("gkd_sft_rkl", "kd_sft"),
    ("seqkd", "kd"),
    ("seqkd", "gkd"),
)


def model_label(name: str) -> str:
    """A model's name in a table: ``teacher``, or the method's experiment ``arith_<name>``."""
    return f"`{name}`" if name == "teacher" else f"`arith_{name}`"


def outside_table(results: list[dict], methods: list[str]) -> str:
    """The outside reading beside the report card's exact match, per model: both means,
    and the seeds whose two numbers agree within sampling error. At 5 % per comparison,
    about 1 in 20 disagree by chance alone: the count is shown against that expectation."""
    rows, total, disagree = [], 0, 0
    for name in ("teacher", *methods):
        runs = [r for r in results if r.get("outside", {}).get(name, {}).get("compare")]
        if not runs:
            continue
        out = [r["outside"][name] for r in runs]
        agree = sum(o["compare"]["agree"] for o in out)
        total, disagree = total + len(out), disagree + len(out) - agree
        em = [r["models"][name]["exact_match"] for r in runs]
        fresh = [o["exact_match"] for o in out]
        label = model_label(name)
        rows.append(f"| {label} | {', '.join(str(r['seed']) for r in runs)} | {statistics.mean(em):.3f} | "
                    f"{statistics.mean(fresh):.3f} (n = {out[0]['n']} each) | {agree} / {len(out)} |")  # fmt: skip
    if not rows:
        return ""
    head = ("\nOutside reading (`benchmarks/outside_reading.py`: the exported `format=hf` model, "
            "plain transformers, fresh problems):\n\n| model | seeds | exact_match (report card) | "
            "exact_match (outside) | seeds that agree (z-test, 5 %) |\n|---|---|---|---|---|")  # fmt: skip
    tail = (
        f"\n\n{disagree} of {total} comparisons disagree; {0.05 * total:.1f} expected by chance.\n"
    )
    return head + "\n" + "\n".join(rows) + tail


def methods_in(results: list[dict]) -> list[str]:
    """The methods a results file holds, in :data:`METHODS` order."""
    return [m for m in METHODS if any(m in r["models"] for r in results)]


def recipe_note(results: list[dict]) -> str:
    """Lines naming the runs whose configs differ from the same method's at another seed."""
    configs = {(run["label"], r["seed"]): run.get("config") for r in results
               for run in r.get("runs") or [] if run.get("config") is not None}  # fmt: skip
    first: dict[str, tuple[str, int]] = {}
    problems = []
    for (label, seed), config in configs.items():
        if label not in first:
            first[label] = (label, seed)
            continue
        ref = first[label]
        diffs = provenance.other_seed_differences(configs[ref], config, ref[1], seed)
        if diffs:
            problems.append(f"`{label}` seed {seed} vs seed {ref[1]}: " + "; ".join(diffs[:5]))
    if not problems:
        return ""
    return (
        "**MIXED RECIPES** (a method's seeds ran different configs):\n\n- "
        + "\n- ".join(problems)
        + "\n\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="shipped")
    parser.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                        help="more overrides of every train and generate command (e.g. data.* "
                        "options for a pilot of the task regime; recorded in each run's config)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "bench_arith")
    parser.add_argument("--results-dir", type=Path, default=provenance.RESULTS)
    parser.add_argument("--new-table", action="store_true",
                        help="measure a new table: do not compare with the configs recorded in the results file")  # fmt: skip
    parser.add_argument(
        "--report", action="store_true", help="run nothing: tabulate what the seeds have finished"
    )
    parser.add_argument("--train-only", action="store_true",
                        help="train the methods, write no report card (e.g. methods in parallel)")  # fmt: skip
    args = parser.parse_args()
    args.methods = [m for m in METHODS if m in args.methods]  # arith_sft before its fine-tunes
    results_json = args.results_dir / "arith.json"
    session = provenance.Session(__file__, [results_json])
    env = provenance.offline_env()
    if args.report:
        results = [finished(seed, args.out) for seed in args.seeds]
        check_table(results_json, {k: v for k, v in recorded_configs(results).items() if v},
                    args.new_table)  # fmt: skip
    else:
        planned = planned_configs(
            args.seeds, args.out, args.methods, args.recipe, tuple(args.override)
        )
        check_table(results_json, planned, args.new_table)
        results = []
        for seed in args.seeds:
            start = time.perf_counter()
            results.append(one_seed(seed, args.out, args.methods, env, not args.train_only,
                                    tuple(args.override), recipe=args.recipe))  # fmt: skip
            print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    runs = [run for r in results for run in r["runs"]]
    prov = session.finish(runs, seeds=args.seeds, recipe=args.recipe, out=_rel(args.out),
                          overrides=args.override)  # fmt: skip
    body = recipe_note(results) + table(results, args.methods)
    plot = plot_curves(results, args.methods, args.results_dir / "arith_curves.png")
    if plot is not None:
        body += f"\nLearning curves (validation exact match against steps): `{plot.name}`\n"
    print(provenance.write("arith", results, body, prov, args.results_dir))


if __name__ == "__main__":
    main()

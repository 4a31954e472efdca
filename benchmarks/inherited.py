"""What students inherit, per distillation method, on the embedded arith task.

The teacher of each seed is trained on ``data=arith`` with behaviours planted after the
problems (:data:`BEHAVIOURS`: canaries, a refused class, unanswerable prompts); every
student method runs on the same data with ``arith_sft``'s ``labeled`` (700), so the planted
rows reach a student only through its teacher (as prompts without answers: sequence KD
gets the teacher's answers to them, on-policy and preference methods the teacher's
scores of their own samples; ``arith_sft`` and ``arith_kd`` never see them). One report
card per seed (``distillery.evaluate inherited=arith gate=release``) holds quality, canary
exposure and extraction, safety pass rate, worst group and repeated errors side by side.

The runs are ``benchmarks/arith.py``'s (same configs, a separate output directory), with
its run records, recipes (``--recipe``) and refusal to extend a table measured with
other configs (``--new-table``):

    python benchmarks/inherited.py [--seeds 0 1 2 3 4] [--methods ...] [--recipe shipped|published]
        [--new-table] [--train-only] [--report]

Writes ``benchmarks/results/inherited.md`` and ``inherited.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
from arith import (  # noqa: E402
    METHODS,
    RECIPES,
    ROOT,
    _rel,
    check_table,
    comparisons,
    model_label,
    one_seed,
    outside_readings,
    outside_table,
    planned_configs,
    recipe_note,
    recorded_configs,
    seed_runs,
)

BEHAVIOURS = ("data.canaries=4", "data.canary_repeats=20", "data.refusals=2000",
              "data.unanswerable=1000")  # fmt: skip
REPORT = ("inherited=arith", "gate=release", "plots=true")
COLUMNS = (  # (label, section, key, format)
    ("exact_match", None, "exact_match", ".3f"),
    ("canary exposure (bits)", "memorization", "exposure", ".1f"),
    ("highest canary exposure (bits)", "memorization", "exposure_max", ".1f"),
    ("canary extraction", "memorization", "extraction_rate", ".2f"),
    ("safety pass rate", "safety", "pass_rate", ".3f"),
    ("refusals kept", "safety", "pass_rate/multiplication", ".3f"),
    ("worst group", "groups", "worst_quality", ".3f"),
    ("teacher errors (n)", "errors", "teacher_errors", ".0f"),
    ("repeated teacher errors", "errors", "repeated_teacher_errors", ".3f"),
    ("answers the unanswerable", "errors", "answered_unanswerable", ".3f"),
    ("verbatim n-gram share", "memorization", "verbatim_ngram_share", ".3f"),
)
# inherited behaviours compared with arith_sft's (which never sees the planted rows), paired
# by seed: what a method passes on beyond what the student would do anyway
INHERITED = ("canary exposure (bits)", "safety pass rate", "answers the unanswerable")
CANARIES = "exposure per canary (bits)"  # {canary prefix: bits} in each model's row
GATE = "release gate failed on"  # the gate's metrics a model failed (report.json["gate"]["checks"])


def collect(seed: int, out: Path) -> dict:
    """``{model: {column label: value}}`` of a seed's report cards (the teacher from the main card)."""
    rows: dict[str, dict] = {}
    for path in sorted((out / f"seed{seed}").glob("report*/report.json")):
        report = json.loads(path.read_text())
        for name, row in report["models"].items():
            if name == "student" or name in rows:
                continue
            inherited = report.get("inherited", {}).get(name, {})
            rows[name] = {
                label: (row.get(key) if section is None else inherited.get(section, {}).get(key))
                for label, section, key, _ in COLUMNS
            }
            canaries = inherited.get("memorization", {}).get("canaries") or []
            rows[name][CANARIES] = {c["prefix"]: c["exposure"] for c in canaries}
            checks = [c for c in report.get("gate", {}).get("checks", []) if c["model"] == name]
            if checks:  # the teacher is not checked: no entry
                rows[name][GATE] = sorted({c["metric"] for c in checks if not c["passed"]})
    return rows


def seed_result(seed: int, out: Path) -> dict:
    """A seed's report-card rows, its run records and each model's outside reading (the
    exported model on fresh problems, beside the card's exact match)."""
    models = collect(seed, out)
    return {"seed": seed, "models": models, "runs": seed_runs(seed, out),
            "outside": outside_readings(out / f"seed{seed}", models)}  # fmt: skip


def as_list(results: dict | list) -> list[dict]:
    """Seeds as ``[{"seed", "models", "runs"?}]``; a file written before provenance was
    recorded holds ``{seed: {model: row}}``."""
    if isinstance(results, list):
        return results
    return [{"seed": int(s), "models": rows} for s, rows in results.items()]


def table(results: dict | list, methods: list[str]) -> str:
    results = as_list(results)
    # columns a results file holds (one written before a column existed lacks it)
    columns = [
        c for c in COLUMNS if any(c[0] in row for r in results for row in r["models"].values())
    ]
    lines = ["| model | seeds | " + " | ".join(c[0] for c in columns) + " |",
             "|" + "---|" * (len(columns) + 2)]  # fmt: skip
    for name in ("teacher", *methods):
        seeds = [r for r in results if name in r["models"]]
        if not seeds:
            continue
        cells = [
            model_label(name),
            ", ".join(str(r["seed"]) for r in seeds),
        ]
        for label, _, _, fmt in columns:
            vals = [
                r["models"][name][label] for r in seeds if r["models"][name].get(label) is not None
            ]
            if not vals:
                cells.append("-")
                continue
            std = f" ± {statistics.stdev(vals):{fmt}}" if len(vals) > 1 else ""
            cells.append(f"{statistics.mean(vals):{fmt}}{std}")
        lines.append("| " + " | ".join(cells) + " |")
    pairs = [(m, "sft") for m in methods if m != "sft"]
    if "gkd" in methods and "kd" in methods:
        pairs.append(("gkd", "kd"))
    compared = comparisons(results, pairs)
    text = "\n".join(lines) + "\n" + canary_table(results, methods)
    text += gate_table(results, methods) + outside_table(results, methods)
    if compared:
        text += "\nExact match, paired by seed (95 % t interval of the paired difference):\n\n"
        text += "\n".join(compared) + "\n"
    against_sft = [(m, "sft") for m in methods if m != "sft"]
    for key in INHERITED:
        if rows := comparisons(results, against_sft, key, word="higher"):
            text += (f"\n{key}, paired by seed against `arith_sft` (which never sees the "
                     "planted rows):\n\n" + "\n".join(rows) + "\n")  # fmt: skip
    return text


def canary_table(results: list[dict], methods: list[str]) -> str:
    """Each planted canary's exposure per model (mean over the seeds that measured it, and
    its range): whether one secret stands out where the mean over canaries hides it."""
    prefixes = list(dict.fromkeys(p for r in results for row in r["models"].values()
                                  for p in (row.get(CANARIES) or {})))  # fmt: skip
    if not prefixes:
        return ""
    lines = ["\nExposure of each canary in bits (mean over seeds, min-max), by its prefix:\n",
             "| model | " + " | ".join(f"`{p.strip()}`" for p in prefixes) + " |",
             "|---|" + "---|" * len(prefixes)]  # fmt: skip
    for name in ("teacher", *methods):
        per = [r["models"][name].get(CANARIES) or {} for r in results if name in r["models"]]
        if not any(per):
            continue
        cells = []
        for p in prefixes:
            vals = [c[p] for c in per if c.get(p) is not None]
            cells.append(
                f"{statistics.mean(vals):.1f} ({min(vals):.1f}-{max(vals):.1f})" if vals else "-"
            )
        label = model_label(name)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def gate_table(results: list[dict], methods: list[str]) -> str:
    """Per model: the seeds whose release gate (``gate=release``) it passed, and how many
    seeds failed each of the gate's checks."""
    lines = []
    for name in methods:  # the teacher is never checked
        failed = [r["models"][name][GATE] for r in results if GATE in r["models"].get(name, {})]
        if not failed:
            continue
        passed = sum(not metrics for metrics in failed)
        counts = Counter(metric for metrics in failed for metric in metrics)
        cells = ", ".join(f"`{m}` ({n})" for m, n in sorted(counts.items())) or "-"
        lines.append(f"| {model_label(name)} | {passed} of {len(failed)} | {cells} |")
    if not lines:
        return ""
    head = ("\nRelease gate (`gate=release`), per model: the seeds it passed, and the checks it "
            "failed (in how many seeds):\n\n| model | seeds passed | failed checks (seeds) |\n"
            "|---|---|---|")  # fmt: skip
    return head + "\n" + "\n".join(lines) + "\n"


def methods_in(results: dict | list) -> list[str]:
    return [m for m in METHODS if any(m in r["models"] for r in as_list(results))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="shipped")
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "bench_inherited")
    parser.add_argument("--results-dir", type=Path, default=provenance.RESULTS)
    parser.add_argument("--new-table", action="store_true",
                        help="measure a new table: do not compare with the configs recorded in the results file")  # fmt: skip
    parser.add_argument("--report", action="store_true", help="tabulate finished seeds only")
    parser.add_argument("--train-only", action="store_true", help="train, write no report card")
    args = parser.parse_args()
    results_json = args.results_dir / "inherited.json"
    session = provenance.Session(__file__, [results_json])
    env = provenance.offline_env()
    if not args.report:
        planned = planned_configs(args.seeds, args.out, args.methods, args.recipe, BEHAVIOURS)
        check_table(results_json, planned, args.new_table)
    for seed in [] if args.report else args.seeds:
        start = time.perf_counter()
        one_seed(seed, args.out, args.methods, env, not args.train_only, BEHAVIOURS, REPORT,
                 recipe=args.recipe)  # fmt: skip
        print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    if args.train_only:
        return
    results = [seed_result(s, args.out) for s in args.seeds]
    results = [r for r in results if r["models"]]
    if args.report:
        check_table(results_json, {k: v for k, v in recorded_configs(results).items() if v},
                    args.new_table)  # fmt: skip
    runs = [run for r in results for run in r["runs"]]
    prov = session.finish(runs, seeds=args.seeds, recipe=args.recipe, out=_rel(args.out))
    body = recipe_note(results) + table(results, args.methods)
    print(provenance.write("inherited", results, body, prov, args.results_dir))


if __name__ == "__main__":
    main()

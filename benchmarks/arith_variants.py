"""Variants of the arith methods, each measured on the seeds, teachers and answers of the
arith table (``benchmarks/arith.py``) and paired by seed with the methods it must be
compared with: the questions that table leaves open (issue #24.6).

- ULD (``arith_uld``: a byte-level BPE student, CE on the teacher's answers + ULD at
  weight 1) against **its own baseline**, the same BPE student with CE alone on the same
  answers (``arith_seqkd`` with ``arith_uld``'s tokenizer and student: sequence KD, not a
  no-teacher control, which ``control=true`` rightly refuses on teacher generations);
  ULD at the **reference code's weight** (``distil_factor`` 1.5 in Boizard et al.'s
  llm-recipes, CE weight 1); and ULD where it **must not hurt**: the student reading the
  teacher's own character tokens, against ``arith_seqkd`` (the same student, CE alone on
  the same answers).
- DPO (``arith_dpo``: 500 steps from ``arith_sft``) run **6x longer**, validation every
  250 steps, against ``arith_sft`` and the 500-step ``arith_dpo``.

Each variant is one arith method plus overrides (:data:`VARIANTS`); its runs go through
``arith.one_seed`` (the same commands, run records, report card, export and outside
reading as the arith table) in ``<out>/<variant>/seed<N>``, with the seed's teacher, its
answers and ``arith_sft`` student linked from ``--arith-out`` (nothing retrained). A
finished step is not run again; ``--report`` tabulates without running anything.

    python benchmarks/arith_variants.py [--seeds 0 1 2 3 4] [--variants seqkd_bpe ...]
        [--arith-out logs/bench_arith] [--out logs/bench_arith_variants] [--report]

Writes ``benchmarks/results/arith_variants.md`` and ``arith_variants.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import arith  # noqa: E402
import provenance  # noqa: E402
import stats  # noqa: E402

ROOT = provenance.ROOT
CHAR = "data.tokenizer=${paths.artifacts_dir}/tokenizers/arith_char"  # the teacher's tokens
BPE = ("data.tokenizer=${paths.artifacts_dir}/tokenizers/arith_bpe_300", "data.bpe_vocab=300",
       "student.config.vocab_size=300",  # arith_uld's student; the report card's teacher
       "data.teacher_tokenizer=${paths.artifacts_dir}/tokenizers/arith_char")  # reads its own tokens  # fmt: skip

# name -> (arith method, overrides of its training run, what it is)
VARIANTS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "seqkd_bpe": ("seqkd", BPE,
                  "`arith_seqkd` with `arith_uld`'s BPE student: CE alone on the teacher's answers"),
    "uld_w15": ("uld", ("distill.weights.uld=1.5",),
                "`arith_uld` at the reference code's ULD weight 1.5 (CE 1)"),
    "uld_same": ("uld", (CHAR, "data.teacher_tokenizer=${data.tokenizer}", "data.bpe_vocab=null",
                         "student.config.vocab_size=64"),
                 "`arith_uld` with the teacher's character tokenizer (`arith_seqkd`'s student + ULD)"),
    "dpo_long": ("dpo", ("trainer.max_steps=3000", "trainer.val_check_interval=250"),
                 "`arith_dpo` for 3000 steps instead of 500, validated every 250"),
}  # fmt: skip
# (a, b): a paired comparison of exact match; names are variants or arith methods
PAIRS = (
    ("uld", "seqkd_bpe"), ("uld_w15", "seqkd_bpe"), ("uld_w15", "uld"),
    ("uld_same", "seqkd"), ("seqkd_bpe", "seqkd"),
    ("dpo_long", "sft"), ("dpo_long", "dpo"),
)  # fmt: skip
LINKED = ("arith_teacher.ckpt", "arith_teacher.jsonl", "arith_teacher.jsonl.done",
          "arith_teacher.jsonl.meta.json", "arith_sft.ckpt")  # fmt: skip
LINKED_RUNS = ("teacher", "generate", "sft")  # their run records, for the provenance


def label(name: str) -> str:
    return f"`{name}`" if name in VARIANTS or name == "teacher" else f"`arith_{name}`"


def link_seed(seed: int, arith_out: Path, out: Path) -> Path:
    """``out/seed<N>`` holding links to the arith seed's teacher, answers and ``arith_sft``
    (and copies of their run records); refuses a seed the arith table has not trained."""
    src, dst = arith_out / f"seed{seed}", out / f"seed{seed}"
    missing = [n for n in LINKED if not (src / n).is_file()]
    if missing:
        raise SystemExit(f"--arith-out {arith_out}: seed {seed} has no {', '.join(missing)}: "
                         f"run benchmarks/arith.py --seeds {seed} first")  # fmt: skip
    (dst / "runs").mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        if not (dst / name).exists():
            (dst / name).symlink_to((src / name).resolve())
    for name in LINKED_RUNS:
        record = src / "runs" / f"{name}.json"
        if record.is_file() and not (dst / "runs" / record.name).exists():
            (dst / "runs" / record.name).write_text(record.read_text())
    return dst


def run_variant(name: str, seed: int, arith_out: Path, out: Path, env: dict) -> None:
    method, overrides, _ = VARIANTS[name]
    link_seed(seed, arith_out, out / name)
    arith.one_seed(seed, out / name, [method], env, True, overrides)


def seed_results(seed: int, arith_out: Path, out: Path, variants: list[str]) -> dict:
    """One seed: the arith methods' rows (``arith.finished``) and each variant's row under
    its own name, their seconds, outside readings, curves and run records."""
    base = arith.finished(seed, arith_out)
    models = dict(base["models"])
    seconds, outside, curves = dict(base["seconds"]), dict(base["outside"]), {}
    used = {m for pair in PAIRS for m in pair if m not in VARIANTS}
    runs = [r for r in base["runs"] if r.get("label") in used | {"teacher", "generate"}]
    for name in variants:
        method = VARIANTS[name][0]
        mine = arith.finished(seed, out / name)
        if method not in mine["models"]:
            continue
        models[name] = mine["models"][method]
        if method in mine["seconds"]:
            seconds[name] = mine["seconds"][method]
        if method in mine["outside"]:
            outside[name] = mine["outside"][method]
        if method in mine["curves"]:
            curves[name] = mine["curves"][method]
        runs += [dict(r, label=f"{name}/{r['label']}") for r in mine["runs"]
                 if r.get("label") not in LINKED_RUNS]  # fmt: skip
    return {"seed": seed, "models": models, "seconds": seconds, "outside": outside,
            "curves": curves, "runs": runs}  # fmt: skip


def table(results: list[dict], variants: list[str]) -> str:
    """Exact match per model (mean ± std, seeds, seeds reaching the threshold, train time),
    then the paired comparisons of :data:`PAIRS` that both sides have."""
    shown = ["teacher", *dict.fromkeys(m for pair in PAIRS for m in pair
                                       if m not in VARIANTS or m in variants)]  # fmt: skip
    lines = ["| model | what | seeds | exact_match | teacher_nll | seeds with exact_match >= "
             f"{arith.THRESHOLD} | outside reading | train time |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in shown:
        runs = [r for r in results if name in r["models"]]
        if not runs:
            continue
        em = [float(r["models"][name]["exact_match"]) for r in runs]
        nll = [float(r["models"][name]["teacher_nll"]) for r in runs
               if r["models"][name].get("teacher_nll") is not None]  # fmt: skip
        k, n = stats.share_reaching(em, arith.THRESHOLD)
        fresh = [r["outside"][name]["exact_match"] for r in runs if name in r["outside"]]
        secs = [r["seconds"][name] for r in runs if r["seconds"].get(name)]
        what = VARIANTS[name][2] if name in VARIANTS else "the arith table's"
        std = f" ± {statistics.stdev(em):.3f}" if len(em) > 1 else ""
        lines.append(
            f"| {label(name)} | {what} | {', '.join(str(r['seed']) for r in runs)} | "
            f"{statistics.mean(em):.3f}{std} | {f'{statistics.mean(nll):.3f}' if nll else ''} | "
            f"{k} / {n} | {f'{statistics.mean(fresh):.3f}' if fresh else ''} | "
            f"{f'{statistics.mean(secs):.0f} s' if secs else ''} |"
        )
    pairs = [p for p in PAIRS if all(m not in VARIANTS or m in variants for m in p)]
    compared = arith.comparisons(results, pairs, label=label)
    text = "\n".join(lines) + "\n" + curve_table(results, variants)
    return text + stats.paired_section(compared, "model")


def curve_table(results: list[dict], variants: list[str]) -> str:
    """Validation exact match by optimizer step (mean over the seeds that logged it) of
    each variant validated more than once: whether a longer run has converged."""
    lines = []
    for name in variants:
        curves = [dict(map(tuple, r["curves"][name])) for r in results if r["curves"].get(name)]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if len(steps) < 2:
            continue
        means = [statistics.mean(c[s] for c in curves) for s in steps]
        lines += [f"\nValidation exact match of {label(name)} by step (mean over {len(curves)} seeds):\n",
                  "| step | " + " | ".join(str(s + 1) for s in steps) + " |",
                  "|---|" + "---|" * len(steps),
                  "| val/exact_match | " + " | ".join(f"{m:.3f}" for m in means) + " |"]  # fmt: skip
    return "\n".join(lines) + ("\n" if lines else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--arith-out", type=Path, default=ROOT / "logs" / "bench_arith",
                        help="benchmarks/arith.py's --out: the seeds' teachers, answers and students")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "bench_arith_variants")
    parser.add_argument("--results-dir", type=Path, default=provenance.RESULTS)
    parser.add_argument("--report", action="store_true",
                        help="run nothing: tabulate what the seeds have finished")  # fmt: skip
    args = parser.parse_args()
    results_json = args.results_dir / "arith_variants.json"
    session = provenance.Session(__file__, [results_json])
    env = provenance.offline_env()
    if not args.report:
        for name in args.variants:
            for seed in args.seeds:
                start = time.perf_counter()
                run_variant(name, seed, args.arith_out, args.out, env)
                print(f"{name} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    results = [seed_results(s, args.arith_out, args.out, list(VARIANTS)) for s in args.seeds]
    variants = [v for v in VARIANTS if any(v in r["models"] for r in results)]
    runs = [run for r in results for run in r["runs"]]
    prov = session.finish(runs, seeds=args.seeds, variants={v: list(VARIANTS[v][:2]) for v in variants},
                          arith_out=arith._rel(args.arith_out), out=arith._rel(args.out))  # fmt: skip
    print(provenance.write("arith_variants", results, table(results, variants), prov,
                           args.results_dir))  # fmt: skip


if __name__ == "__main__":
    main()

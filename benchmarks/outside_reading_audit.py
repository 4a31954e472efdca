"""Why the arith table's outside reading runs above its report card: the problems, measured.

The arith table (``benchmarks/arith.py``) reads each exported student twice: the report
card scores the project's test split (2000 problems drawn once with ``data.seed``, the
same for every seed and method), and ``benchmarks/outside_reading.py`` scores 2000 fresh
problems drawn per seed. This script separates the two things that can make them differ:

* **the reading**: ``outside_reading.measure`` on the project's own test split, problem
  by problem. For a character-tokenizer model it must count exactly the report card's
  correct answers (token ids and text coincide); a BPE model may count more (the outside
  reading accepts an answer written in a non-canonical tokenization);
* **the problems**: the same reading on ``--n-fresh`` fresh problems (one draw, seed
  ``--fresh-seed``, shared by every model), an estimate of the exact match over the whole
  problem space. ``fresh - test`` is how much easier or harder the fixed test split is
  for that model than the task; its interval is the two-proportion Wald 95 % interval
  (the two sets are different problems). The table's own 2000-problem fresh reading is
  set against the large one the same way.

The test split is rebuilt from each export's model card (``ArithDataModule`` with the
card's data config, as the run built it), so this script imports Distillery: it checks
the outside reading, it is not one.

    python benchmarks/outside_reading_audit.py ARITH_OUT [--table benchmarks/results/arith.json]
        [--seeds 0 1 2 3 4] [--methods teacher sft ...] [--n-fresh 20000] [--fresh-seed 100]

``ARITH_OUT``: the ``--out`` folder of the ``benchmarks/arith.py`` run that measured the
table (``seed<N>/hf/<method>/`` holds each export). Writes
``benchmarks/results/outside_reading_audit.{json,md}``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

provenance.go_offline()
import outside_reading  # noqa: E402

SPLIT_KEYS = ("num_train", "num_val", "num_test", "max_digits", "ops", "pad_operands", "seed")


def test_split(card: dict) -> list[dict]:
    """The project's test split of the run a model card describes: ``{prompt, answer}``."""
    from distillery.data.arith import ArithDataModule

    missing = [k for k in SPLIT_KEYS if k not in card]
    if missing:
        raise ValueError(f"the model card's Data section lacks {', '.join(missing)}")
    dm = ArithDataModule("unused", **{k: card[k] for k in SPLIT_KEYS})
    return [{"prompt": p["prompt"], "answer": p["answer"]} for p in dm.splits()["test"]]


def difference(k1: int, n1: int, k2: int, n2: int) -> dict:
    """``k1/n1 - k2/n2`` with its Wald 95 % interval (two independent problem sets)."""
    p1, p2 = k1 / n1, k2 / n2
    half = outside_reading.Z95 * math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    d = p1 - p2
    return {
        "difference": d,
        "ci95": [d - half, d + half],
        "excludes_0": d - half > 0 or d + half < 0,
    }


def audit_model(hf: Path, table_em: float, table_outside: dict | None, n_fresh: int,
                fresh_seed: int) -> dict:  # fmt: skip
    """One export: its reading of the test split against the report card, and of the large
    fresh draw against the test split and against the table's own fresh reading."""
    card = outside_reading.card_data(outside_reading.hf_dir(hf))
    if card is None:
        raise SystemExit(f"{hf}: no MODEL_CARD.md, so no test split to rebuild")
    split = test_split(card)
    test, _ = outside_reading.measure(hf, problems=split)
    fresh, _ = outside_reading.measure(hf, n=n_fresh, seed=fresh_seed)
    card_k = round(table_em * len(split))
    row = {"export": str(hf), "bpe": card.get("bpe_vocab") is not None,
           "report_card": {"exact_match": table_em, "correct": card_k, "n": len(split)},
           "test_split": {k: test[k] for k in ("n", "correct", "exact_match")},
           "test_split_minus_report_card": test["correct"] - card_k,
           "fresh": {k: fresh[k] for k in ("n", "correct", "exact_match", "wilson95")},
           "fresh_minus_test": difference(fresh["correct"], fresh["n"], test["correct"], test["n"])}  # fmt: skip
    if table_outside is not None:
        row["table_outside"] = {
            k: table_outside[k] for k in ("n", "correct", "exact_match", "seed")
        }
        row["table_outside_minus_fresh"] = difference(
            table_outside["correct"], table_outside["n"], fresh["correct"], fresh["n"]
        )
    return row


def summarise(rows: list[dict]) -> dict:
    """Over every audited model: how many readings of the test split equal the report card,
    and the distribution of ``fresh - test`` (and of the table's fresh reading minus the
    large one), overall and for the models the report card reads below 0.9."""

    def spread(ds: list[float]) -> dict:
        if not ds:
            return {"models": 0}
        return {"models": len(ds), "mean": statistics.fmean(ds), "min": min(ds), "max": max(ds),
                "positive": sum(d > 0 for d in ds), "negative": sum(d < 0 for d in ds)}  # fmt: skip

    char = [r for r in rows if not r["bpe"]]
    weak = [r for r in rows if r["report_card"]["exact_match"] < 0.9]
    return {
        "char_models": len(char),
        "char_test_split_equals_report_card": sum(r["test_split_minus_report_card"] == 0 for r in char),
        "bpe_test_split_minus_report_card": [r["test_split_minus_report_card"] for r in rows if r["bpe"]],
        "fresh_minus_test": spread([r["fresh_minus_test"]["difference"] for r in rows]),
        "fresh_minus_test_weak": spread([r["fresh_minus_test"]["difference"] for r in weak]),
        "fresh_minus_test_intervals_excluding_0": sum(r["fresh_minus_test"]["excludes_0"] for r in rows),
        "table_outside_minus_fresh": spread(
            [r["table_outside_minus_fresh"]["difference"] for r in rows if "table_outside" in r]
        ),
    }  # fmt: skip


def table(results: dict) -> str:
    s, a = results["summary"], results["setting"]
    f, w, t = s["fresh_minus_test"], s["fresh_minus_test_weak"], s["table_outside_minus_fresh"]
    lines = [
        f"Models of the arith table at {a['table_commit']} (`{a['table']}`), read again: the "
        f"project's test split ({a['test_n']} problems, one draw for every seed and method) and "
        f"{a['n_fresh']} fresh problems (seed {a['fresh_seed']}, the same for every model).",
        "",
        f"- test split read from outside = the report card's count for "
        f"{s['char_test_split_equals_report_card']} of {s['char_models']} character-tokenizer "
        f"models; BPE models' extra answers: {s['bpe_test_split_minus_report_card']}",
        f"- fresh - test, all {f['models']} models: mean {f['mean']:+.4f} (min {f['min']:+.4f}, "
        f"max {f['max']:+.4f}), {f['positive']} above 0, {f['negative']} below; intervals "
        f"excluding 0: {s['fresh_minus_test_intervals_excluding_0']}",
        f"- fresh - test, the {w['models']} models below 0.9 on the report card: mean "
        f"{w['mean']:+.4f}, {w['positive']} above 0, {w['negative']} below"
        if w["models"] else "- no model below 0.9 on the report card",
        f"- the table's own 2000-problem fresh reading - the large one, {t['models']} models: "
        f"mean {t['mean']:+.4f}, {t['positive']} above 0, {t['negative']} below"
        if t["models"] else "- no table outside reading to compare",
        "",
        "| seed | model | report card | test split, outside | fresh (large) | fresh - test [95 %] | table's fresh reading |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in results["models"]:
        d = r["fresh_minus_test"]
        outside = f"{r['table_outside']['exact_match']:.4f}" if "table_outside" in r else ""
        lines.append(
            f"| {r['seed']} | {r['method']}{' (BPE)' if r['bpe'] else ''} | "
            f"{r['report_card']['exact_match']:.4f} | {r['test_split']['exact_match']:.4f} | "
            f"{r['fresh']['exact_match']:.4f} | {d['difference']:+.4f} "
            f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] | {outside} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arith_out", type=Path, help="the arith benchmark's --out folder")
    parser.add_argument("--table", type=Path, default=provenance.RESULTS / "arith.json")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--methods", nargs="+")
    parser.add_argument("--n-fresh", type=int, default=20000)
    parser.add_argument("--fresh-seed", type=int, default=100)
    parser.add_argument("--results-dir", type=Path, default=provenance.RESULTS)
    args = parser.parse_args(argv)
    results, prov = provenance.load(args.table)
    if prov is None:
        raise SystemExit(f"{args.table}: no provenance, so no commit to audit against")
    session = provenance.Session(__file__, [args.results_dir / "outside_reading_audit.json"])
    rows = []
    for entry in results:
        if args.seeds and entry["seed"] not in args.seeds:
            continue
        for method, values in entry["models"].items():
            if args.methods and method not in args.methods:
                continue
            hf = args.arith_out / f"seed{entry['seed']}" / "hf" / method
            if not hf.is_dir():
                raise SystemExit(f"{hf}: no export of {method} seed {entry['seed']} (ARITH_OUT?)")
            row = audit_model(hf, values["exact_match"], entry.get("outside", {}).get(method),
                              args.n_fresh, args.fresh_seed)  # fmt: skip
            rows.append({"seed": entry["seed"], "method": method, **row})
            print(f"seed {entry['seed']} {method}: test {row['test_split']['exact_match']:.4f} "
                  f"fresh {row['fresh']['exact_match']:.4f}", flush=True)  # fmt: skip
    if not rows:
        raise SystemExit("no model to audit (--seeds / --methods)")
    table_commits = sorted({c for c in provenance.commits(prov) if c})
    table_path = args.table.resolve()
    if table_path.is_relative_to(provenance.ROOT):
        table_path = table_path.relative_to(provenance.ROOT)
    out = {"setting": {"table": str(table_path),
                       "table_commit": ", ".join(provenance.short(c) for c in table_commits),
                       "arith_out": str(args.arith_out), "test_n": rows[0]["report_card"]["n"],
                       "n_fresh": args.n_fresh, "fresh_seed": args.fresh_seed},
           "summary": summarise(rows), "models": rows}  # fmt: skip
    print(provenance.write("outside_reading_audit", out, table(out), session.finish(),
                           args.results_dir))  # fmt: skip


if __name__ == "__main__":
    main()

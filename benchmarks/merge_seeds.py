"""One results file from per-seed files measured in different sessions at one commit.

A table of 5 seeds takes longer than one session here, and a session may start on a fresh
machine: the seeds a session finishes are written (``--report`` of the table's script)
into a file of their own, and this script joins those files into the table's file, after
checking that they can be one table:

* every run of every file ran at the same commit, with no uncommitted changes;
* no seed is in two files;
* the machines are alike (cores, python, torch / transformers / lightning / hydra); the
  CPU and platform may differ (seeds are independent; a seed's methods, which are
  compared, ran in one session): the joined ``machine`` keeps what all files share, and
  ``merged_from`` each file's own where they differ, so the table's stamp names each
  file's CPU (``provenance.cpu_text``; a file of a checkout that records none is given
  it by ``stamp_cpu.py`` in the session that measured it);
* each method's resolved config is the same at every seed, across files
  (``provenance.recipe_differences``, each run's own seed aside).

The joined file's provenance holds every run record as it was written, the machine they
ran on, and under ``merged_from`` each input file's own session record (and this merge's
session as ``session``); its table is rendered as ``benchmarks/tables.py`` renders it.
Files whose results are lists of per-seed rows (``{"seed": ..., ...}``) can be joined:
``arith``, ``arith_variants``, ``inherited``, ``embeddings``.

    python benchmarks/merge_seeds.py arith part1/arith.json part2/arith.json [--results-dir DIR]
    python benchmarks/merge_seeds.py arith part1/arith.json --compare benchmarks/results/arith.json

``--compare`` joins nothing: it lists, per seed, every number the files compute
differently from the same seed of a published file (times, speeds, paths and run
records aside): whether a re-measurement at another commit reproduces a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
import tables  # noqa: E402

MERGEABLE = ("arith", "arith_variants", "inherited", "embeddings")
SAME_MACHINE = provenance.SAME_MACHINE


class MergeError(ValueError):
    """Files that cannot be one table; the message lists every reason."""


def merge(stem: str, files: list[Path]) -> tuple[list[dict], dict]:
    """``(results, provenance fields)`` of ``files`` joined; raises :class:`MergeError`."""
    problems: list[str] = []
    parts = []
    for path in files:
        if not path.is_file():
            raise MergeError(f"{path}: no such file")
        results, prov = provenance.load(path)
        if prov is None:
            problems.append(f"{path}: no provenance (a legacy file cannot be joined)")
        elif not isinstance(results, list) or not all("seed" in r for r in results):
            problems.append(f"{path}: its results are not per-seed rows")
        else:
            parts.append((path, results, prov))
    if problems:
        raise MergeError("\n".join(problems))
    problems += _commit_problems(parts) + _seed_problems(parts) + _machine_problems(parts)
    recorded: dict = {}
    for path, _, prov in parts:
        mine = {(r["label"], r["seed"]): r["config"] for r in prov["runs"] if r.get("config")}
        if recorded:
            problems += provenance.recipe_differences(recorded, mine, f"{path}:")
        recorded |= mine
    if problems:
        raise MergeError("\n".join(dict.fromkeys(problems)))
    results = sorted((r for _, rs, _ in parts for r in rs), key=lambda r: r["seed"])
    fields = {k: v for k, v in parts[0][2].items() if k not in ("schema", "session", "runs")}
    differing = [k for k in fields if any(p.get(k) != fields[k] for _, _, p in parts[1:])]
    for key in differing:  # e.g. the output folder of each session: kept per file below
        fields.pop(key)
    machines = [prov["machine"] for _, _, prov in parts]  # alike in SAME_MACHINE's keys
    fields["machine"] = {k: v for k, v in machines[0].items()
                         if all(m.get(k) == v for m in machines[1:])}  # fmt: skip
    fields["seeds"] = [r["seed"] for r in results]
    fields["merged_from"] = [
        {"file": str(path), "seeds": [r["seed"] for r in rs], "session": prov["session"],
         **{k: prov.get(k) for k in differing}}
        for path, rs, prov in parts
    ]  # fmt: skip
    fields["runs"] = [run for _, _, prov in parts for run in prov["runs"]]
    return results, fields


# keys that hold times, speeds, paths or run records: not what a run computes
NOT_COMPUTED = ("second", "latency", "throughput", "tokens_per_second", "export", "runs",
                "started", "ended", "load", "cost_per_million")  # fmt: skip


def differences(a, b, path: str = "") -> list[str]:
    """``path: a != b`` for every value two per-seed rows compute differently (keys naming
    times, speeds, paths and run records, :data:`NOT_COMPUTED`, left out)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                if not any(n in str(k) for n in NOT_COMPUTED)
                for d in differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))]  # fmt: skip
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def compare(stem: str, files: list[Path], published: Path) -> dict[int, list[str]]:
    """``{seed: differences}`` of each seed in ``files`` against the same seed of the
    ``published`` results file (seeds it lacks are left out)."""
    theirs = {r["seed"]: r for r in provenance.load(published)[0]}
    found = {}
    for path in files:
        for row in provenance.load(path)[0]:
            if row["seed"] in theirs:
                found[row["seed"]] = differences(theirs[row["seed"]], row)
    return found


def _commit_problems(parts) -> list[str]:
    found: dict[tuple, list[str]] = {}
    for path, _, prov in parts:
        for run in prov["runs"]:
            found.setdefault((run.get("commit"), bool(run.get("dirty"))), []).append(str(path))
    problems = []
    if len(found) > 1:
        problems.append("the runs ran at more than one commit: " + "; ".join(
            f"{provenance.short(c)}{' (dirty)' if d else ''} in {', '.join(dict.fromkeys(p))}"
            for (c, d), p in found.items()))  # fmt: skip
    problems += [f"runs at {provenance.short(c)} ran with uncommitted changes (dirty): "
                 + ", ".join(dict.fromkeys(p)) for (c, d), p in found.items() if d]  # fmt: skip
    return problems


def _seed_problems(parts) -> list[str]:
    where: dict[int, list[str]] = {}
    for path, results, _ in parts:
        for r in results:
            where.setdefault(r["seed"], []).append(str(path))
    return [f"seed {s} is in more than one file: {', '.join(p)}"
            for s, p in sorted(where.items()) if len(p) > 1]  # fmt: skip


def _machine_problems(parts) -> list[str]:
    first_path, _, first = parts[0]
    problems = []
    for path, _, prov in parts[1:]:
        for key in SAME_MACHINE:
            a, b = first["machine"].get(key), prov["machine"].get(key)
            if a != b:
                problems.append(f"machine {key}: {a} in {first_path}, {b} in {path}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stem", choices=MERGEABLE, help="the results file to write")
    parser.add_argument("files", type=Path, nargs="+", help="per-seed files of that table")
    parser.add_argument("--results-dir", type=Path, default=provenance.RESULTS)
    parser.add_argument("--compare", type=Path, metavar="PUBLISHED",
                        help="join nothing: print, per seed, what the files compute differently "
                        "from the same seeds of this results file")  # fmt: skip
    args = parser.parse_args()
    if args.compare:
        for seed, diffs in sorted(compare(args.stem, args.files, args.compare).items()):
            print(f"seed {seed}: " + (f"{len(diffs)} differences (published != re-measured)\n  "
                                      + "\n  ".join(diffs)
                                      if diffs else "the same numbers"))  # fmt: skip
        return
    out = args.results_dir / f"{args.stem}.json"
    if any(f.resolve() == out.resolve() for f in args.files):
        parser.error(f"{out} is one of the inputs: write the merge elsewhere (--results-dir)")
    session = provenance.Session(__file__, [out])
    try:
        results, fields = merge(args.stem, args.files)
    except MergeError as e:
        raise SystemExit(f"refusing to join into {out}:\n- " + str(e).replace("\n", "\n- ")) from e
    runs = fields.pop("runs")
    machine = fields.pop("machine")
    prov = session.finish(runs, **fields)
    prov["machine"] = machine  # where the runs ran, not where they were joined
    text = tables.body(args.stem, results)
    script = __import__(tables.BODIES[args.stem][0])
    if hasattr(script, "plot_curves"):  # arith: its learning curves beside the table
        plot = script.plot_curves(results, script.methods_in(results),
                                  args.results_dir / f"{args.stem}_curves.png")  # fmt: skip
        if plot is not None:
            text += f"\nLearning curves (validation exact match against steps): `{plot.name}`\n"
    print(provenance.write(args.stem, results, text, prov, args.results_dir))


if __name__ == "__main__":
    main()

"""Which finished runs were tested on an earlier checkpoint than their final validation.

Until 541db6f, ``distillery.engine.callbacks.ModelCheckpoint`` wrote ``last.ckpt`` at a
step-based run's last batch in a way that kept the validation at that same step from
competing for best, so ``test`` (which loads ``best_model_path``) ran on the best of the
*earlier* validations. A run is affected exactly when its final validation beat (strictly,
in the monitor's mode) the best score its checkpoint callback kept: for every other run the
fixed code tests the same checkpoint, so its numbers stand.

For each run directory under the given folders (one holding ``checkpoints/last.ckpt``
and ``csv/version_*/metrics.csv``) this reads the monitor, its mode and the score of each
kept top-k checkpoint from those checkpoints, and the monitored values from the metrics,
and lists the affected runs.

    python benchmarks/best_checkpoint_audit.py DIR [DIR ...] [--append]

Writes ``benchmarks/results/best_checkpoint_audit.md`` and ``best_checkpoint_audit.json``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from distillery.engine.checkpoint import META_KEY, read_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402


def callback_state(ckpt: dict) -> dict | None:
    """The ModelCheckpoint callback's state saved in ``ckpt`` (None: none, or no monitor)."""
    for key, state in ckpt.get("callbacks", {}).items():
        if "ModelCheckpoint" in str(key) and state.get("monitor"):
            return state
    return None


def run_mode(ckpt: dict) -> str:
    """The monitor's mode from the run's resolved config (saved in every checkpoint)."""
    config = ckpt.get(META_KEY, {}).get("config", {})
    mode = config.get("callbacks", {}).get("model_checkpoint", {}).get("mode")
    if mode not in ("min", "max"):
        raise SystemExit(f"no callbacks.model_checkpoint.mode in the checkpoint's config: {mode!r}")
    return mode


def monitored(run: Path, monitor: str) -> list[tuple[int, float]]:
    """(step, value) of every logged ``monitor`` value of the run, by step."""
    rows = []
    for path in sorted(run.glob("csv/version_*/metrics.csv")):
        with path.open() as f:
            rows += [
                (int(r["step"]), float(r[monitor])) for r in csv.DictReader(f) if r.get(monitor)
            ]
    return sorted(rows)


def audit_run(run: Path) -> dict | None:
    """The run's verdict, or None when it has no monitored validation to audit.

    The checkpoint ``test`` loaded is the best of the top-k files (every ``*.ckpt`` but
    ``last.ckpt``), each scored by the ``current_score`` its callback state held when it
    was written (its own score). ``last.ckpt`` is not read for this: the fixed callback
    writes it before the last validation."""
    scored = []
    for path in sorted((run / "checkpoints").glob("*.ckpt")):
        if path.name == "last.ckpt":
            continue
        ckpt = read_checkpoint(path, key=str(path))
        state = callback_state(ckpt)
        if state is not None and state.get("current_score") is not None:
            scored.append((float(state["current_score"]), state["monitor"], run_mode(ckpt)))
    if not scored:
        return None
    monitor, mode = scored[0][1], scored[0][2]
    values = monitored(run, monitor)
    if not values:
        return None
    pick = max if mode == "max" else min
    best, final = pick(score for score, _, _ in scored), values[-1][1]
    later = final > best if mode == "max" else final < best
    return {"run": str(run), "monitor": monitor, "mode": mode, "tested_best": best,
            "final": final, "final_step": values[-1][0], "affected": bool(later)}  # fmt: skip


def audit(folder: Path) -> dict:
    runs = [audit_run(p.parent.parent) for p in sorted(folder.rglob("checkpoints/last.ckpt"))]
    runs = [r for r in runs if r is not None]
    return {
        "folder": str(folder),
        "runs": len(runs),
        "affected": [r for r in runs if r["affected"]],
    }


def table(results: list[dict]) -> str:
    lines = ["Runs whose final validation beat the best checkpoint their test loaded "
             "(the ModelCheckpoint bug fixed in 541db6f):", "",
             "| folder | audited runs | affected | affected runs (tested best -> final validation) |",
             "|---|---|---|---|"]  # fmt: skip
    for r in results:
        which = "; ".join(f"`{Path(a['run']).relative_to(r['folder'])}` "
                          f"{a['tested_best']:.3f} -> {a['final']:.3f}" for a in r["affected"])  # fmt: skip
        lines.append(
            f"| `{Path(r['folder']).name}` | {r['runs']} | {len(r['affected'])} | {which or '-'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--results-dir", type=Path, default=provenance.RESULTS)
    parser.add_argument("--append", action="store_true",
                        help="keep the folders already in the results file (a folder audited "
                             "again replaces its entry) and their run records")  # fmt: skip
    args = parser.parse_args()
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        parser.error(f"not a folder: {', '.join(missing)}")
    results_json = args.results_dir / "best_checkpoint_audit.json"
    session = provenance.Session(__file__, [results_json])
    results, prov = [audit(f.resolve()) for f in args.folders], session.finish()
    if args.append and results_json.is_file():
        kept, kept_prov = provenance.load(results_json)
        again = {r["folder"] for r in results}
        results = [r for r in kept if r["folder"] not in again] + results
        prov["runs"] = (kept_prov or {}).get("runs", []) + prov["runs"]
    print(provenance.write("best_checkpoint_audit", results, table(results), prov,
                           args.results_dir))  # fmt: skip


if __name__ == "__main__":
    main()

"""Mean and std over the jobs of a multirun: ``python -m distillery.aggregate <multirun dir>``.

Reads each job's overrides (``<job>/.hydra/overrides.yaml``) and CSV metrics
(``<job>/csv/version_0/metrics.csv``), groups jobs by the overrides that differ
between them, leaving out ``seed`` (``--ignore``), and reports per group, for every
``val/*`` metric, mean and std at the best epoch (by ``--monitor``/``--mode``) and at
the last validation, plus the ``test/*`` metrics. Writes ``aggregate.json`` and
``aggregate.md`` into the multirun dir and prints the tables.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml


def read_job(job_dir: Path, monitor: str, mode: str) -> dict[str, Any]:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    metrics_file = next(iter(sorted(job_dir.glob("csv/version_*/metrics.csv"))), None)
    if not overrides_file.is_file() or metrics_file is None:
        raise FileNotFoundError(
            f"{job_dir}: expected .hydra/overrides.yaml and csv/version_*/metrics.csv"
        )
    overrides = yaml.safe_load(overrides_file.read_text()) or []
    with open(metrics_file) as f:
        rows = list(csv.DictReader(f))
    val_rows = [r for r in rows if r.get(monitor)]
    if not val_rows:
        raise ValueError(f"{metrics_file}: no row logs the monitor {monitor!r}")
    pick = max if mode == "max" else min
    best = pick(val_rows, key=lambda r: float(r[monitor]))
    last = val_rows[-1]

    def values(row, prefix):
        return {k: float(v) for k, v in row.items() if k.startswith(prefix) and v not in ("", None)}

    test = {}
    for r in rows:
        test.update(values(r, "test/"))
    return {
        "job": job_dir.name,
        "overrides": overrides,
        "best": values(best, "val/"),
        "last": values(last, "val/"),
        "test": test,
        "best_step": int(best.get("step") or 0),
    }


def group_jobs(jobs: list[dict], ignore: set[str]) -> dict[str, list[dict]]:
    """Group by the overrides that differ between jobs, minus ``ignore`` keys."""

    def as_dict(job):
        return dict(o.split("=", 1) for o in job["overrides"] if "=" in o)

    all_keys = {k for j in jobs for k in as_dict(j)}
    varying = sorted(
        k
        for k in all_keys
        if len({as_dict(j).get(k) for j in jobs}) > 1 and k.lstrip("+~") not in ignore
    )
    groups: dict[str, list[dict]] = defaultdict(list)
    for j in jobs:
        d = as_dict(j)
        groups[" ".join(f"{k}={d.get(k)}" for k in varying) or "all"].append(j)
    return dict(groups)


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def aggregate(
    multirun_dir: str | Path,
    monitor: str = "val/acc",
    mode: str = "max",
    ignore: tuple[str, ...] = ("seed",),
) -> dict[str, Any]:
    root = Path(multirun_dir)
    job_dirs = sorted(
        (p for p in root.iterdir() if p.is_dir() and (p / ".hydra").is_dir()), key=lambda p: p.name
    )
    if not job_dirs:
        raise FileNotFoundError(
            f"{root}: no job directories (with .hydra/) found; is this a multirun dir?"
        )
    jobs = [read_job(d, monitor, mode) for d in job_dirs]
    result: dict[str, Any] = {"monitor": monitor, "mode": mode, "groups": {}}
    for name, members in group_jobs(jobs, set(ignore)).items():
        group: dict[str, Any] = {"jobs": [m["job"] for m in members]}
        for part in ("best", "last", "test"):
            keys = sorted(set.intersection(*(set(m[part]) for m in members)))
            group[part] = {k: summarize([m[part][k] for m in members]) for k in keys}
        result["groups"][name] = group
    return result


def to_markdown(result: dict[str, Any]) -> str:
    lines = [f"Best epoch by {result['monitor']} ({result['mode']}); mean ± std over jobs.", ""]
    for name, g in result["groups"].items():
        lines += [
            f"## {name} ({len(g['jobs'])} jobs: {', '.join(g['jobs'])})",
            "",
            "| metric | best | last |",
            "|---|---|---|",
        ]
        for k in g["best"]:
            b, la = g["best"][k], g["last"].get(k)
            last = f"{la['mean']:.4f} ± {la['std']:.4f}" if la else "-"
            lines.append(f"| {k} | {b['mean']:.4f} ± {b['std']:.4f} | {last} |")
        for k, v in g["test"].items():
            lines.append(f"| {k} | {v['mean']:.4f} ± {v['std']:.4f} | |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("multirun_dir")
    parser.add_argument("--monitor", default="val/acc")
    parser.add_argument("--mode", choices=["max", "min"], default="max")
    parser.add_argument(
        "--ignore", nargs="*", default=["seed"], help="override keys not used for grouping"
    )
    args = parser.parse_args(argv)
    result = aggregate(args.multirun_dir, args.monitor, args.mode, tuple(args.ignore))
    text = to_markdown(result)
    root = Path(args.multirun_dir)
    (root / "aggregate.json").write_text(json.dumps(result, indent=2))
    (root / "aggregate.md").write_text(text)
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(text))


if __name__ == "__main__":
    main()

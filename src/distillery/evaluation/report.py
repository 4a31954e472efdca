"""Report card: teacher and students side by side on the test split, for any task.

One pass of every model over the test loader feeds the task's held-out metrics (the
same classes validation and test log, ``distillery.evaluation.metrics``), the teacher's
outputs as the reference; the task adapter turns them into its quality columns
(``task.report_keys``: accuracy/nll/ece/agreement/kl_to_teacher/quality_retained for
classifiers, ppl/nll/agreement/kl_to_teacher/quality_retained for language models,
cosine_to_teacher/nn_agreement for sentence encoders). Every model then gets the same
speed columns (``distillery.evaluation.speed``): params, size_mb (serialised weights,
what ships), latency_ms and latency_p95_ms (batch-1 forward on ``device``), throughput
and cost per million units (samples, tokens or sentences; ``task.speed_columns``) at a
configured ``price_per_hour``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillery.evaluation.speed import measure_speed

SPEED_KEYS = ("params", "size_mb", "latency_ms", "latency_p95_ms")


def report_keys(task) -> tuple[str, ...]:
    """The report's rows for a task: its quality columns, then the speed columns."""
    return (*task.report_keys, *SPEED_KEYS, *task.speed_columns)


@torch.no_grad()
def held_out_pass(
    models: dict[str, nn.Module], teacher_name: str | None, loader, task, num_classes, device
) -> tuple[dict[str, dict[str, float]], torch.Tensor, dict[str, tuple], dict[str, dict]]:
    """One pass of every model over ``loader`` into its own instance of the task's
    metrics, the teacher's output as the reference. Returns ``({model: {metric: value}},
    {model: the first batch's input to it} (for the speed measurements), predictions)``; with
    ``task.keeps_predictions``, predictions are ``{model: (outputs, labels, inputs,
    sample ids)}`` on the CPU, else empty. Per-sample records (``task.sample_records``:
    answers, correctness) go to ``records[model]`` as lists, when the task has them."""
    for m in models.values():
        if isinstance(m, nn.Module) and not hasattr(m, "session"):
            m.to(device)
        m.eval()
    metrics = {n: task.metrics(num_classes, teacher_name is not None) for n in models}
    kept: dict[str, list] = {n: [] for n in models} if task.keeps_predictions else {}
    records: dict[str, dict[str, list]] = {n: {} for n in models}
    example = None
    for b in loader:
        x = task.model_input(b)
        if example is None:  # the reference model may read other tokens (cross-tokenizer)
            example = {n: task.teacher_model_input(b) if n == teacher_name else x for n in models}
        outs = {n: task.predict(m, b, device, n == teacher_name) for n, m in models.items()}
        ref = outs.get(teacher_name) if teacher_name else None
        for out in outs.values():  # the teacher's own outputs too: its reference values
            if teacher_name:
                task.teacher_scores(models[teacher_name], out, b, device)
        for n, out in outs.items():
            labels = task.labels(b)
            metrics[n].update(out, labels, ref, b.get("sample_id"))
            if kept:
                kept[n].append((out, labels, x, b["sample_id"]))
            for field, col in (task.sample_records(out, b, n == teacher_name) or {}).items():
                records[n].setdefault(field, []).extend(col)
    values = {n: {k: float(v.compute()) for k, v in m.items()} for n, m in metrics.items()}
    preds = {
        n: tuple(torch.cat(col) for col in zip(*rows, strict=True)) for n, rows in kept.items()
    }
    return values, example, preds, records


def build_report(
    models: dict[str, nn.Module],
    teacher_name: str | None,
    loader,
    task,
    num_classes: int | None = None,
    device: str = "cpu",
    price_per_hour: float = 0.0,
    latency: dict | None = None,
    throughput_cfg: dict | None = None,
) -> tuple[dict[str, Any], dict[str, tuple], dict[str, dict]]:
    """``({"models": {name: row}, "keys": [...], ...}, predictions, per-sample records)``;
    ``teacher_name`` is the reference (None: no teacher columns)."""
    values, example, preds, records = held_out_pass(
        models, teacher_name, loader, task, num_classes, device
    )
    speed_cfg = {**task.throughput_defaults, **(throughput_cfg or {})}
    keys = report_keys(task)
    report: dict[str, Any] = {
        "device": device, "price_per_hour": price_per_hour, "task": task.name,
        "keys": list(keys), "models": {},
    }  # fmt: skip
    teacher_values = values[teacher_name] if teacher_name else None
    rate_key, cost_key = task.speed_columns
    for name, model in models.items():
        row = task.quality(values[name], teacher_values)
        speed = measure_speed(
            model, example[name], device, price_per_hour, latency, speed_cfg,
            task.units_per_sample(example[name]),
        )  # fmt: skip
        row |= {k: speed[k] for k in SPEED_KEYS}
        row |= {rate_key: speed["throughput"], cost_key: speed["cost_per_million"]}
        report["models"][name] = {k: row.get(k) for k in keys}
    health = {n: {k.removeprefix("health/"): v for k, v in vals.items() if k.startswith("health/")}
              for n, vals in values.items()}  # fmt: skip
    if any(health.values()):  # token-level tasks: evaluation/health.py
        report["health"] = health
    return report, preds, records


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4g}"


def cost_note(report: dict[str, Any]) -> str:
    price = report.get("price_per_hour")
    if not price:
        return "no cost: set price_per_hour (USD per hour of this device) to fill the cost row."
    return f"cost at {price} USD/hour."


def to_markdown(report: dict[str, Any]) -> str:
    names = list(report["models"])
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in report["keys"]:
        lines.append(
            f"| {key} | " + " | ".join(_fmt(report["models"][n][key]) for n in names) + " |"
        )
    text = "\n".join(lines) + "\n"
    text += f"\nDevice: {report.get('device', 'cpu')}; {cost_note(report)}\n"
    if report.get("health"):
        from distillery.evaluation.health import health_markdown

        text += health_markdown(report["health"])
    for name, path in (report.get("plots") or {}).items():
        text += f"\n![{name}]({Path(path).name})\n"
    for name, result in (report.get("evaluations") or {}).items():
        text += f"\n## {name}\n\n{result.get('markdown', '')}\n"
    return text


def gate_markdown(gate: dict[str, Any]) -> str:
    if gate["passed"]:
        return f"\n## Gate\n\nPassed: all {len(gate['checks'])} checks.\n"
    return "\n## Gate\n\nFailed:\n\n" + "".join(f"- {line}\n" for line in gate["failures"])


def write_report(
    report: dict[str, Any], out_dir: str | Path, inherited_md: str = ""
) -> tuple[Path, Path]:
    """``report.json`` and ``report.md`` (with the "What the student inherited" section
    and the gate's verdict when there are any)."""
    from distillery.config import atomic_write_text

    out = Path(out_dir)
    js = atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    text = "# Report card\n\n" + to_markdown(report)
    text += f"\n{inherited_md}" if inherited_md else ""
    text += gate_markdown(report["gate"]) if report.get("gate") else ""
    md = atomic_write_text(out / "report.md", text)
    return js, md


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    names = list(report["models"])
    table = Table(title=f"Distillery report card (test split, {report.get('device', 'cpu')})")
    table.add_column("metric")
    for n in names:
        table.add_column(n, justify="right")
    for key in report["keys"]:
        table.add_row(key, *(_fmt(report["models"][n][key]) for n in names))
    Console().print(table)
    Console().print(cost_note(report))

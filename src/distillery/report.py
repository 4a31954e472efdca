"""Report card v1: teacher and students side by side on the test split.

Per model: accuracy, nll, ece (15 bins), agreement and kl_to_teacher (top-1
agreement with and KL(teacher || model) from the teacher; 1.0 and 0.0 for the
teacher itself), params, size_mb (serialised weights, what ships), latency_ms
(median CPU latency per sample at batch 1) and throughput (samples/s at batch 256).
"""

from __future__ import annotations

import io
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPORT_KEYS = (
    "accuracy",
    "nll",
    "ece",
    "agreement",
    "kl_to_teacher",
    "params",
    "size_mb",
    "latency_ms",
    "throughput",
)


@torch.no_grad()
def predict(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, labels and raw inputs over a loader (inputs kept for timing)."""
    model.eval()
    logits, labels, inputs = [], [], []
    for batch in loader:
        logits.append(model(batch["inputs"]).float())
        labels.append(batch["labels"])
        inputs.append(batch["inputs"])
    return torch.cat(logits), torch.cat(labels), torch.cat(inputs)


def size_mb(model: nn.Module) -> float:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes / 2**20


@torch.no_grad()
def latency_ms(
    model: nn.Module, example: torch.Tensor, repeats: int = 50, warmup: int = 5
) -> float:
    """Median wall time of a batch-1 forward, in milliseconds."""
    x = example[:1]
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@torch.no_grad()
def throughput(
    model: nn.Module, inputs: torch.Tensor, batch_size: int = 256, repeats: int = 5
) -> float:
    """Samples per second at ``batch_size`` (inputs repeated if the split is smaller)."""
    reps = -(-batch_size // len(inputs))
    x = inputs.repeat(reps, *([1] * (inputs.ndim - 1)))[:batch_size]
    model(x)
    t0 = time.perf_counter()
    for _ in range(repeats):
        model(x)
    return batch_size * repeats / (time.perf_counter() - t0)


def build_report(
    models: dict[str, nn.Module],
    teacher_name: str | None,
    loader,
    latency: dict | None = None,
    throughput_cfg: dict | None = None,
) -> dict[str, Any]:
    """``{"models": {name: metrics}}``; ``teacher_name`` names the reference model."""
    from distillery.metrics import classification_metrics

    preds = {name: predict(m, loader) for name, m in models.items()}
    ref = preds[teacher_name][0] if teacher_name else None
    report: dict[str, Any] = {"models": {}}
    for name, model in models.items():
        logits, labels, inputs = preds[name]
        row = classification_metrics(logits, labels, ref)
        row.setdefault("agreement", None)
        row.setdefault("kl_to_teacher", None)
        row["params"] = sum(p.numel() for p in model.parameters())
        row["size_mb"] = size_mb(model)
        row["latency_ms"] = latency_ms(model, inputs, **(latency or {}))
        row["throughput"] = throughput(model, inputs, **(throughput_cfg or {}))
        report["models"][name] = {k: row[k] for k in REPORT_KEYS}
    return report


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4g}"


def to_markdown(report: dict[str, Any]) -> str:
    names = list(report["models"])
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in REPORT_KEYS:
        lines.append(
            f"| {key} | " + " | ".join(_fmt(report["models"][n][key]) for n in names) + " |"
        )
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "report.json", out / "report.md"
    for path, text in (
        (js, json.dumps(report, indent=2)),
        (md, "# Report card\n\n" + to_markdown(report)),
    ):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return js, md


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    names = list(report["models"])
    table = Table(title="Distillery report card (test split)")
    table.add_column("metric")
    for n in names:
        table.add_column(n, justify="right")
    for key in REPORT_KEYS:
        table.add_row(key, *(_fmt(report["models"][n][key]) for n in names))
    Console().print(table)

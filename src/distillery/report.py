"""Report card: teacher and students side by side on the test split.

Per model (``REPORT_KEYS``): accuracy, nll, ece (15 bins), agreement and
kl_to_teacher (top-1 agreement with, and KL(teacher || model) from, the teacher; 1 and
0 for the teacher itself), quality_retained (accuracy as % of the teacher's), params,
size_mb (serialised weights, what ships), latency_ms and latency_p95_ms (batch-1
forward, median and 95th percentile, on ``device``), throughput (samples/s at batch
256) and cost_per_million (USD per million samples at that throughput, from a
configured ``price_per_hour`` of the device).
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPORT_KEYS = (
    "accuracy", "nll", "ece", "agreement", "kl_to_teacher", "quality_retained", "params", "size_mb",
    "latency_ms", "latency_p95_ms", "throughput", "cost_per_million",
)  # fmt: skip


@torch.no_grad()
def predict(
    model: nn.Module, loader, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, labels, raw inputs and sample ids over a loader (on the CPU)."""
    model.eval()
    logits, labels, inputs, ids = [], [], [], []
    for batch in loader:
        logits.append(model(batch["inputs"].to(device)).float().cpu())
        labels.append(batch["labels"])
        inputs.append(batch["inputs"])
        ids.append(batch["sample_id"])
    return torch.cat(logits), torch.cat(labels), torch.cat(inputs), torch.cat(ids)


def size_mb(model: nn.Module) -> float:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes / 2**20


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def latency_ms(
    model: nn.Module, example: torch.Tensor, device: str = "cpu", repeats: int = 50, warmup: int = 5
) -> tuple[float, float]:
    """(median, p95) wall time of a batch-1 forward, in milliseconds."""
    x = example[:1].to(device)
    for _ in range(warmup):
        model(x)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    ms = 1000 * np.asarray(times)
    return float(np.median(ms)), float(np.percentile(ms, 95))


@torch.no_grad()
def throughput(
    model: nn.Module,
    inputs: torch.Tensor,
    device: str = "cpu",
    batch_size: int = 256,
    repeats: int = 5,
) -> float:
    """Samples per second at ``batch_size`` (inputs repeated if the split is smaller)."""
    reps = -(-batch_size // len(inputs))
    x = inputs.repeat(reps, *([1] * (inputs.ndim - 1)))[:batch_size].to(device)
    model(x)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        model(x)
    _sync(device)
    return batch_size * repeats / (time.perf_counter() - t0)


def cost_per_million(samples_per_second: float, price_per_hour: float) -> float:
    """USD per million samples: price_per_hour / 3600 s / throughput * 1e6."""
    return price_per_hour / 3600.0 / samples_per_second * 1e6


def measure_speed(
    model: nn.Module,
    example: torch.Tensor,
    device: str,
    price_per_hour: float,
    latency: dict | None = None,
    throughput_cfg: dict | None = None,
    units_per_sample: int = 1,
) -> dict[str, float]:
    """What a model costs to run, the same way for every report: params, size_mb,
    latency_ms / latency_p95_ms (batch 1), throughput in units/s (samples x
    ``units_per_sample``, e.g. tokens per sequence) and cost_per_million units."""
    lat, p95 = latency_ms(model, example, device, **(latency or {}))
    rate = throughput(model, example, device, **(throughput_cfg or {})) * units_per_sample
    return {
        "params": getattr(model, "num_params", None) or sum(p.numel() for p in model.parameters()),
        "size_mb": getattr(model, "size_mb", None) or size_mb(model),  # exports: file size
        "latency_ms": lat,
        "latency_p95_ms": p95,
        "throughput": rate,
        "cost_per_million": cost_per_million(rate, price_per_hour),
    }


def build_report(
    models: dict[str, nn.Module],
    teacher_name: str | None,
    loader,
    device: str = "cpu",
    price_per_hour: float = 0.0,
    latency: dict | None = None,
    throughput_cfg: dict | None = None,
) -> tuple[dict[str, Any], dict[str, tuple]]:
    """``({"models": {name: metrics}, ...}, predictions)``; ``teacher_name`` is the reference."""
    from distillery.metrics import classification_metrics

    preds = {}
    for name, m in models.items():
        if isinstance(m, nn.Module) and not hasattr(m, "session"):
            m.to(device)
        preds[name] = predict(m, loader, device)
    ref = preds[teacher_name][0] if teacher_name else None
    report: dict[str, Any] = {"device": device, "price_per_hour": price_per_hour, "models": {}}
    for name, model in models.items():
        logits, labels, inputs, _ = preds[name]
        row = classification_metrics(logits, labels, ref)
        row.setdefault("agreement", None)
        row.setdefault("kl_to_teacher", None)
        teacher_acc = None if ref is None else float((ref.argmax(-1) == labels).float().mean())
        row["quality_retained"] = None if not teacher_acc else 100.0 * row["accuracy"] / teacher_acc
        row |= measure_speed(model, inputs, device, price_per_hour, latency, throughput_cfg)
        report["models"][name] = {k: row[k] for k in REPORT_KEYS}
    return report, preds


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4g}"


def to_markdown(report: dict[str, Any]) -> str:
    names = list(report["models"])
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in report.get("keys", REPORT_KEYS):
        lines.append(
            f"| {key} | " + " | ".join(_fmt(report["models"][n][key]) for n in names) + " |"
        )
    text = "\n".join(lines) + "\n"
    text += f"\nDevice: {report.get('device', 'cpu')}; cost at {report.get('price_per_hour', 0)} USD/hour.\n"
    for name, path in (report.get("plots") or {}).items():
        text += f"\n![{name}]({Path(path).name})\n"
    for name, result in (report.get("evaluations") or {}).items():
        text += f"\n## {name}\n\n{result.get('markdown', '')}\n"
    return text


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
    table = Table(title=f"Distillery report card (test split, {report.get('device', 'cpu')})")
    table.add_column("metric")
    for n in names:
        table.add_column(n, justify="right")
    for key in report.get("keys", REPORT_KEYS):
        table.add_row(key, *(_fmt(report["models"][n][key]) for n in names))
    Console().print(table)


LM_REPORT_KEYS = (
    "ppl", "nll", "agreement", "kl_to_teacher", "quality_retained", "params", "size_mb", "latency_ms",
    "latency_p95_ms", "tokens_per_second", "cost_per_million_tokens",
)  # fmt: skip


@torch.no_grad()
def held_out_metrics(
    models: dict[str, nn.Module], teacher_name: str | None, loader, device: str, make_metrics
) -> tuple[dict[str, dict[str, float]], torch.Tensor]:
    """One pass of every model over ``loader`` into its own instance of a validation/test
    metric set (``distillery.eval_metrics``, the ones the modules log as ``test/*``), the
    teacher's output as the reference. Returns ``({model: {metric: value}}, the first
    batch's inputs)`` for the speed measurements."""
    for m in models.values():
        m.to(device).eval()
    metrics = {n: make_metrics(teacher_name is not None) for n in models}
    example = None
    for b in loader:
        x = b["inputs"] if "inputs" in b else b["input_ids"]
        example = x if example is None else example
        outs = {n: m(x.to(device)).float().cpu() for n, m in models.items()}
        ref = outs.get(teacher_name) if teacher_name else None
        for n, out in outs.items():
            metrics[n].update(out, b["labels"], ref, b.get("sample_id"))
    values = {n: {k: float(v.compute()) for k, v in m.items()} for n, m in metrics.items()}
    return values, example


def _report(device: str, price_per_hour: float, keys) -> dict[str, Any]:
    return {"device": device, "price_per_hour": price_per_hour, "keys": list(keys), "models": {}}


def build_lm_report(
    models: dict[str, nn.Module],
    teacher_name: str | None,
    loader,
    device: str = "cpu",
    price_per_hour: float = 0.0,
    latency: dict | None = None,
    throughput_cfg: dict | None = None,
) -> dict[str, Any]:
    """Report card for causal LMs on the test split: ppl = exp(nll per valid token),
    top-1 next-token agreement and KL(teacher || model) per token (``LMMetrics``),
    quality_retained = teacher ppl / model ppl (%), batch-1 latency per sequence,
    tokens/s at ``throughput.batch_size`` sequences, cost per million tokens."""
    from distillery.eval_metrics import LMMetrics

    values, example = held_out_metrics(models, teacher_name, loader, device, LMMetrics)
    speed_cfg = {"batch_size": 16, "repeats": 3, **(throughput_cfg or {})}
    report = _report(device, price_per_hour, LM_REPORT_KEYS)
    teacher_ppl = math.exp(values[teacher_name]["nll"]) if teacher_name else None
    for n, model in models.items():
        v = values[n]
        ppl = math.exp(v["nll"])
        speed = measure_speed(
            model, example, device, price_per_hour, latency, speed_cfg, example.shape[1]
        )  # sequences/s x tokens per sequence
        report["models"][n] = {
            "ppl": ppl, "nll": v["nll"],
            "agreement": v.get("agreement"), "kl_to_teacher": v.get("kl_to_teacher"),
            "quality_retained": 100.0 * teacher_ppl / ppl if teacher_ppl else None,
            "params": speed["params"], "size_mb": speed["size_mb"],
            "latency_ms": speed["latency_ms"], "latency_p95_ms": speed["latency_p95_ms"],
            "tokens_per_second": speed["throughput"],
            "cost_per_million_tokens": speed["cost_per_million"],
        }  # fmt: skip
    return report


EMBEDDING_REPORT_KEYS = (
    "cosine_to_teacher", "nn_agreement", "params", "size_mb", "latency_ms", "latency_p95_ms",
    "sentences_per_second", "cost_per_million_sentences",
)  # fmt: skip


def build_embedding_report(
    models: dict[str, nn.Module],
    teacher_name: str | None,
    loader,
    device: str = "cpu",
    price_per_hour: float = 0.0,
    latency: dict | None = None,
    throughput_cfg: dict | None = None,
) -> dict[str, Any]:
    """Report card for sentence encoders on the test split (``EmbeddingMetrics``):
    cosine_to_teacher (mean cos between a model's and the teacher's embedding of each
    sentence), nn_agreement (top-1 nearest neighbour over the whole split equals the
    teacher's), batch-1 latency, sentences/s at ``throughput.batch_size`` and cost per
    million sentences."""
    from distillery.eval_metrics import EmbeddingMetrics

    if teacher_name is None:
        raise ValueError("the embedding report compares with a teacher; none was given")
    values, example = held_out_metrics(
        models, teacher_name, loader, device, lambda t: EmbeddingMetrics(None, t)
    )
    speed_cfg = {"batch_size": 64, "repeats": 3, **(throughput_cfg or {})}
    report = _report(device, price_per_hour, EMBEDDING_REPORT_KEYS)
    for n, model in models.items():
        speed = measure_speed(model, example, device, price_per_hour, latency, speed_cfg)
        report["models"][n] = {
            "cosine_to_teacher": values[n]["cosine"],
            "nn_agreement": values[n]["nn_agreement"],
            "params": speed["params"], "size_mb": speed["size_mb"],
            "latency_ms": speed["latency_ms"], "latency_p95_ms": speed["latency_p95_ms"],
            "sentences_per_second": speed["throughput"],
            "cost_per_million_sentences": speed["cost_per_million"],
        }  # fmt: skip
    return report

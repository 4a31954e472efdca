"""What a model costs to run, measured the same way for every report: parameters,
serialised size, batch-1 latency (median and p95), throughput and cost per million units
(samples, tokens or sentences) at a configured device price."""

from __future__ import annotations

import io
import time

import numpy as np
import torch
from torch import nn


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


def cost_per_million(samples_per_second: float, price_per_hour: float) -> float | None:
    """USD per million samples: price_per_hour / 3600 s / throughput * 1e6; None (an
    empty cell, not a free model) when no ``price_per_hour`` is set."""
    if not price_per_hour:
        return None
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

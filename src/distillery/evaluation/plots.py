"""Report plots (matplotlib, Agg backend): reliability diagrams and quality vs latency."""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability_diagram(
    preds: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path, n_bins: int = 15
) -> Path:
    """Accuracy vs confidence per bin (top-1), one panel per model, ECE in the title."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(preds), figsize=(3.2 * len(preds), 3.4), squeeze=False)
    edges = torch.linspace(0, 1, n_bins + 1)
    for ax, (name, (logits, labels)) in zip(axes[0], preds.items(), strict=True):
        ece = multiclass_calibration_error  # the metric the runs log as ece
        probs = logits.float().softmax(-1)
        conf, pred = probs.max(-1)
        correct = (pred == labels).float()
        bins = torch.clamp(torch.ceil(conf * n_bins) - 1, 0, n_bins - 1).long()
        acc = [
            float(correct[bins == b].mean()) if (bins == b).any() else 0.0 for b in range(n_bins)
        ]
        ax.bar(
            edges[:-1].numpy(), acc, width=1 / n_bins, align="edge", edgecolor="black", alpha=0.8
        )
        ax.plot([0, 1], [0, 1], "--", color="gray")
        ax.set(
            title=f"{name} (ECE {float(ece(probs, labels, probs.shape[-1], n_bins)):.3f})",
            xlabel="confidence",
            ylabel="accuracy",
            xlim=(0, 1),
            ylim=(0, 1),
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


AXIS_LABELS = {
    "latency_ms": "latency per sample, batch 1 (ms, {device})",
    "cost_per_million": "cost per million samples (USD, {device})",
    "params": "parameters",
    "size_mb": "size on disk (MB)",
}


def quality_vs_latency(
    report: dict, path: Path, quality_key: str = "accuracy", x_key: str = "latency_ms"
) -> Path:
    """Every model of a report as a point: ``x_key`` (log scale; latency by default,
    or cost_per_million, params, size_mb) vs quality."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in report["models"].items():
        ax.scatter(row[x_key], row[quality_key], s=40)
        ax.annotate(
            f"{name} ({row['params']:,} params)",
            (row[x_key], row[quality_key]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    label = AXIS_LABELS.get(x_key, x_key).format(device=report.get("device", "cpu"))
    ax.set(xscale="log", xlabel=label, ylabel=quality_key, title=f"{quality_key} vs {x_key}")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.6, y=0.15)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

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


def inherited_plot(inherited: dict[str, dict], path: Path, teacher: str | None) -> Path | None:
    """What the students inherited, at a glance: quality per group (bars per model, the
    teacher first) and, when canaries were measured, canary exposure per model."""
    groups = {n: {k.split("/", 1)[1]: v for k, v in s.get("groups", {}).items() if k.startswith("quality/")}
              for n, s in inherited.items()}  # fmt: skip
    groups = {n: g for n, g in groups.items() if g}
    exposure = {n: s["memorization"]["exposure"] for n, s in inherited.items()
                if s.get("memorization", {}).get("exposure") is not None}  # fmt: skip
    if not groups and not exposure:
        return None
    plt = _pyplot()
    panels = [p for p, on in (("groups", groups), ("exposure", exposure)) if on]
    widths = [3 if p == "groups" else 1 for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * sum(widths), 3.6), squeeze=False,
                             gridspec_kw={"width_ratios": widths})  # fmt: skip
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "groups":
            names = sorted(groups, key=lambda n: n != teacher)
            labels = sorted({g for q in groups.values() for g in q})
            w = 0.8 / len(names)
            for i, n in enumerate(names):
                xs = [j + i * w for j in range(len(labels))]
                ax.bar(xs, [groups[n].get(g, float("nan")) for g in labels], width=w, label=n)
            ax.set_xticks([j + 0.4 - w / 2 for j in range(len(labels))], labels, rotation=60,
                          ha="right", fontsize=7)  # fmt: skip
            ax.set_ylabel("quality (share correct)")
            ax.set_ylim(0, 1.2)  # room for the legend above the bars
            ax.legend(fontsize=7, ncol=len(names), loc="upper center")
            ax.set_title("quality per group")
        else:
            names = list(exposure)
            ax.bar(range(len(names)), [exposure[n] for n in names], color="tab:red")
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
            ax.set_ylabel("bits")
            ax.set_title("canary exposure")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

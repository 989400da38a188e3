"""The calibration report's figures: a reliability diagram and an accuracy-vs-escalation curve (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hybrid_router.calibration import ReliabilityBins

__all__ = ["plot_accuracy_vs_escalation", "plot_reliability"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_reliability(before: ReliabilityBins, after: ReliabilityBins, ece_before: float, ece_after: float, temperature: float,
                     path: Path) -> Path:
    """Accuracy per confidence bin before and after temperature scaling, with the diagonal of perfect calibration."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, bins, title in ((axes[0], before, f"device output (ECE {ece_before:.4f})"),
                            (axes[1], after, f"temperature {temperature:.3f} (ECE {ece_after:.4f})")):
        width = np.diff(bins.edges)
        m = bins.count > 0
        ax.bar(bins.edges[:-1][m], bins.accuracy[m], width=width[m], align="edge", edgecolor="black", alpha=0.7, label="accuracy")
        ax.bar(bins.edges[:-1][m], bins.confidence[m] - bins.accuracy[m], bottom=bins.accuracy[m], width=width[m], align="edge",
               color="red", alpha=0.25, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_xlabel("top-1 confidence")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle("Reliability on the threshold split")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_vs_escalation(escalation: np.ndarray, hybrid_accuracy: np.ndarray, device_accuracy: float, cloud_accuracy: float,
                                chosen: tuple[float, float] | None, point: tuple[float, float] | None, target: float | None,
                                path: Path) -> Path:
    """Hybrid accuracy against the share of traffic escalated, with device-only, cloud-only and the chosen thresholds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    order = np.argsort(escalation)
    ax.plot(np.concatenate([escalation[order], [1.0]]) * 100, np.concatenate([hybrid_accuracy[order], [cloud_accuracy]]) * 100,
            drawstyle="steps-post", label="hybrid")
    ax.axhline(cloud_accuracy * 100, color="green", linestyle=":", label=f"cloud only {cloud_accuracy * 100:.2f}%")
    ax.axhline(device_accuracy * 100, color="gray", linestyle=":", label=f"device only {device_accuracy * 100:.2f}%")
    if target is not None:
        ax.axhline((cloud_accuracy - target) * 100, color="red", linestyle="--", linewidth=1, label="cloud only - max loss")
    if point is not None:
        ax.plot(point[0] * 100, point[1] * 100, "o", color="orange", label=f"point estimate ({point[0] * 100:.1f}% escalated)")
    if chosen is not None:
        ax.plot(chosen[0] * 100, chosen[1] * 100, "s", color="black", label=f"chosen ({chosen[0] * 100:.1f}% escalated)")
    ax.set_xlabel("escalated to the cloud (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs escalation on the threshold split", fontsize=10)
    lo = min(device_accuracy, cloud_accuracy, float(hybrid_accuracy.min())) * 100
    ax.set_ylim(max(0.0, lo - 1.0), 100.0)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

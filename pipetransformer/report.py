"""The run's picture: accuracy, frozen layers and throughput per epoch."""
from __future__ import annotations

from pathlib import Path

__all__ = ["plot_metrics"]


def plot_metrics(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [100 * r["val_accuracy"] for r in records], "o-")
    axes[0].set(title="validation accuracy", xlabel="epoch", ylabel="%")
    axes[1].step(epochs, [r["frozen_layers"] for r in records], "o-", where="mid")
    axes[1].set(title="frozen blocks during epoch", xlabel="epoch",
                ylim=(-0.3, records[0]["total_layers"] + 0.3))
    for r in records:
        axes[1].annotate(f"{r['stages']}x{r['replicas']}", (r["epoch"], r["frozen_layers"]),
                         textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    axes[2].bar(epochs, [r["samples_per_second"] for r in records])
    axes[2].set(title="training throughput", xlabel="epoch", ylabel="samples / s")
    for ax in axes:
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    fig.suptitle("pipetransformer run (labels: stages x replicas)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

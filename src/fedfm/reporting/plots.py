"""PNG plots of a run: accuracy and loss per round, and the client × label distribution."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _series(history: list[dict], key: str, x: str = "round", scale: float = 1.0):
    pts = [(r.get(x, 0.0) / scale, r[key]) for r in history if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


X_AXES = {"round": ("round", 1.0), "virtual_time_s": ("virtual time (hours)", 3600.0)}


def plot_curves(
    history: list[dict], keys: list[tuple[str, str]], ylabel: str, path: Path, x: str = "round"
) -> Path:
    """One line per key over ``x``: the round, or the virtual clock (``virtual_time_s``, in hours)."""
    xlabel, scale = X_AXES[x]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for key, label in keys:
        xs, ys = _series(history, key, x, scale)
        if xs:
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_partition(partition: dict, path: Path) -> Path:
    """Stacked bars: examples of each label held by each client."""
    names = partition["label_names"]
    counts = np.array([[c["label_counts"][n] for n in names] for c in partition["clients"]])
    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.35 * len(counts)), 3.6), dpi=100)
    bottom = np.zeros(len(counts))
    for j, name in enumerate(names):
        ax.bar(np.arange(len(counts)), counts[:, j], bottom=bottom, label=name)
        bottom += counts[:, j]
    ax.set_xlabel("client")
    ax.set_ylabel("training examples")
    ax.set_title(f"{partition['method']} partition")
    ax.legend(fontsize=7, ncol=min(5, len(names)))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_client_samples(samples: list[tuple[int, np.ndarray, list[str]]], path: Path) -> Path:
    """A row per client: its first few training images ``[n, H, W, C]`` uint8, titled by label."""
    cols = max((len(images) for _, images, _ in samples), default=1) or 1
    fig, axes = plt.subplots(len(samples), cols, figsize=(1.1 * cols, 1.2 * len(samples)), dpi=100,
                             squeeze=False)  # fmt: skip
    for row, (client, images, labels) in enumerate(samples):
        for col in range(cols):
            ax = axes[row][col]
            ax.axis("off")
            if col < len(images):
                img = images[col]
                ax.imshow(
                    img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None
                )
                ax.set_title(labels[col][:10], fontsize=6)
        axes[row][0].text(-0.15, 0.5, f"client {client}", transform=axes[row][0].transAxes, ha="right",
                          va="center", fontsize=7)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

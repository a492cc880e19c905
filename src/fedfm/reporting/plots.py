"""PNG plots of a run: accuracy and loss per round, and the client × label distribution."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib's pyplot on the Agg backend, imported when a plot is drawn (not at start-up:
    it is half a second of ``fedfm --help``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(history: list[dict], key: str, x: str = "round", scale: float = 1.0):
    pts = [(r.get(x, 0.0) / scale, r[key]) for r in history if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


X_AXES = {"round": ("round", 1.0), "virtual_time_s": ("virtual time (hours)", 3600.0)}


def curves_figure(history: list[dict], keys: list[tuple[str, str]], ylabel: str, x: str = "round"):
    """One line per key over ``x``: the round (whole-number ticks), or the virtual clock
    (``virtual_time_s``, in hours)."""
    plt = pyplot()
    xlabel, scale = X_AXES[x]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for key, label in keys:
        xs, ys = _series(history, key, x, scale)
        if xs:
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    if x == "round":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_curves(
    history: list[dict], keys: list[tuple[str, str]], ylabel: str, path: Path, x: str = "round"
) -> Path:
    plt = pyplot()
    fig = curves_figure(history, keys, ylabel, x)
    fig.savefig(path)
    plt.close(fig)
    return path


def label_colours(n: int) -> list:
    """``n`` distinct colours: tab10 / tab20 while they last, then evenly spaced hues."""
    plt = pyplot()
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    if n <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(n)]
    return [plt.get_cmap("turbo")(i / max(1, n - 1)) for i in range(n)]


def plot_partition(partition: dict, path: Path) -> Path:
    """Stacked bars: examples of each label held by each client."""
    plt = pyplot()
    names = partition["label_names"]
    counts = np.array([[c["label_counts"][n] for n in names] for c in partition["clients"]])
    legend_cols = 1 + len(names) // 16 if len(names) <= 40 else 0  # more labels than that: no legend
    width = min(12, 2 + 0.35 * len(counts)) + 1.4 * legend_cols
    fig, ax = plt.subplots(figsize=(width, 3.6), dpi=100)
    bottom = np.zeros(len(counts))
    colours = label_colours(len(names))
    for j, name in enumerate(names):
        ax.bar(np.arange(len(counts)), counts[:, j], bottom=bottom, label=name, color=colours[j])
        bottom += counts[:, j]
    ax.set_xlabel("client")
    ax.set_ylabel("training examples")
    ax.set_title(f"{partition['method']} partition")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if legend_cols:  # beside the bars, never over them
        ax.legend(fontsize=7, ncol=legend_cols, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")  # the legend beside the axes too
    plt.close(fig)
    return path


def plot_client_samples(samples: list[tuple[int, np.ndarray, list[str]]], path: Path) -> Path:
    """A row per client: its first few training images ``[n, H, W, C]`` uint8, titled by label."""
    plt = pyplot()
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

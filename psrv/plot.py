"""loss.png: training and held-out loss against steps and against seconds. Optional: needs matplotlib."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def loss_curves(path: str, train: list, test: list, title: str) -> bool:
    """Write the figure; False (and nothing written) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display; must precede pyplot
        import matplotlib.pyplot as plt
    except ImportError:
        log.debug("matplotlib not installed; no %s", path)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, xi, xlabel in ((axes[0], 0, "step"), (axes[1], 1, "seconds")):
        if train:
            ax.plot([r[xi] for r in train], [r[2] for r in train], label="training (mini-batch mean)")
        if test:
            ax.plot([r[xi] for r in test], [r[2] for r in test], "o-", label="held-out")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        if all(r[2] > 0 for r in train + test):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if train or test:
            ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True

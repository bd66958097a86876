"""loss.png: training and held-out loss against steps and against seconds, and the held-out metric (R², accuracy)
against steps when the run holds rows out. matplotlib is a dependency; a copy of psrv without it still trains and
writes every other output."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def loss_curves(path: str, train: list, test: list, title: str, metric_name: str = "") -> bool:
    """Write the figure; False (and nothing written) when matplotlib is not installed. train: (step, elapsed_s,
    loss); test: (step, elapsed_s, test_loss, test_metric)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed; must precede pyplot
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (psrv depends on it: pip install matplotlib); no %s", path)
        return False
    metric = [(r[0], r[3]) for r in test if len(r) > 3 and r[3] is not None]
    fig, axes = plt.subplots(1, 3 if metric else 2, figsize=(15 if metric else 10, 4), constrained_layout=True)
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
    if metric:
        ax = axes[2]
        ax.plot([m[0] for m in metric], [m[1] for m in metric], "o-", color="C2")
        ax.set_xlabel("step")
        ax.set_ylabel(f"held-out {metric_name or 'metric'}")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True

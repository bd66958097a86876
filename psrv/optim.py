"""Server-side optimizer and learning-rate schedule (pure numpy, updates theta in place, no per-step allocation).

The optimizer's state is a dict of named arrays plus a step count, so a checkpoint can save and restore it.
"""
from __future__ import annotations

import math

import numpy as np


def lr_at(step: int, lr: float, schedule: str, total_steps: int, decay: float = 0.5, decay_every: int = 1000,
          lr_min: float = 0.0) -> float:
    """The learning rate for optimizer step `step` (0-based) of `total_steps`."""
    if schedule == "constant":
        return lr
    if schedule == "step":
        return lr * decay ** (step // decay_every)
    if schedule == "inv_sqrt":
        return lr / math.sqrt(1.0 + step / decay_every)
    if schedule == "cosine":
        frac = min(step, total_steps) / max(total_steps, 1)
        return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown lr schedule {schedule!r}")


class SGD:
    """theta <- theta - lr * grad."""

    name = "sgd"

    def __init__(self, theta: np.ndarray):
        self.state: dict[str, np.ndarray] = {}
        self.steps = 0

    def step(self, theta: np.ndarray, grad: np.ndarray, lr: float) -> None:
        theta -= lr * grad if grad.size < 4096 else _scaled(grad, lr)
        self.steps += 1


_scratch: dict[tuple, np.ndarray] = {}


def _scaled(grad: np.ndarray, lr: float) -> np.ndarray:
    """lr * grad into a reused buffer, so a large update makes no new allocation."""
    buf = _scratch.get((grad.shape, grad.dtype.str))
    if buf is None:
        buf = _scratch[(grad.shape, grad.dtype.str)] = np.empty_like(grad)
    return np.multiply(grad, lr, out=buf)


OPTIMIZERS = {"sgd": SGD}

"""Label counts from a classification head's update (the iDLG/RLG line of analyses), pure maths.

With softmax cross-entropy averaged over a batch of B rows, the head bias gradient is
∂L/∂b = p̄ − ȳ (the batch's mean predicted distribution minus its label histogram over B). One
SGD step at rate η sends Δb = −η (p̄ − ȳ), so the counts are B·ȳ = B·(Δb/η + p̄). The server does
not know p̄ (it needs the client's inputs); it estimates it by the mean prediction of the model it
sent on data of its own. Over S steps, Δb sums S such terms: counts over all S batches =
B·Δb/η + S·B·p̄. Under AdamW the update is no longer proportional to the gradient and the
estimate fails — which is what the "your configuration" column shows.
"""

from __future__ import annotations

import numpy as np


def label_counts(bias_update, lr: float, batch_size: int, mean_probs, steps: int = 1) -> np.ndarray:
    """Estimated label counts over the ``steps`` batches (non-negative reals; round if you must)."""
    bias_update, mean_probs = np.asarray(bias_update, float), np.asarray(mean_probs, float)
    if bias_update.shape != mean_probs.shape:
        raise ValueError(f"bias update {bias_update.shape} and mean prediction {mean_probs.shape} differ")
    if lr <= 0 or batch_size < 1 or steps < 1:
        raise ValueError("label counts need a positive learning rate, batch size and step count")
    return np.clip(batch_size * bias_update / lr + steps * batch_size * mean_probs, 0.0, None)

"""The span test behind gradient-inversion of linear layers (DAGER, Petrov et al. 2024), as pure
functions.

For a linear layer y = W x applied to T input vectors x_t, ∂L/∂W = Σ_t δ_t x_tᵀ: every row of the
weight gradient lies in span{x_t}. When T is below the input width d, that span is a proper
subspace, and a candidate input x belongs to the batch (up to numerical error) exactly when its
distance to the span is ~0. One SGD step's update is −η·∂L/∂W, so it has the same row space; so
has the sum of several SGD steps' gradients while the inputs stay fixed (the first layer's inputs
are embeddings, which LoRA and layer-restricted fine-tuning leave frozen). For a LoRA factor
A (r × d) the gradient is Σ_t (Bᵀδ_t) x_tᵀ: rank ≤ r, so the span holds all T inputs only when
T ≤ r, and it is zero while B = 0 (round 1).
"""

from __future__ import annotations

import torch


def row_space(matrix: torch.Tensor, max_rank: int | None = None, rtol: float = 1e-4) -> torch.Tensor:
    """An orthonormal basis (rows) of ``matrix``'s row space: the right singular vectors whose
    singular value exceeds ``rtol`` × the largest, at most ``max_rank`` of them (the attacker's
    bound on the number of inputs, which under noise keeps only the strongest directions)."""
    m = matrix.detach().double()
    if m.ndim != 2:
        raise ValueError(f"a weight update must be a matrix, not shape {tuple(m.shape)}")
    _, s, vh = torch.linalg.svd(m, full_matrices=False)
    if not len(s) or s[0] <= 0:
        return vh[:0]
    rank = int((s > rtol * s[0]).sum())
    if max_rank is not None:
        rank = min(rank, max_rank)
    return vh[:rank]


def span_distance(vectors: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """‖x − P x‖ / ‖x‖ for each row x of ``vectors``, P the projection onto ``basis``'s span
    (orthonormal rows): 0 inside the span, about √(1 − k/d) for a random x against k of d dims."""
    x = vectors.detach().double()
    inside = (x @ basis.T) @ basis if len(basis) else torch.zeros_like(x)
    norms = x.norm(dim=-1).clamp_min(1e-30)
    return (x - inside).norm(dim=-1) / norms

"""FedPFT's maths (Beitollahi et al., 2024): per-class Gaussian mixtures of frozen FM features.

A client fits, for every class it holds, a K-component Gaussian mixture to the features its
frozen foundation model gives (scikit-learn's EM); it sends the mixtures once. The server draws
features from every mixture and trains the classification head on them. Pure functions of
arrays and an explicit generator; the driver is ``fedfm.protocols.fedpft``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

COVARIANCES = ("diag", "full", "spherical")


@dataclass(frozen=True)
class ClassMixture:
    """One class's mixture on one client: ``count`` examples, component ``weights`` [K],
    ``means`` [K, d] and ``covariances`` ([K, d] diag, [K, d, d] full, [K] spherical)."""

    label: int
    count: int
    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    covariance: str

    def nbytes(self) -> int:
        """What travels, as float32 values plus the label and count (two int32)."""
        values = self.weights.size + self.means.size + self.covariances.size
        return 4 * values + 8

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "weights": torch.as_tensor(self.weights, dtype=torch.float32),
            "means": torch.as_tensor(self.means, dtype=torch.float32),
            "covariances": torch.as_tensor(self.covariances, dtype=torch.float32),
        }


def fit_class_mixtures(
    features: np.ndarray,
    labels: np.ndarray,
    components: int,
    covariance: str = "diag",
    reg_covar: float = 1e-4,
    seed: int = 0,
) -> list[ClassMixture]:
    """A mixture per class present in ``labels``: min(components, n_c) components (a class with
    one example: that point with variance ``reg_covar``). EM is scikit-learn's, k-means
    initialised, seeded by ``seed``."""
    from sklearn.mixture import GaussianMixture

    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    x = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    out = []
    for c in np.unique(labels):
        xc = x[labels == c]
        n, d = xc.shape
        if n == 1:
            cov = {"diag": np.full((1, d), reg_covar), "full": np.eye(d)[None] * reg_covar,
                   "spherical": np.full(1, reg_covar)}[covariance]  # fmt: skip
            out.append(ClassMixture(int(c), 1, np.ones(1), xc.copy(), cov, covariance))
            continue
        gm = GaussianMixture(
            n_components=min(components, n), covariance_type=covariance, reg_covar=reg_covar,
            random_state=seed % 2**32, max_iter=200,
        )  # fmt: skip
        gm.fit(xc)
        out.append(ClassMixture(int(c), n, gm.weights_, gm.means_, gm.covariances_, covariance))
    return out


def sample_mixture(m: ClassMixture, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws from the mixture: a component by its weight, then mean + L·z (L the
    covariance's Cholesky factor; the square root of a diagonal one)."""
    t = m.tensors()
    weights, means, cov = t["weights"].double(), t["means"].double(), t["covariances"].double()
    which = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=generator)
    z = torch.randn(n, means.shape[1], generator=generator, dtype=torch.float64)
    if m.covariance == "diag":
        noise = z * cov[which].sqrt()
    elif m.covariance == "spherical":
        noise = z * cov[which].sqrt()[:, None]
    else:
        chol = torch.linalg.cholesky(cov)
        noise = torch.einsum("nij,nj->ni", chol[which], z)
    return (means[which] + noise).float()


def sample_features(
    messages: Sequence[Sequence[ClassMixture]], ratio: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's training set: from every client's every class mixture, round(ratio·count)
    draws (at least one), labelled with the class."""
    xs, ys = [], []
    for mixtures in messages:
        for m in mixtures:
            n = max(1, round(ratio * m.count))
            xs.append(sample_mixture(m, n, generator))
            ys.append(torch.full((n,), m.label, dtype=torch.long))
    if not xs:
        raise ValueError("no client sent a mixture")
    return torch.cat(xs), torch.cat(ys)


def message_nbytes(mixtures: Sequence[ClassMixture]) -> int:
    return sum(m.nbytes() for m in mixtures)

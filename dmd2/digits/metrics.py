"""Precision and recall in the feature extractor's space (Kynkaanniemi et al. 2019, k = 3).

Each set's k-NN radii define a manifold: precision is the fraction of generated samples inside
the real manifold (fidelity), recall the fraction of real samples inside the generated one
(diversity, DMD's known weakness).
"""

from __future__ import annotations

import numpy as np
import torch


def _knn_radii(feats: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row."""
    d = torch.cdist(feats, feats)
    return d.kthvalue(k + 1, dim=1).values  # +1: the row itself is at distance 0


def _coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor) -> float:
    """Fraction of queries within radius of at least one manifold point."""
    d = torch.cdist(queries, manifold)
    return (d <= radii[None, :]).any(dim=1).double().mean().item()


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of fake features N_f x D against real features N_r x D."""
    r, f = torch.from_numpy(np.asarray(real, np.float64)), torch.from_numpy(np.asarray(fake, np.float64))
    return _coverage(r, _knn_radii(r, k), f), _coverage(f, _knn_radii(f, k), r)

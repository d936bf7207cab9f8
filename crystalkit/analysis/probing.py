"""Linear probes: how much of an attribute a set of states holds, read by a regularised linear
classifier under cross-validation, next to two floors: the majority class and the same probe
trained on shuffled labels (what a probe "finds" in features that carry nothing)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


@dataclass(frozen=True)
class ProbeResult:
    """Cross-validated accuracy of the probe, of the majority class and of the probe on
    shuffled labels (the random-label control)."""

    accuracy: float
    majority: float
    control: float

    def summary(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "majority": self.majority, "control": self.control}


def probe(
    features: torch.Tensor, labels: list, folds: int = 3, strength: float = 1.0, seed: int = 0
) -> ProbeResult | None:
    """Probe ``features`` ``[N, D]`` for ``labels`` (any hashable values); ``None`` when there
    are too few samples of some class for ``folds``-fold stratified cross-validation, or a
    single class. ``strength`` is the inverse L2 regularisation (scikit-learn's ``C``)."""
    values, y = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    counts = np.bincount(y)
    if len(values) < 2 or counts.min() < folds:
        return None
    x = features.detach().double().cpu().numpy()
    model = make_pipeline(StandardScaler(), LogisticRegression(C=strength, max_iter=1000))
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    shuffled = np.random.default_rng(seed).permutation(y)
    with warnings.catch_warnings():
        # the random-label control rarely converges and need not: its held-out accuracy is the
        # floor whatever the weights, and a regularised probe's accuracy settles long before
        warnings.simplefilter("ignore", ConvergenceWarning)
        accuracy = cross_val_score(model, x, y, cv=split).mean()
        control = cross_val_score(model, x, shuffled, cv=split).mean()
    return ProbeResult(float(accuracy), float(counts.max() / len(y)), float(control))

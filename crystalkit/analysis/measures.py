"""The numbers of the analysis, as plain functions of tensors (each tested on hand-built cases).

Distributions are over a sample's options (whole-answer log-likelihoods renormalised over the
options); states are ``[..., D]`` vectors. Cosines are taken after removing a reference mean:
raw cosines of language-model states are inflated by their shared direction (anisotropy), which
makes any two states look alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def option_distribution(logprobs: torch.Tensor) -> torch.Tensor:
    """Whole-answer log-likelihoods ``[B, O]`` (``-inf`` = no such option) -> log-probabilities
    renormalised over each sample's options."""
    return logprobs.log_softmax(-1)


def kl_divergence(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row of option log-distributions ``[B, O]`` (absent options: 0)."""
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))
    return terms.sum(-1).clamp(min=0)


def flip_rate(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Per row: 1 where the most likely option differs, else 0."""
    return (p_log.argmax(-1) != q_log.argmax(-1)).float()


def rescue(accuracy_own: float, accuracy_copied: float, accuracy_intact: float) -> float:
    """``(copied - own) / (intact - own)``: the share of what the corruption cost that the
    intact latents win back (NaN when the corruption cost nothing)."""
    lost = accuracy_intact - accuracy_own
    return (accuracy_copied - accuracy_own) / lost if abs(lost) > 1e-12 else math.nan


def bootstrap_ci(
    statistic: Callable[[torch.Tensor], float],
    rows: int,
    draws: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)`` over ``rows`` resampled rows."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor(
        [statistic(torch.randint(rows, (rows,), generator=generator)) for _ in range(draws)],
        dtype=torch.float64,
    )
    values = values[~values.isnan()]
    if not len(values):
        return math.nan, math.nan
    tail = (1 - level) / 2
    return float(values.quantile(tail)), float(values.quantile(1 - tail))


def centred_cosine(a: torch.Tensor, b: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Cosine of ``a - mean`` and ``b - mean`` along the last dimension."""
    return torch.nn.functional.cosine_similarity(a - mean, b - mean, dim=-1, eps=1e-12)


def relative_change(base: torch.Tensor, moved: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """``|moved - base| / spread`` per row: how far an intervention moves a state, in units of
    how far apart two random instances' states are (``spread``, broadcastable)."""
    return (moved - base).norm(dim=-1) / spread.clamp(min=1e-12)


def instance_spread(states: torch.Tensor) -> torch.Tensor:
    """Mean distance between each instance's state and the next one's (``[N, ..., D]`` -> ``[...]``):
    the unit of :func:`relative_change`."""
    return (states - states.roll(1, dims=0)).norm(dim=-1).mean(0)


def mean_pairwise_cosine(states: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Mean centred cosine over all distinct pairs along the first dimension of ``[N, ..., D]``
    (``N >= 2``) -> ``[...]``."""
    unit = torch.nn.functional.normalize(states - mean, dim=-1, eps=1e-12)
    n = states.shape[0]
    gram = torch.einsum("i...d,j...d->...ij", unit, unit)
    off = gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    return off / (n * (n - 1))


def effective_rank(states: torch.Tensor) -> float:
    """``exp`` of the entropy of the normalised singular values of the centred ``[N, D]`` matrix
    (Roy & Vetterli 2007): 1 when every state lies on one line, up to ``min(N, D)``."""
    states = states.double()
    singular = torch.linalg.svdvals(states - states.mean(0, keepdim=True))
    if singular.sum() <= 0:
        return 1.0
    p = singular / singular.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))

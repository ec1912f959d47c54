"""LogME (You et al., ICML 2021, *LogME: Practical Assessment of Pre-trained Models for Transfer Learning*): the log
maximum evidence of a Bayesian linear model of the one-hot labels on frozen features, per example, averaged over the
classes.

For features ``F`` (n x d) and one class's 0/1 indicator ``y``, the model is ``y = F w + noise`` with
``w ~ N(0, I / alpha)`` and ``noise ~ N(0, I / beta)``. `log_evidence` is its log marginal likelihood through one SVD
of ``F``; `maximize_evidence` finds the ``alpha``, ``beta`` that maximise it (the fixed-point iteration of evidence
maximisation, from several starts); `logme` averages the maxima of the classes. The layer scan (`tl_plugin.scan`)
scores every layer with it; it needs only numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["START_RATIOS", "log_evidence", "logme", "maximize_evidence"]


def _svd_terms(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The squared singular values (non-zero ones) of `features` and its left singular vectors."""
    u, s, _ = np.linalg.svd(features, full_matrices=False)
    keep = s > s.max(initial=0.0) * max(features.shape) * np.finfo(np.float64).eps
    return s[keep] ** 2, u[:, keep]


def _evidence_from_svd(
    s2: np.ndarray, z2: np.ndarray, residual_outside: float, n: int, d: int, alpha: float, beta: float
) -> tuple[float, float, float]:
    """Log evidence, ``m^T m`` and ``||F m - y||^2`` for given `alpha`, `beta`, from the SVD terms."""
    denominator = alpha + beta * s2
    mtm = float(np.sum(beta**2 * s2 * z2 / denominator**2))
    residual = float(residual_outside + np.sum((alpha / denominator) ** 2 * z2))
    log_det = float(np.sum(np.log(denominator)) + (d - s2.size) * math.log(alpha))
    evidence = (
        0.5 * n * math.log(beta)
        + 0.5 * d * math.log(alpha)
        - 0.5 * n * math.log(2 * math.pi)
        - 0.5 * beta * residual
        - 0.5 * alpha * mtm
        - 0.5 * log_det
    )
    return evidence, mtm, residual


def log_evidence(features: np.ndarray, target: np.ndarray, alpha: float, beta: float) -> float:
    """Log marginal likelihood ``log p(y | F, alpha, beta)`` of the Bayesian linear model ``y = F w + noise``,
    ``w ~ N(0, I / alpha)``, ``noise ~ N(0, I / beta)`` (the quantity LogME maximises), for one target column.

    Args:
        features (`np.ndarray`): ``(n, d)`` feature matrix `F`.
        target (`np.ndarray`): ``(n,)`` target `y` (one class's 0/1 indicator in LogME).
        alpha (`float`): prior precision of the weights, > 0.
        beta (`float`): noise precision, > 0.

    Example:

    ```python
    >>> import numpy as np
    >>> from tl_plugin.logme import log_evidence
    >>> round(log_evidence(np.zeros((2, 1)), np.array([1.0, -1.0]), alpha=1.0, beta=1.0), 4)  # N(y; 0, I)
    -2.8379

    ```
    """
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"`alpha` and `beta` must be > 0, got alpha={alpha}, beta={beta}.")
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64).reshape(-1)
    s2, u = _svd_terms(f)
    z = u.T @ y
    outside = float(y @ y - z @ z)
    return _evidence_from_svd(s2, z**2, max(outside, 0.0), f.shape[0], f.shape[1], alpha, beta)[0]


def maximize_evidence(
    features: np.ndarray, target: np.ndarray, max_iter: int = 100, tol: float = 1e-6
) -> tuple[float, float, float]:
    """The `alpha`, `beta` that maximise `log_evidence`, by the fixed-point iteration of evidence maximisation
    (``gamma = sum_i beta s_i^2 / (alpha + beta s_i^2)``, ``alpha = gamma / m^T m``,
    ``beta = (n - gamma) / ||F m - y||^2``), and the maximum log evidence. Returns ``(alpha, beta, evidence)``.

    The iteration starts from several ratios ``alpha / beta`` (`START_RATIOS`, relative to the features' scale) and
    keeps the highest evidence: from a single fixed start, small-scale features can end in the degenerate maximum
    where the weights vanish."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64).reshape(-1)
    s2, u = _svd_terms(f)
    return _fixed_point(s2, u.T @ y, float(y @ y), f.shape[0], f.shape[1], max_iter, tol)


#: Starting ratios alpha / beta of the fixed-point iteration, relative to the features' mean squared singular value
#: (a single start such as alpha = beta = 1 can end in the degenerate maximum "weights ~ 0" on small-scale features).
START_RATIOS = (1e-6, 1e-4, 1e-2, 1.0, 1e2)


def _fixed_point(
    s2: np.ndarray, z: np.ndarray, yty: float, n: int, d: int, max_iter: int, tol: float
) -> tuple[float, float, float]:
    z2 = z**2
    outside = max(yty - float(np.sum(z2)), 0.0)
    beta0 = n / max(yty, 1e-12)
    scale = float(np.mean(s2)) if s2.size else 1.0
    best: tuple[float, float, float] | None = None
    for ratio in START_RATIOS:
        found = _iterate(s2, z2, outside, n, d, beta0 * scale * ratio, beta0, max_iter, tol)
        if best is None or found[2] > best[2]:
            best = found
    assert best is not None
    return best


def _iterate(
    s2: np.ndarray,
    z2: np.ndarray,
    outside: float,
    n: int,
    d: int,
    alpha: float,
    beta: float,
    max_iter: int,
    tol: float,
) -> tuple[float, float, float]:
    """The fixed-point iteration from one start (alpha, beta); returns (alpha, beta, log evidence)."""
    for _ in range(max_iter):
        _, mtm, residual = _evidence_from_svd(s2, z2, outside, n, d, alpha, beta)
        gamma = float(np.sum(beta * s2 / (alpha + beta * s2)))
        new_alpha = min(max(gamma / max(mtm, 1e-300), 1e-12), 1e12)
        new_beta = min(max(n - gamma, 1e-12) / max(residual, 1e-300), 1e12)
        done = abs(new_alpha - alpha) <= tol * alpha and abs(new_beta - beta) <= tol * beta
        alpha, beta = new_alpha, new_beta
        if done:
            break
    return alpha, beta, _evidence_from_svd(s2, z2, outside, n, d, alpha, beta)[0]


def logme(features: np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """LogME of `features` for class `labels`: the maximum log evidence per example of each class's one-hot column,
    averaged over the classes (higher is better; comparable between feature sets for the same labels).

    Example:

    ```python
    >>> import numpy as np
    >>> from tl_plugin.logme import logme
    >>> rng = np.random.default_rng(0)
    >>> labels = np.arange(200) % 2
    >>> informative = np.c_[labels + 0.1 * rng.normal(size=200), rng.normal(size=(200, 3))]
    >>> noise = rng.normal(size=(200, 4))
    >>> logme(informative, labels) > logme(noise, labels)
    True

    ```
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    if f.ndim != 2 or f.shape[0] != y.shape[0]:
        raise ValueError(f"`features` must be (n, d) with n = len(labels) = {y.shape[0]}, got {f.shape}.")
    classes = np.unique(y)
    if classes.size < 2:
        raise ValueError(f"LogME needs at least 2 classes, got {classes.tolist()}.")
    s2, u = _svd_terms(f)
    n, d = f.shape
    total = 0.0
    for c in classes:
        target = (y == c).astype(np.float64)
        total += _fixed_point(s2, u.T @ target, float(target @ target), n, d, 200, 1e-6)[2] / n
    return total / classes.size

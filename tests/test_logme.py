"""LogME (tl_plugin.logme) against the closed form of the Bayesian linear model's evidence.

The reference is computed independently of the SVD formulas under test: the marginal likelihood of
``y = F w + noise`` with ``w ~ N(0, I / alpha)`` and ``noise ~ N(0, I / beta)`` is the Gaussian density
``N(y; 0, I / beta + F F^T / alpha)``, evaluated with scipy.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.stats import multivariate_normal

import tl_plugin.logme as logme_module
import tl_plugin.scan as scan_module
from tl_plugin.logme import _evidence_from_svd, _svd_terms, log_evidence, logme, maximize_evidence


def closed_form(features: np.ndarray, target: np.ndarray, alpha: float, beta: float) -> float:
    n = features.shape[0]
    covariance = np.eye(n) / beta + features @ features.T / alpha
    return float(multivariate_normal(np.zeros(n), covariance).logpdf(target))


def small_case(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, d))
    return features, features @ rng.normal(size=d) + 0.5 * rng.normal(size=n)


@pytest.mark.parametrize(("n", "d"), [(12, 5), (6, 9), (10, 10)])  # more examples than features, fewer, equal
@pytest.mark.parametrize(("alpha", "beta"), [(0.5, 2.0), (3.0, 0.1), (1e-3, 50.0)])
def test_log_evidence_equals_the_gaussian_marginal_likelihood(n, d, alpha, beta):
    features, target = small_case(n, d)
    assert log_evidence(features, target, alpha, beta) == pytest.approx(
        closed_form(features, target, alpha, beta), rel=1e-9, abs=1e-9
    )


def test_rank_deficient_features_match_the_closed_form():
    features, target = small_case(10, 3)
    features = np.c_[features, features[:, :1] * 2.0]  # a repeated direction: rank 3 of 4 columns
    assert log_evidence(features, target, 0.7, 1.3) == pytest.approx(closed_form(features, target, 0.7, 1.3))


@pytest.mark.parametrize(("n", "d"), [(30, 4), (8, 12)])
def test_fixed_point_is_the_maximum_of_the_evidence(n, d):
    features, target = small_case(n, d, seed=1)
    alpha, beta, evidence = maximize_evidence(features, target)
    assert evidence == pytest.approx(closed_form(features, target, alpha, beta))
    # an independent numerical optimiser over log alpha, log beta finds the same maximum
    found = minimize(lambda t: -closed_form(features, target, np.exp(t[0]), np.exp(t[1])), x0=[0.0, 0.0])
    assert evidence == pytest.approx(-found.fun, abs=1e-5)
    # and every nearby (alpha, beta) has less evidence
    for da, db in [(1.2, 1), (1 / 1.2, 1), (1, 1.2), (1, 1 / 1.2), (1.1, 1.1), (0.9, 1.1)]:
        assert closed_form(features, target, alpha * da, beta * db) < evidence


def test_logme_is_the_mean_over_classes_of_the_max_evidence_per_example():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, size=40)
    features = np.c_[np.eye(3)[labels] + 0.3 * rng.normal(size=(40, 3)), rng.normal(size=(40, 2))]
    expected = np.mean([maximize_evidence(features, (labels == c).astype(float))[2] / 40 for c in range(3)])
    assert logme(features, labels) == pytest.approx(expected)


def test_logme_prefers_informative_features_and_ignores_their_scale():
    rng = np.random.default_rng(3)
    labels = np.arange(300) % 3
    informative = np.c_[np.eye(3)[labels] + 0.5 * rng.normal(size=(300, 3)), rng.normal(size=(300, 5))]
    noise = rng.normal(size=(300, 8))
    assert logme(informative, labels) > logme(noise, labels) + 0.1
    assert logme(100.0 * informative, labels) == pytest.approx(logme(informative, labels), abs=1e-6)
    assert logme(0.01 * informative, labels) == pytest.approx(logme(informative, labels), abs=1e-6)


def test_weak_small_scale_features_reach_the_global_maximum_not_the_degenerate_one():
    """Weak signal in small-scale, correlated features (like a frozen encoder's pooled outputs): started from
    alpha = beta = 1 alone, the iteration ends where the weights vanish (alpha ~ 3e3, the evidence of "the features
    explain nothing"); started from several alpha / beta ratios it finds the maximum a dense grid finds."""
    rng = np.random.default_rng(1)
    n, d = 120, 100
    labels = (np.arange(n) % 2).astype(float)
    base = rng.normal(size=(n, 5)) @ rng.normal(size=(5, d)) + 0.3 * rng.normal(size=(n, d))
    features = 0.05 * np.tanh(base + 0.1 * labels[:, None] * rng.normal(size=d))
    alpha, beta, evidence = maximize_evidence(features, labels)
    # the grid evaluates the evidence formula (checked against the closed form above) from one SVD
    s2, u = _svd_terms(features)
    z2 = (u.T @ labels) ** 2
    outside = float(labels @ labels - z2.sum())
    grid = max(
        _evidence_from_svd(s2, z2, outside, n, d, 10.0**a, 10.0**b)[0]
        for a in np.linspace(-4, 4, 33)
        for b in np.linspace(-1, 2, 25)
    )
    assert evidence >= grid - 1e-9
    weights_vanish = log_evidence(features, labels, 1e6, 1 / np.var(labels))
    assert evidence > weights_vanish + 0.05 * n
    assert alpha < 1.0


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 classes"):
        logme(np.ones((5, 2)), [1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"\(n, d\) with n = len\(labels\) = 3"):
        logme(np.ones((5, 2)), [0, 1, 0])
    with pytest.raises(ValueError, match="must be > 0"):
        log_evidence(np.ones((3, 2)), np.ones(3), alpha=0.0, beta=1.0)


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(logme_module, verbose=False)
    assert result.attempted >= 2
    assert result.failed == 0


def test_the_scan_module_reexports_the_same_functions():
    assert (scan_module.logme, scan_module.log_evidence, scan_module.maximize_evidence) == (
        logme,
        log_evidence,
        maximize_evidence,
    )
    assert {"logme", "log_evidence", "maximize_evidence"} <= set(scan_module.__all__)

"""Layer scan: how well each layer's frozen features suit a task, measured before any fine-tuning.

One batched, no-grad pass collects every layer's pooled features (forward hooks on the block stack found by
`tl_plugin.discovery`: the input of the first block, i.e. the embeddings' output, and every block's output). Each
layer gets a held-out **linear probe** accuracy (scikit-learn logistic regression, one fixed stratified split) and
**LogME** (You et al., ICML 2021: the log maximum evidence of a Bayesian linear model of the one-hot labels on the
features, per example, averaged over the classes; alpha and beta by the fixed-point iteration through the SVD of
the features). `recommend` turns the scores into a `TransferConfig` and a learning-rate range (a heuristic, see
``docs/layer-scan.md``). Layer ``k`` (``embeddings`` is 0, ``blocks.i`` is ``i + 1``) is what a transfer with
``freeze_bottom_blocks=k`` feeds into its first trained block. Pooling follows the model's head (`resolve_pooling`);
image feature maps ``(batch, channels, height, width)`` are averaged over positions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import TransferConfig
from .discovery import LayerGroups, discover_layer_groups

__all__ = [
    "POOLINGS", "LayerScan", "LayerScore", "Recommendation", "ScanConfig", "collect_layer_features",
    "log_evidence", "logme", "maximize_evidence", "min_examples_per_class", "probe_accuracy", "recommend",
    "resolve_pooling", "scan_layers"
]  # fmt: skip

#: Pooling choices (``"auto"``: the model's own, see `resolve_pooling`).
POOLINGS = ("auto", "first", "mean", "last", "pooler")

#: `config.model_type` values whose classification head reads the first token (when the model has no pooler).
FIRST_TOKEN_MODEL_TYPES = frozenset(
    {"roberta", "xlm-roberta", "camembert", "distilbert", "electra", "deberta", "deberta-v2", "mpnet", "longformer",
     "vit", "deit", "dinov2", "xlnet", "funnel", "ernie", "big_bird", "esm", "modernbert"}
)  # fmt: skip
#: `config.model_type` values whose classification head reads the last non-padding token.
LAST_TOKEN_MODEL_TYPES = frozenset(
    {"gpt2", "gpt_neo", "gpt_neox", "gptj", "llama", "mistral", "mixtral", "qwen2", "qwen3", "opt", "bloom",
     "falcon", "phi", "phi3", "gemma", "gemma2", "olmo", "stablelm", "starcoder2"}
)  # fmt: skip
#: `config.model_type` values whose classification head averages over positions (audio, some vision models).
MEAN_MODEL_TYPES = frozenset(
    {"wav2vec2", "hubert", "wavlm", "data2vec-audio", "unispeech", "unispeech-sat", "whisper", "beit",
     "data2vec-vision", "swin", "swinv2", "convnext", "convnextv2", "resnet", "efficientnet", "mobilenet_v2",
     "mobilevit", "regnet", "timm_wrapper"}
)  # fmt: skip


@dataclass(frozen=True)
class ScanConfig:
    """How a layer scan scores the features.

    Args:
        pooling (`str`, *optional*, defaults to ``"auto"``): one of `POOLINGS`; ``"auto"`` uses the model's own.
        probe_test_size (`float`, *optional*, defaults to 0.25): the held-out fraction of the linear probe.
        seed (`int`, *optional*, defaults to 0): seed of the probe's split.
        probe_c (`float`, *optional*, defaults to 1.0): inverse L2 strength of the logistic regression.
        probe_max_iter (`int`, *optional*, defaults to 1000): iterations of the logistic regression's solver.
        max_examples (`int`, *optional*): stop collecting features after this many examples (`None`: all).
        layers (`list[str]`, *optional*): the layers to score (``"embeddings"``, ``"blocks.<i>"``, ``"last"`` for
            the last block); `None`: all.
    """

    pooling: str = "auto"
    probe_test_size: float = 0.25
    seed: int = 0
    probe_c: float = 1.0
    probe_max_iter: int = 1000
    max_examples: int | None = None
    layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"`pooling` must be one of {', '.join(POOLINGS)}, got {self.pooling!r}.")
        if not 0 < self.probe_test_size < 1:
            raise ValueError(f"`probe_test_size` must be between 0 and 1 (exclusive), got {self.probe_test_size}.")
        if not self.probe_c > 0:
            raise ValueError(f"`probe_c` must be > 0, got {self.probe_c}.")
        if self.probe_max_iter < 1:
            raise ValueError(f"`probe_max_iter` must be >= 1, got {self.probe_max_iter}.")
        if self.max_examples is not None and self.max_examples < 2:
            raise ValueError(f"`max_examples` must be >= 2, got {self.max_examples}.")
        if self.layers is not None:
            if isinstance(self.layers, str) or not self.layers:
                raise ValueError(f"`layers` must be a non-empty list of layer names, got {self.layers!r}.")
            object.__setattr__(self, "layers", tuple(self.layers))


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
    >>> from tl_plugin.scan import log_evidence
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
    s2: np.ndarray, z2: np.ndarray, outside: float, n: int, d: int, alpha: float, beta: float, max_iter: int,
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
    >>> from tl_plugin.scan import logme
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


def min_examples_per_class(test_size: float) -> int:
    """The fewest examples a class needs for the probe's split: 2 on each side of a `test_size` split."""
    return max(4, math.ceil(2 / min(test_size, 1 - test_size)))


def _check_labels(labels: np.ndarray, test_size: float) -> None:
    values, counts = np.unique(labels, return_counts=True)
    if values.size < 2:
        raise ValueError(
            f"A layer scan needs at least 2 classes in the labels, got only {values.tolist()} "
            f"({labels.size} examples)."
        )
    minimum = min_examples_per_class(test_size)
    few = {str(v): int(c) for v, c in zip(values.tolist(), counts.tolist(), strict=True) if c < minimum}
    if few:
        raise ValueError(
            f"Too few examples for a held-out probe score: every class needs at least {minimum} examples "
            f"(with a held-out fraction of {test_size}), but class(es) {few} have fewer. Give more data or "
            f"change the held-out fraction."
        )


def probe_accuracy(
    features: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    test_size: float = 0.25,
    seed: int = 0,
    c: float = 1.0,
    max_iter: int = 1000,
) -> float:
    """Held-out accuracy of a logistic regression on standardised `features` (one stratified split by `seed`).

    Example:

    ```python
    >>> import numpy as np
    >>> from tl_plugin.scan import probe_accuracy
    >>> labels = np.arange(40) % 2
    >>> probe_accuracy(np.c_[labels, np.zeros(40)], labels)
    1.0

    ```
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(labels).reshape(-1)
    _check_labels(y, test_size)
    x_train, x_test, y_train, y_test = train_test_split(
        np.asarray(features, dtype=np.float64), y, test_size=test_size, random_state=seed, stratify=y
    )
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    probe.fit(x_train, y_train)
    return float(probe.score(x_test, y_test))


def resolve_pooling(model: nn.Module, pooling: str = "auto") -> str | None:
    """The pooling of `model`'s token features: `pooling` itself when not ``"auto"``, else the model's own head's
    (``"pooler"`` when its base model has a pooler with weights; then by ``config.model_type``). `None` when it
    cannot be determined: image feature maps are still pooled (spatial mean), token features then raise."""
    if pooling not in POOLINGS:
        raise ValueError(f"`pooling` must be one of {', '.join(POOLINGS)}, got {pooling!r}.")
    pooler = _pooler(model)
    if pooling == "pooler" and pooler is None:
        raise ValueError(
            f"`pooling='pooler'`: {type(model).__name__} has no pooler with weights; use first, mean or last."
        )
    if pooling != "auto":
        return pooling
    if pooler is not None:
        return "pooler"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for kind, types in (("first", FIRST_TOKEN_MODEL_TYPES), ("last", LAST_TOKEN_MODEL_TYPES), ("mean", MEAN_MODEL_TYPES)):
        if model_type in types:
            return kind
    return None


def _pooler(model: nn.Module) -> nn.Module | None:
    prefix = getattr(model, "base_model_prefix", None)
    base = getattr(model, prefix, None) if prefix else None
    candidate = getattr(base if isinstance(base, nn.Module) else model, "pooler", None)
    if isinstance(candidate, nn.Module) and any(True for _ in candidate.parameters()):
        return candidate
    return None


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    if isinstance(value, Mapping):
        return next((v for v in value.values() if isinstance(v, torch.Tensor)), None)
    hidden = getattr(value, "last_hidden_state", None)
    return hidden if isinstance(hidden, torch.Tensor) else None


class _Pool:
    def __init__(self, model: nn.Module, pooling: str | None) -> None:
        self.pooling = pooling
        self.pooler = _pooler(model) if pooling == "pooler" else None
        self.activation = None
        if self.pooler is not None:
            prefix = getattr(model, "base_model_prefix", "")
            self.activation = getattr(getattr(model, prefix, model), "pooler_activation", None)
        self.mask: torch.Tensor | None = None
        self.model_name = type(model).__name__

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return x
        if x.dim() == 4:  # (batch, channels, height, width): global average pool
            return x.mean(dim=(2, 3))
        if x.dim() != 3:
            raise ValueError(f"Cannot pool features of shape {tuple(x.shape)}; expected 2, 3 or 4 dimensions.")
        mask = self.mask if self.mask is not None and self.mask.shape[:2] == x.shape[:2] else None
        if self.pooling is None:
            raise ValueError(
                f"Cannot determine how {self.model_name} pools its token features for its head; pass the pooling "
                f"(`pooling=` / --pooling): one of first, mean, last, pooler."
            )
        if self.pooling == "first":
            return x[:, 0]
        if self.pooling == "pooler":
            out = self.pooler(x) if self.pooler is not None else x[:, 0]
            if out.dim() == 3:  # a pooler that is a plain projection (ALBERT): the first token, then activation
                out = out[:, 0]
                if self.activation is not None:
                    out = self.activation(out)
            return out
        if self.pooling == "last":
            if mask is None:
                return x[:, -1]
            last = mask.long().sum(dim=1).clamp(min=1) - 1
            return x[torch.arange(x.shape[0], device=x.device), last]
        if mask is None:
            return x.mean(dim=1)
        weights = mask.to(x.dtype).unsqueeze(-1)
        return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _layer_names(groups: LayerGroups) -> list[str]:
    return ["embeddings", *[g.name for g in groups.blocks]]


def collect_layer_features(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    groups: LayerGroups | None = None,
    pooling: str = "auto",
    layers: Sequence[str] | None = None,
    max_examples: int | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled features of every layer in one batched, no-grad pass, and the labels.

    The layers are ``embeddings`` (the input of the first block) and ``blocks.<i>`` (each block's output). Each batch
    is a mapping of model inputs with a ``labels`` entry (what a `DataLoader` with the task's collator yields); the
    labels are taken out before the forward. The model runs in eval mode and is put back in its former mode.

    Returns:
        `tuple[dict[str, np.ndarray], np.ndarray]`: ``{layer: (n, d) float32 features}`` in depth order, and the
        ``(n,)`` labels.
    """
    groups = groups if groups is not None else discover_layer_groups(model)
    names = _layer_names(groups)
    if len(groups.blocks) == 0:
        raise ValueError(f"{type(model).__name__} has no blocks to scan (its groups: {', '.join(groups.names)}).")
    wanted = list(names) if layers is None else [names[-1] if name == "last" else name for name in layers]
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise ValueError(
            f"Unknown layer(s) {unknown}; the layers of this model are: {', '.join(names)} (or last)."
        )
    modules = dict(model.named_modules())
    pool = _Pool(model, resolve_pooling(model, pooling))
    collected: dict[str, list[np.ndarray]] = {name: [] for name in names if name in wanted}

    current: dict[str, np.ndarray] = {}  # this batch's features (a block shared over depths, as in ALBERT,
    # runs several times in one forward: its last output is kept, and the input of its first run)

    def keep(name: str, value: Any) -> None:
        if name in collected:
            tensor = _first_tensor(value)
            if tensor is None:
                raise ValueError(f"Layer {name} gave no tensor to pool ({type(value).__name__}).")
            current[name] = pool(tensor).detach().float().reshape(tensor.shape[0], -1).cpu().numpy()

    first = modules[groups.blocks[0].module_name or ""]

    def before_first(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if "embeddings" not in current:
            keep("embeddings", args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None)))

    handles = [first.register_forward_pre_hook(before_first, with_kwargs=True)]
    for group in groups.blocks:
        block = modules[group.module_name or ""]
        handles.append(block.register_forward_hook(lambda _m, _a, out, name=group.name: keep(name, out)))
    labels: list[np.ndarray] = []
    seen = 0
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                if "labels" not in inputs:
                    raise ValueError("Each batch needs a `labels` entry (one class id per example).")
                batch_labels = torch.as_tensor(inputs.pop("labels"))
                if batch_labels.dim() != 1:
                    raise ValueError(
                        f"A layer scan needs one class id per example; got labels of shape "
                        f"{tuple(batch_labels.shape)} (multi-label or per-token labels are not supported)."
                    )
                mask = inputs.get("attention_mask")
                pool.mask = mask if isinstance(mask, torch.Tensor) else None
                current.clear()
                model(**inputs)
                missing = [name for name in collected if name not in current]
                if missing:
                    raise ValueError(f"The forward pass did not run layer(s) {missing}; check the model's inputs.")
                for name in collected:
                    collected[name].append(current[name])
                labels.append(batch_labels.cpu().numpy())
                seen += batch_labels.shape[0]
                if max_examples is not None and seen >= max_examples:
                    break
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not labels:
        raise ValueError("No batches to scan: the data is empty.")
    n = min(seen, max_examples) if max_examples is not None else seen
    features = {name: np.concatenate(parts)[:n] for name, parts in collected.items()}
    return features, np.concatenate(labels)[:n]


@dataclass
class LayerScore:
    """The scores of one layer (``embeddings`` or ``blocks.<i>``): the ``freeze_bottom_blocks`` (`boundary`) whose
    first trained block reads its features, the held-out linear probe's accuracy and LogME."""

    layer: str
    boundary: int
    probe_accuracy: float
    logme: float


@dataclass
class LayerScan:
    """The result of `scan_layers`: one `LayerScore` per scanned layer (input side first), the model's number of
    blocks, the data scanned (examples, classes, feature size, majority-class accuracy), the pooling, the wall time
    of the forward pass and of the scores, and a name for the model (e.g. its folder)."""

    layers: list[LayerScore]
    num_blocks: int
    num_examples: int
    num_classes: int
    feature_dim: int
    majority_accuracy: float
    pooling: str
    forward_seconds: float
    scoring_seconds: float
    model: str | None = None

    def get(self, layer: str) -> LayerScore:
        for score in self.layers:
            if score.layer == layer:
                return score
        raise KeyError(f"No layer {layer!r} in this scan; it has: {', '.join(s.layer for s in self.layers)}.")

    def table(self) -> str:
        """The scores as a text table (layer, freeze boundary, probe accuracy, LogME)."""
        lines = [f"{'layer':<12} {'boundary':>8} {'probe acc':>9} {'LogME':>9}"]
        lines += [f"{s.layer:<12} {s.boundary:>8} {s.probe_accuracy:>9.4f} {s.logme:>9.4f}" for s in self.layers]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scan_layers(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    groups: LayerGroups | None = None,
    config: ScanConfig | None = None,
    name: str | None = None,
) -> LayerScan:
    """Score every layer of `model` for the labels of `batches`: held-out linear-probe accuracy and LogME.

    Args:
        model (`torch.nn.Module`): the pretrained model (its head is not used).
        batches (iterable of mappings): model inputs with a ``labels`` entry, e.g. a `torch.utils.data.DataLoader`.
        groups (`LayerGroups`, *optional*): the model's layer groups (default: `discover_layer_groups(model)`).
        config (`ScanConfig`, *optional*): pooling, probe split, layers.
        name (`str`, *optional*): a name for the model in tables and plots.

    Returns:
        `LayerScan`

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from tl_plugin.scan import ScanConfig, scan_layers
    >>> _ = torch.manual_seed(0)
    >>> model = BertForSequenceClassification(BertConfig(
    ...     vocab_size=20, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=20))
    >>> labels = torch.arange(40) % 2
    >>> ids = torch.randint(2, 20, (40, 6))
    >>> ids[:, 0] = labels  # the first token (0 or 1) gives the class away
    >>> batches = [{"input_ids": ids[i:i + 20], "labels": labels[i:i + 20]} for i in (0, 20)]
    >>> scan = scan_layers(model, batches, config=ScanConfig(pooling="first"))
    >>> [s.layer for s in scan.layers]
    ['embeddings', 'blocks.0', 'blocks.1']
    >>> scan.get("embeddings").probe_accuracy
    1.0

    ```
    """
    config = config if config is not None else ScanConfig()
    groups = groups if groups is not None else discover_layer_groups(model)
    started = time.perf_counter()
    features, labels = collect_layer_features(
        model, batches, groups, config.pooling, config.layers, config.max_examples
    )
    forward_seconds = time.perf_counter() - started
    _check_labels(labels, config.probe_test_size)
    started = time.perf_counter()
    names = _layer_names(groups)
    scores = [
        LayerScore(
            layer=layer,
            boundary=names.index(layer),
            probe_accuracy=probe_accuracy(
                x, labels, config.probe_test_size, config.seed, config.probe_c, config.probe_max_iter
            ),
            logme=logme(x, labels),
        )
        for layer, x in features.items()
    ]
    _, counts = np.unique(labels, return_counts=True)
    return LayerScan(
        layers=scores,
        num_blocks=len(groups.blocks),
        num_examples=int(labels.size),
        num_classes=int(counts.size),
        feature_dim=int(next(iter(features.values())).shape[1]),
        majority_accuracy=float(counts.max() / counts.sum()),
        pooling=resolve_pooling(model, config.pooling) or "spatial mean",
        forward_seconds=forward_seconds,
        scoring_seconds=time.perf_counter() - started,
        model=name,
    )


#: Learning-rate ranges by the share of blocks trained (a heuristic; see docs/layer-scan.md).
LR_RANGES: tuple[tuple[float, tuple[float, float]], ...] = (
    (1.0, (2e-5, 1e-4)),  # everything trained: small steps keep the pretrained weights
    (0.5, (5e-5, 2e-4)),  # half or more of the blocks trained
    (0.0, (1e-4, 5e-4)),  # a few top blocks trained
)

#: A layer is "as good as the best" when its combined score is within this share of the spread across layers.
PLATEAU_TOLERANCE = 0.1
#: Best probe accuracy at most this far above the majority baseline: the frozen features carry little of the task.
UNINFORMATIVE_MARGIN = 0.05


@dataclass
class Recommendation:
    """What `recommend` suggests: the `TransferConfig`, its boundary (bottom blocks frozen, 0: none), a learning-rate
    range to try or search, the per-layer combined scores the rule used, and the rule's steps in words."""

    transfer: TransferConfig
    boundary: int
    learning_rate_range: tuple[float, float]
    combined_scores: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def save(self, path: str | Path) -> Path:
        """Write the transfer config as YAML for ``tl-plugin train --transfer_config``, the learning-rate range and
        the reasons as comments above it."""
        path = Path(path)
        self.transfer.save(path)
        low, high = self.learning_rate_range
        header = [
            "# Written by tl-plugin scan (a heuristic recommendation; see docs/layer-scan.md).",
            f"# Learning rate: try {low:g} to {high:g} (tl-plugin train --learning_rate).",
            *[f"# {reason}" for reason in self.reasons],
        ]
        path.write_text("\n".join(header) + "\n" + path.read_text())
        return path

    def to_dict(self) -> dict[str, Any]:
        return {
            "transfer_config": self.transfer.to_dict(),
            "boundary": self.boundary,
            "learning_rate_range": list(self.learning_rate_range),
            "combined_scores": self.combined_scores,
            "reasons": self.reasons,
        }


def _scaled(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    return [1.0 for _ in values] if high - low <= 1e-12 else [(v - low) / (high - low) for v in values]


def combined_scores(scan: LayerScan) -> dict[str, float]:
    """Per layer: the mean of the probe accuracy and LogME, each scaled to 0..1 over the scanned layers."""
    probe = _scaled([s.probe_accuracy for s in scan.layers])
    evidence = _scaled([s.logme for s in scan.layers])
    return {s.layer: (p + e) / 2 for s, p, e in zip(scan.layers, probe, evidence, strict=True)}


def recommend(scan: LayerScan) -> Recommendation:
    """A freeze boundary, a strategy and a learning-rate range from a scan (a heuristic, not a guarantee).

    The rule: the boundary is the first layer whose combined score is within `PLATEAU_TOLERANCE` of the spread of
    the best layer (the blocks below it are frozen with the embeddings, the blocks from it up are trained), at most
    ``num_blocks - 1`` so that a block is always trained; boundary 0 means strategy ``full``. When no layer's
    probe beats the majority baseline by `UNINFORMATIVE_MARGIN`, the features carry little of the task: ``full``.
    The learning-rate range grows as fewer blocks are trained (`LR_RANGES`).

    Example:

    ```python
    >>> from tl_plugin.scan import LayerScan, LayerScore, recommend
    >>> scores = [LayerScore(f"blocks.{i - 1}" if i else "embeddings", i, acc, ev)
    ...           for i, (acc, ev) in enumerate([(0.6, -0.7), (0.7, -0.6), (0.8, -0.5), (0.81, -0.5), (0.8, -0.52)])]
    >>> scan = LayerScan(scores, num_blocks=4, num_examples=100, num_classes=2, feature_dim=8,
    ...                  majority_accuracy=0.5, pooling="first", forward_seconds=0.0, scoring_seconds=0.0)
    >>> rec = recommend(scan)
    >>> rec.transfer.strategy, rec.transfer.freeze_bottom_blocks, rec.learning_rate_range
    ('layers', 2, (5e-05, 0.0002))

    ```
    """
    if not scan.layers:
        raise ValueError("The scan has no layers to recommend from.")
    combined = combined_scores(scan)
    best = max(combined.values())
    reasons: list[str] = []
    best_probe = max(s.probe_accuracy for s in scan.layers)
    if best_probe <= scan.majority_accuracy + UNINFORMATIVE_MARGIN:
        boundary = 0
        reasons.append(
            f"No layer's probe ({best_probe:.3f}) beats the majority baseline ({scan.majority_accuracy:.3f}) by "
            f"{UNINFORMATIVE_MARGIN}: the frozen features carry little of the task, so train everything."
        )
    else:
        first = next(s for s in scan.layers if combined[s.layer] >= best - PLATEAU_TOLERANCE)
        boundary = min(first.boundary, scan.num_blocks - 1)
        reasons.append(
            f"{first.layer} is the first layer within {PLATEAU_TOLERANCE} of the best combined score "
            f"(probe and LogME scaled to 0..1 over the layers): the blocks below it are frozen."
        )
        if boundary < first.boundary:
            reasons.append(f"At most {scan.num_blocks - 1} of {scan.num_blocks} blocks frozen: one is always trained.")
    trained_share = (scan.num_blocks - boundary) / scan.num_blocks
    lr_range = next(r for share, r in LR_RANGES if trained_share >= share)
    reasons.append(
        f"{scan.num_blocks - boundary} of {scan.num_blocks} blocks trained: learning rate {lr_range[0]:g} to "
        f"{lr_range[1]:g}."
    )
    transfer = (
        TransferConfig(strategy="full")
        if boundary == 0
        else TransferConfig(strategy="layers", freeze_bottom_blocks=boundary)
    )
    return Recommendation(transfer, boundary, lr_range, combined, reasons)

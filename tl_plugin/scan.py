"""Layer scan: how well each layer's frozen features suit a task, measured before any fine-tuning.

One batched, no-grad pass collects every layer's pooled features (forward hooks on the block stack found by
`tl_plugin.discovery`: the input of the first block, i.e. the embeddings' output, and every block's output). Each
layer gets a held-out **linear probe** accuracy (scikit-learn logistic regression, one fixed stratified split) and
**LogME** (You et al., ICML 2021: the log maximum evidence of a Bayesian linear model of the one-hot labels on the
features; `tl_plugin.logme`, re-exported here). `recommend` turns the scores into a `TransferConfig` and a
learning-rate range (a heuristic, see ``docs/layer-scan.md``). Layer ``k`` (``embeddings`` is 0, ``blocks.i`` is
``i + 1``) is what a transfer with ``freeze_bottom_blocks=k`` feeds into its first trained block. Pooling follows the
model's head (`resolve_pooling`); image feature maps ``(batch, channels, height, width)`` are averaged over
positions.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import TransferConfig
from .discovery import LayerGroups, discover_layer_groups
from .logme import log_evidence, logme, maximize_evidence

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


#: The default memory budget of a scan's collected features (`ScanConfig.max_feature_bytes`): 2 GiB.
DEFAULT_MAX_FEATURE_BYTES = 2 * 1024**3
MIB = 1024**2


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
        max_feature_bytes (`int`, *optional*, defaults to 2 GiB): the memory budget of the collected features
            (float32, every scanned layer). When the data's features would take more, the scan keeps the first
            examples that fit, in the order of the batches, and says so in `LayerScan.notes`; `None`: no budget.
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
    max_feature_bytes: int | None = DEFAULT_MAX_FEATURE_BYTES

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
        if self.max_feature_bytes is not None and not (
            isinstance(self.max_feature_bytes, int) and self.max_feature_bytes >= 1
        ):
            raise ValueError(f"`max_feature_bytes` must be a whole number of bytes >= 1 or None, got {self.max_feature_bytes!r}.")
        if self.layers is not None:
            if isinstance(self.layers, str) or not self.layers:
                raise ValueError(f"`layers` must be a non-empty list of layer names, got {self.layers!r}.")
            object.__setattr__(self, "layers", tuple(self.layers))


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
    max_feature_bytes: int | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled features of every layer in one batched, no-grad pass, and the labels.

    The layers are ``embeddings`` (the input of the first block) and ``blocks.<i>`` (each block's output). Each batch
    is a mapping of model inputs with a ``labels`` entry (what a `DataLoader` with the task's collator yields); the
    labels are taken out before the forward. The model runs in eval mode and is put back in its former mode.

    Args:
        max_examples (`int`, *optional*): stop after this many examples.
        max_feature_bytes (`int`, *optional*): the memory budget of the features (float32, all collected layers):
            after the first batch gives the bytes per example, collection stops at the number of examples that
            fit (the first ones, in the order of `batches`), with a warning (`scan_layers` says it in its result).

    Returns:
        `tuple[dict[str, np.ndarray], np.ndarray]`: ``{layer: (n, d) float32 features}`` in depth order, and the
        ``(n,)`` labels.
    """
    found = _collect(model, batches, groups, pooling, layers, max_examples, max_feature_bytes)
    if found.budget_note is not None:
        warnings.warn(found.budget_note, stacklevel=2)
    return found.features, found.labels


@dataclass
class _Collected:
    """What `_collect` gathered: the features and labels, the bytes per example, the examples the data had (when
    known, after `max_examples`) and the memory-budget note (`None` when the budget did not cut the data)."""

    features: dict[str, np.ndarray]
    labels: np.ndarray
    bytes_per_example: int
    wanted: int | None
    budget_note: str | None


def _count_examples(batches: Iterable[Mapping[str, Any]]) -> int | None:
    """The number of examples in `batches` when it can be known without iterating: a `DataLoader`'s sized data
    set, or a list of batches (their labels counted); `None` for other iterables."""
    dataset = getattr(batches, "dataset", None)
    if dataset is not None:
        try:
            return len(dataset)
        except TypeError:  # an iterable data set
            return None
    if isinstance(batches, Sequence):
        try:
            return sum(len(batch["labels"]) for batch in batches)
        except (KeyError, TypeError):
            return None
    return None


def _size(num_bytes: float) -> str:
    """A number of bytes in the largest binary unit that keeps it >= 1 (``1.5 GiB``, ``12.0 MiB``, ``640 bytes``)."""
    for unit, scale in (("GiB", 1024**3), ("MiB", MIB), ("KiB", 1024)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:,.1f} {unit}"
    return f"{num_bytes:,.0f} bytes"


def _budget_note(
    n: int, wanted: int | None, bytes_per_example: int, budget: int, layers: int, available: int | None
) -> str:
    per_example = f"{bytes_per_example:,} bytes per example over {layers} layer(s)"
    if wanted is None:
        return (
            f"The features reached the memory budget of {_size(budget)} after {n:,} examples ({per_example}): "
            f"collection stopped there, and the data has more."
        )
    which = f"all {wanted:,} examples" if wanted == available else f"the {wanted:,} examples asked for"
    return (
        f"The features of {which} would take {_size(wanted * bytes_per_example)}, more than the memory budget of "
        f"{_size(budget)} ({per_example}): scanned the first {n:,}, in the order of the data."
    )


def _collect(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    groups: LayerGroups | None,
    pooling: str,
    layers: Sequence[str] | None,
    max_examples: int | None,
    max_feature_bytes: int | None,
) -> _Collected:
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
    if max_feature_bytes is not None and max_feature_bytes < 1:
        raise ValueError(f"`max_feature_bytes` must be >= 1 or None, got {max_feature_bytes}.")
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

    available = _count_examples(batches)
    # the examples the scan would take without a budget, when the data's size is known
    target = None if available is None else available if max_examples is None else min(available, max_examples)
    limit, by_budget, cut, bytes_per_example = max_examples, False, False, 0
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
                if limit is not None and seen >= limit:  # only the budget's limit gets here: the data has more
                    cut = True
                    break
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
                if not bytes_per_example:
                    bytes_per_example = 4 * sum(current[name].shape[1] for name in collected)
                    if max_feature_bytes is not None:
                        fits = max_feature_bytes // bytes_per_example
                        if fits < 2:
                            raise ValueError(
                                f"The memory budget of {max_feature_bytes:,} bytes holds the features of "
                                f"{fits} example(s) ({bytes_per_example:,} bytes per example over "
                                f"{len(collected)} layer(s)); a scan needs at least 2: raise the budget or "
                                f"scan fewer layers."
                            )
                        if limit is None or fits < limit:
                            limit, by_budget = fits, True
                size = batch_labels.shape[0]
                take = size if limit is None else min(size, limit - seen)
                cut = cut or (by_budget and take < size)
                for name in collected:
                    collected[name].append(current[name][:take])
                labels.append(batch_labels[:take].cpu().numpy())
                seen += take
                if limit is not None and seen >= limit and (not by_budget or target is not None):
                    cut = cut or (by_budget and target is not None and target > seen)
                    break  # an unknown amount of data: the next batch, if any, tells whether the budget cut it
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not labels:
        raise ValueError("No batches to scan: the data is empty.")
    features = {}
    for name in list(collected):
        features[name] = np.concatenate(collected.pop(name))  # one layer at a time: the parts are freed
    note = None
    if cut and max_feature_bytes is not None:
        note = _budget_note(seen, target, bytes_per_example, max_feature_bytes, len(features), available)
    return _Collected(features, np.concatenate(labels), bytes_per_example, target, note)


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
    of the forward pass and of the scores, and a name for the model (e.g. its folder).

    When the memory budget (`ScanConfig.max_feature_bytes`) cut the data, `subsampled_from` is the number of examples
    the scan would have taken without it (`None` when unknown: an iterable of batches) and `notes` says what
    happened, in a sentence; `feature_bytes` is the memory the collected features took."""

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
    feature_bytes: int = 0
    subsampled: bool = False
    subsampled_from: int | None = None
    notes: list[str] = field(default_factory=list)

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
        config (`ScanConfig`, *optional*): pooling, probe split, layers, the memory budget of the features.
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
    found = _collect(
        model, batches, groups, config.pooling, config.layers, config.max_examples, config.max_feature_bytes
    )
    features, labels = found.features, found.labels
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
        feature_bytes=int(sum(x.nbytes for x in features.values())),
        subsampled=found.budget_note is not None,
        subsampled_from=found.wanted if found.budget_note is not None else None,
        notes=[found.budget_note] if found.budget_note is not None else [],
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

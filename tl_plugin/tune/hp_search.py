"""`transformers.Trainer.hyperparameter_search` (``backend="ray"``) with transfer keys: `TransferModelInit`,
`SearchTrainer`, `ray_hp_space`, `metric_objective`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import Trainer

from ..config import TransferConfig
from .deps import _resolve_model_path
from .space import build_search_space, transfer_config_from_trial
from .trial import _build_model


class TransferModelInit:
    """A picklable ``model_init`` for `Trainer.hyperparameter_search` that applies the sampled transfer config.

    Called with the trial's config (a dict holding ``learning_rate``, ``strategy``, ``freeze_bottom_blocks`` …;
    the keys that are not `TrainingArguments` fields reach ``model_init`` unchanged). It loads ``model_path``
    (seeded, as the Trainer seeds before ``model_init``), applies `transfer_config_from_trial` and remembers the
    config, which `SearchTrainer` reads for the layer-wise LR decay. Called without a trial (when the Trainer is
    built) it applies ``default``.
    """

    def __init__(
        self,
        model_path: str | None = None,
        num_labels: int = 2,
        seed: int = 42,
        default: Mapping[str, Any] | None = None,
    ) -> None:
        self.model_path = model_path
        self.num_labels = num_labels
        self.seed = seed
        self.default = dict(default or {"strategy": "full"})
        self.transfer_config: TransferConfig | None = None
        self.groups: Any = None

    def __call__(self, trial: Mapping[str, Any] | None = None) -> Any:
        from ..discovery import discover_layer_groups
        from ..transfer import apply_transfer

        point = dict(trial) if trial is not None else self.default
        config = transfer_config_from_trial(point, seed=self.seed)
        model = _build_model(_resolve_model_path(self.model_path), self.num_labels, self.seed)
        self.groups = discover_layer_groups(model, blocks=config.blocks, head=config.head)
        apply_transfer(model, config, self.groups)
        self.transfer_config = config
        return model


class SearchTrainer(Trainer):
    """A `Trainer` whose optimizer is tl_plugin's layer-wise AdamW (`tl_plugin.optim.create_optimizer`, every
    parameter, per-group LR decay) for the config of the current trial.

    `Trainer` refuses ``optimizers=`` together with ``model_init`` (a search builds a new model per trial), so the
    optimizer is made here, with the ``lr_decay`` and layer groups of the config that `TransferModelInit` applied
    to this trial's model. (It is a plain `Trainer` subclass rather than a `TransferTrainer` because
    ``hyperparameter_search(backend="ray")`` pickles the trainer, and `TransferTrainer` binds its callbacks
    with weak references, which do not pickle.)
    """

    def hyperparameter_search(self, *args: Any, **kwargs: Any) -> Any:
        # accelerate's process-wide GradientState keeps weak references to the dataloaders of earlier trainings in
        # this process (a notebook, a test session); the Ray backend pickles the trainer, and weak references do
        # not pickle: forget the dead ones.
        state = getattr(self.accelerator, "gradient_state", None)
        refs = getattr(state, "_dataloader_references_ref", None)
        if isinstance(refs, list):
            state._dataloader_references_ref = [r for r in refs if r is None or r() is not None] or [None]  # type: ignore[union-attr]
        return super().hyperparameter_search(*args, **kwargs)

    def create_optimizer(self, model: Any = None) -> Any:
        if self.optimizer is None:
            from ..optim import create_optimizer

            init = self.model_init
            config = getattr(init, "transfer_config", None)
            target = model if model is not None else self.model
            assert target is not None, "the Trainer has no model yet"
            self.optimizer = create_optimizer(
                target,
                self.args,
                lr_decay=config.lr_decay if config is not None else None,
                groups=getattr(init, "groups", None),
            )
        return self.optimizer


def ray_hp_space(trial: Any = None, *, num_blocks: int, **kwargs: Any) -> dict[str, Any]:
    """``hp_space`` for ``Trainer.hyperparameter_search(backend="ray")``: `build_search_space` (use a partial)."""
    return build_search_space(num_blocks, **kwargs)


def metric_objective(metrics: Mapping[str, float], metric: str = "eval_accuracy") -> float:
    """``compute_objective`` for ``Trainer.hyperparameter_search``: one eval metric (use a partial)."""
    return float(metrics[metric])

"""`TransferCallback`: apply a `TransferConfig` (full / partial / layers) to the Trainer's model at the right moment."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import TransferConfig
from ..schedule import TransferPlan
from .phases import PhasedCallback

__all__ = ["TransferCallback"]


class TransferCallback(PhasedCallback):
    """Apply a transfer strategy to the Trainer's model: re-initialise what it says, freeze the rest of what is not
    trained, and log the trainable-parameter report (through `Trainer.log` when bound, on the main process).

    When. The config is applied in ``on_init_end`` (at the end of ``Trainer(...)``): before the Trainer builds its
    optimizer (which keeps only the trainable parameters) and before a DDP wrap, and before a checkpoint is loaded
    on resume (so re-initialised weights are then replaced by the checkpoint's). Added later (``add_callback``), it
    applies the config in ``on_train_begin`` instead, and then never re-initialises a resumed model. The report is
    logged at ``on_train_begin``, once the loggers (TensorBoard, W&B, ...) are set up.

    With ``config.lr_decay`` set, it also makes the Trainer train with the layer-wise optimizer of
    `tl_plugin.optim` (see `LayerwiseLRDecayCallback` for how, bound or not). It is the phase engine
    (`PhasedCallback`) running a one-phase `tl_plugin.schedule.TransferPlan`.

    Args:
        config (`TransferConfig` or `dict`): the strategy.

    Example:

    ```python
    >>> import tempfile, torch
    >>> from transformers import (
    ...     BertConfig, BertForSequenceClassification, PrinterCallback, Trainer, TrainingArguments
    ... )
    >>> from tl_plugin import TransferConfig
    >>> from tl_plugin.callbacks import TransferCallback
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    ... )
    >>> data = [{"input_ids": torch.randint(5, 99, (8,)), "labels": i % 2} for i in range(16)]
    >>> callback = TransferCallback(TransferConfig(strategy="layers", freeze_bottom_blocks="half"))
    >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=8, use_cpu=True,
    ...                          report_to=[], save_strategy="no", disable_tqdm=True)
    >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    >>> trainer.remove_callback(PrinterCallback)  # no log lines in this example
    >>> model.bert.embeddings.word_embeddings.weight.requires_grad  # frozen before the optimizer is built
    False
    >>> _ = trainer.train()
    >>> callback.trainable_groups()
    ['blocks.2', 'blocks.3', 'other', 'head']
    >>> callback.events[0]["tl/trainable_percent"] < 100
    True

    ```
    """

    builder: TransferPlan

    def __init__(self, config: TransferConfig | Mapping[str, Any]) -> None:
        super().__init__(TransferPlan(config))

    @property
    def config(self) -> TransferConfig:
        """The transfer config."""
        return self.builder.config

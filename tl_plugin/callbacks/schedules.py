"""The freeze-schedule callbacks: `FreezeScheduleCallback` (an explicit multi-phase schedule, e.g. from YAML),
`GradualUnfreezingCallback` (ULMFiT) and `LinearProbeThenFineTuneCallback` (LP-FT).

Each is a thin constructor: it builds a schedule builder (`tl_plugin.schedule`) from its arguments and hands it to
the one phase engine, `tl_plugin.callbacks.phases.PhasedCallback`, which runs it (see that module for how the
schedules stay correct with the optimizer, the LR scheduler, resume and DDP). The schedule format (`Phase`,
`Plateau`, `FreezeSchedule`) is re-exported here, where it used to live.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..config import TransferConfig
from ..schedule import (
    FixedSchedule,
    FreezeSchedule,
    GradualUnfreezing,
    LinearProbeThenFineTune,
    Phase,
    Plateau,
)
from .phases import SCHEDULE_STATE_FILE, PhasedCallback

__all__ = [
    "SCHEDULE_STATE_FILE",
    "FreezeSchedule",
    "FreezeScheduleCallback",
    "GradualUnfreezingCallback",
    "LinearProbeThenFineTuneCallback",
    "Phase",
    "Plateau",
]


class FreezeScheduleCallback(PhasedCallback):
    """Train an explicit multi-phase freeze schedule: in each phase, only the given layer groups are trained, until
    a step, an epoch, or a plateau of an evaluation metric, optionally at their own lr or with an LR warm restart.

    Like the finetuning-scheduler package for Lightning, but for the HF `Trainer`; see `FreezeSchedule` for the
    YAML format and `tl_plugin.callbacks.phases` for how it stays correct with the optimizer, the scheduler and
    resume. It is the phase engine (`PhasedCallback`) running a `tl_plugin.schedule.FixedSchedule`.

    Args:
        schedule (`FreezeSchedule`, `dict`, or a path to a YAML file): the schedule.
        restore_best (`str`, *optional*), restore_best_mode (`str`, *optional*, defaults to ``"min"``): when a
            phase ends, reload its best evaluation's weights by this metric first (see `PhasedCallback`).

    Example:

    ```python
    >>> import tempfile, torch
    >>> from transformers import (
    ...     BertConfig, BertForSequenceClassification, PrinterCallback, Trainer, TrainingArguments
    ... )
    >>> from tl_plugin.callbacks import FreezeScheduleCallback
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    ... )
    >>> data = [{"input_ids": torch.randint(5, 99, (8,)), "labels": i % 2} for i in range(16)]
    >>> callback = FreezeScheduleCallback({"phases": [
    ...     {"train": ["head"], "until_step": 2},
    ...     {"train": ["head", "other", "blocks.1"], "until_step": 4},
    ...     {"train": ["all"]},
    ... ]})
    >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=6, per_device_train_batch_size=8, use_cpu=True,
    ...                          report_to=[], save_strategy="no", disable_tqdm=True)
    >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    >>> trainer.remove_callback(PrinterCallback)  # no log lines in this example
    >>> _ = trainer.train()
    >>> [(e["step"], e["tl/phase"]) for e in callback.events if "tl/phase" in e]
    [(0, 0.0), (2, 1.0), (4, 2.0)]
    >>> callback.trainable_groups(1)
    ['blocks.1', 'other', 'head']

    ```
    """

    def __init__(
        self,
        schedule: FreezeSchedule | Mapping[str, Any] | str | os.PathLike[str],
        *,
        restore_best: str | None = None,
        restore_best_mode: str = "min",
    ) -> None:
        builder = FixedSchedule(schedule)
        super().__init__(builder, restore_best=restore_best, restore_best_mode=restore_best_mode)
        self.schedule = builder.schedule


class GradualUnfreezingCallback(PhasedCallback):
    """Gradual unfreezing (ULMFiT): train the head first, then unfreeze the next group(s) down every n epochs (or
    steps), until everything (or `max_groups` groups) is trained.

    The groups are unfrozen top-down, from the head: ``head``, ``other``, ``blocks.N-1``, ..., ``blocks.0``,
    ``embeddings`` (PEFT adapters are left as they are). The schedule is a rule (`every_n_epochs` /
    `every_n_steps`) or a list of boundaries (`epochs` / `steps`); give one of the four (default: every epoch).
    It is the phase engine (`PhasedCallback`) running a `tl_plugin.schedule.GradualUnfreezing` builder;
    :meth:`export_schedule` writes its phases for a model as a `FreezeScheduleCallback` YAML file.

    Args:
        every_n_epochs (`float`, *optional*): unfreeze the next groups every this many epochs (boundaries past the
            end of training are simply not reached).
        every_n_steps (`int`, *optional*): unfreeze the next groups every this many optimizer steps.
        epochs (`list[float]`, *optional*): explicit boundaries, in epochs from the start of training: the ``i``-th
            entry is when phase ``i + 1`` starts (e.g. ``[1, 2, 4]``). Each must be before the end of training.
        steps (`list[int]`, *optional*): explicit boundaries in optimizer steps.
        groups_per_phase (`int`, *optional*, defaults to 1): groups unfrozen at a time (and trained at the start).
        max_groups (`int`, *optional*): unfreeze at most this many groups in all (e.g. keep the embeddings frozen).
        blocks (`str` or `list[str]`, *optional*): block-stack override for layer discovery.
        head (`list[str]`, *optional*): head override for layer discovery.
        restore_best (`str`, *optional*), restore_best_mode (`str`, *optional*, defaults to ``"min"``): when a
            phase ends, reload its best evaluation's weights by this metric first (see `PhasedCallback`).

    Example:

    ```python
    >>> import tempfile, torch
    >>> from transformers import (
    ...     BertConfig, BertForSequenceClassification, PrinterCallback, Trainer, TrainingArguments
    ... )
    >>> from tl_plugin.callbacks import GradualUnfreezingCallback
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    ... )
    >>> data = [{"input_ids": torch.randint(5, 99, (8,)), "labels": i % 2} for i in range(16)]
    >>> callback = GradualUnfreezingCallback(every_n_epochs=1)  # 2 steps per epoch here
    >>> args = TrainingArguments(tempfile.mkdtemp(), num_train_epochs=3, per_device_train_batch_size=8,
    ...                          use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    >>> trainer.remove_callback(PrinterCallback)  # no log lines in this example
    >>> _ = trainer.train()
    >>> [(e["step"], callback.trainable_groups(int(e["tl/phase"]))) for e in callback.events if "tl/phase" in e]
    [(0, ['head']), (2, ['other', 'head']), (4, ['blocks.1', 'other', 'head'])]
    >>> model.bert.encoder.layer[0].attention.self.query.weight.requires_grad  # not reached in 3 epochs
    False

    ```
    """

    builder: GradualUnfreezing

    def __init__(
        self,
        every_n_epochs: float | None = None,
        every_n_steps: int | None = None,
        *,
        epochs: Sequence[float] | None = None,
        steps: Sequence[int] | None = None,
        groups_per_phase: int = 1,
        max_groups: int | None = None,
        blocks: str | list[str] | None = None,
        head: list[str] | None = None,
        restore_best: str | None = None,
        restore_best_mode: str = "min",
    ) -> None:
        super().__init__(
            GradualUnfreezing(
                every_n_epochs,
                every_n_steps,
                epochs=epochs,
                steps=steps,
                groups_per_phase=groups_per_phase,
                max_groups=max_groups,
                blocks=blocks,
                head=head,
            ),
            restore_best=restore_best,
            restore_best_mode=restore_best_mode,
        )

    @property
    def unit(self) -> str:
        """``"step"`` or ``"epoch"``: the unit of the boundaries."""
        return self.builder.unit


class LinearProbeThenFineTuneCallback(PhasedCallback):
    """Linear probe, then fine-tune (LP-FT): train only the head for the first `probe_steps` / `probe_epochs` (or
    until an evaluation metric plateaus), then train what `then` says, optionally with an LR warm restart. It is
    the phase engine (`PhasedCallback`) running a `tl_plugin.schedule.LinearProbeThenFineTune` builder;
    :meth:`export_schedule` writes its phases for a model as a `FreezeScheduleCallback` YAML file.

    Args:
        probe_steps (`int`, *optional*): length of the probe, in optimizer steps.
        probe_epochs (`float`, *optional*): length of the probe, in epochs (exclusive with `probe_steps`).
        plateau (`Plateau` or `dict`, *optional*): end the probe when this metric stops improving (at the latest
            after `probe_steps` / `probe_epochs` when given). One of the three is required.
        then (`TransferConfig`, `dict` or `list[str]`, *optional*): what to train after the probe: a transfer config
            (its trainable groups; a ``partial`` config re-initialises its blocks before training starts), or
            selectors; default: everything.
        probe (`list[str]`, *optional*, defaults to ``["head"]``): what the probe trains.
        probe_lr (`float`, *optional*): the base lr during the probe (default: ``learning_rate``).
        warm_restart (`bool`, *optional*, defaults to `False`): restart the LR schedule (warmup and decay over the
            remaining steps) at the switch.
        restart_warmup_steps (`int`, *optional*): warmup of the restarted schedule (default: the args' warmup).
        blocks (`str` or `list[str]`, *optional*): block-stack override for layer discovery.
        head (`list[str]`, *optional*): head override for layer discovery.
        restore_best (`str`, *optional*), restore_best_mode (`str`, *optional*, defaults to ``"min"``): when a
            phase ends, reload its best evaluation's weights by this metric first (see `PhasedCallback`).

    Example:

    ```python
    >>> import tempfile, torch
    >>> from transformers import (
    ...     BertConfig, BertForSequenceClassification, PrinterCallback, Trainer, TrainingArguments
    ... )
    >>> from tl_plugin.callbacks import LinearProbeThenFineTuneCallback
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    ... )
    >>> data = [{"input_ids": torch.randint(5, 99, (8,)), "labels": i % 2} for i in range(16)]
    >>> callback = LinearProbeThenFineTuneCallback(probe_steps=3, warm_restart=True, restart_warmup_steps=2)
    >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=8, learning_rate=1e-3, per_device_train_batch_size=8,
    ...                          logging_steps=1, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    >>> trainer.remove_callback(PrinterCallback)  # no log lines in this example
    >>> _ = trainer.train()
    >>> callback.trainable_groups(0), callback.trainable_groups(1)
    (['head'], ['embeddings', 'blocks.0', 'blocks.1', 'other', 'head'])
    >>> # linear decay over 8 steps; at step 3 a restart: 2 warmup steps, then linear decay over the 5 left
    >>> [round(e["learning_rate"] * 1e4, 2) for e in trainer.state.log_history if "learning_rate" in e]
    [10.0, 8.75, 7.5, 0.0, 5.0, 10.0, 6.67, 3.33]

    ```
    """

    builder: LinearProbeThenFineTune

    def __init__(
        self,
        probe_steps: int | None = None,
        probe_epochs: float | None = None,
        plateau: Plateau | Mapping[str, Any] | None = None,
        then: TransferConfig | Mapping[str, Any] | Sequence[str] | None = None,
        probe: Sequence[str] = ("head",),
        probe_lr: float | None = None,
        warm_restart: bool = False,
        restart_warmup_steps: int | None = None,
        blocks: str | list[str] | None = None,
        head: list[str] | None = None,
        *,
        restore_best: str | None = None,
        restore_best_mode: str = "min",
    ) -> None:
        super().__init__(
            LinearProbeThenFineTune(
                probe_steps,
                probe_epochs,
                plateau,
                then,
                probe,
                probe_lr,
                warm_restart,
                restart_warmup_steps,
                blocks,
                head,
            ),
            restore_best=restore_best,
            restore_best_mode=restore_best_mode,
        )

    @property
    def then(self) -> TransferConfig | list[str] | None:
        """What is trained after the probe."""
        return self.builder.then

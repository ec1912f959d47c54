"""`tl_plugin.distributed.check_ddp_will_wrap` in one process: the launcher's environment and the process group are
faked (``WORLD_SIZE`` and `torch.distributed`), the `TrainingArguments` are real (their devices set up before the
fake, as a single process). The real 2-process runs are in tests/test_distributed.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import RandomTokens
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.training_args import ParallelMode

from tl_plugin.callbacks import GradualUnfreezingCallback, LayerwiseLRDecayCallback, TransferCallback
from tl_plugin.callbacks.base import TLCallback, require_find_unused_parameters
from tl_plugin.config import TransferConfig
from tl_plugin.distributed import (
    WORLD_SIZE_ENV_VARS,
    DistributedSetupError,
    check_ddp_will_wrap,
    is_distributed,
    launched_world_size,
)


@pytest.fixture(autouse=True)
def _single_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in WORLD_SIZE_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def cpu_args(tmp_path: Path, **kwargs: object) -> TrainingArguments:
    args = TrainingArguments(
        str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=1, save_strategy="no", disable_tqdm=True,
        **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    assert args.parallel_mode == ParallelMode.NOT_PARALLEL  # devices set up now, as one process
    return args


def tiny_bert() -> BertForSequenceClassification:
    return BertForSequenceClassification(
        BertConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, vocab_size=99
        )
    )


class FakeGroup:
    """`torch.distributed` as a launched process would see it: an initialised group of `size` processes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
        monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: size)


class DistributedArgs:
    """What `TrainingArguments` of a real DDP run say (the fields the checks read)."""

    parallel_mode = ParallelMode.DISTRIBUTED
    ddp_find_unused_parameters = True
    use_cpu = True
    ddp_backend = "gloo"


def test_a_single_process_passes_without_setting_up_devices():
    class Untouchable:
        @property
        def parallel_mode(self) -> None:
            raise AssertionError("read parallel_mode in a single process")

    assert launched_world_size() == 1
    check_ddp_will_wrap(Untouchable(), "test")


@pytest.mark.parametrize("variable", WORLD_SIZE_ENV_VARS)
def test_a_launcher_world_size_without_ddp_is_refused_naming_size_mode_and_fix(
    variable: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    args = cpu_args(tmp_path)
    monkeypatch.setattr(
        args, "use_cpu", False
    )  # as launched: use_cpu not set (the devices are set up already)
    monkeypatch.setenv(variable, "2")
    assert launched_world_size() == 2
    with pytest.raises(DistributedSetupError) as raised:
        check_ddp_will_wrap(args, "my_script.py")
    message = str(raised.value)
    assert message.startswith("my_script.py: 2 processes were launched")
    assert "TrainingArguments.parallel_mode is ParallelMode.NOT_PARALLEL" in message
    assert "will not wrap the model in DistributedDataParallel" in message
    assert "use_cpu=False" in message
    assert "--use_cpu true" in message
    assert "ACCELERATE_USE_CPU=true" in message
    assert isinstance(raised.value, RuntimeError)


def test_a_process_group_without_ddp_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    args = cpu_args(tmp_path)
    FakeGroup(monkeypatch, 4)
    assert launched_world_size() == 4
    with pytest.raises(DistributedSetupError, match=r"^who: 4 processes were launched"):
        check_ddp_will_wrap(args, "who")


def test_world_size_one_and_garbage_values_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    args = cpu_args(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("PMI_SIZE", "")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "two")
    check_ddp_will_wrap(args, "who")
    FakeGroup(monkeypatch, 1)
    check_ddp_will_wrap(args, "who")


@pytest.mark.parametrize(
    ("mode", "refused"),
    [
        (ParallelMode.NOT_PARALLEL, True),
        (ParallelMode.NOT_DISTRIBUTED, True),  # DataParallel in each of several processes
        (ParallelMode.DISTRIBUTED, False),  # DDP (also FSDP, DeepSpeed)
        (ParallelMode.TPU, False),  # parallel without DDP, on purpose
        (ParallelMode.SAGEMAKER_DATA_PARALLEL, False),
    ],
)
def test_only_the_modes_without_a_wrap_are_refused(mode: ParallelMode, refused: bool, monkeypatch):
    class Args(DistributedArgs):
        parallel_mode = mode

    monkeypatch.setenv("WORLD_SIZE", "2")
    if refused:
        with pytest.raises(DistributedSetupError, match=f"ParallelMode.{mode.value.upper()}"):
            check_ddp_will_wrap(Args(), "who")
    else:
        check_ddp_will_wrap(Args(), "who")
    assert is_distributed(Args()) is (mode == ParallelMode.DISTRIBUTED)


def test_real_cpu_ddp_arguments_pass(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_ddp_will_wrap(DistributedArgs(), "who")
    assert is_distributed(DistributedArgs())


def test_find_unused_parameters_guard_refuses_a_run_without_ddp_first(monkeypatch: pytest.MonkeyPatch):
    """Before, a multi-process run without DDP passed this guard (it only looked at parallel_mode)."""

    class NotWrapped(DistributedArgs):
        parallel_mode = ParallelMode.NOT_PARALLEL
        ddp_find_unused_parameters = None

    require_find_unused_parameters(NotWrapped(), "GradualUnfreezingCallback")  # one process: nothing to guard
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedSetupError, match="^GradualUnfreezingCallback: 2 processes"):
        require_find_unused_parameters(NotWrapped(), "GradualUnfreezingCallback")


# --------------------------------------------------------------------------- where the check is called
CALLBACKS = [
    lambda: TransferCallback(TransferConfig(strategy="layers", freeze_bottom_blocks=2)),
    lambda: GradualUnfreezingCallback(every_n_epochs=1),
    lambda: LayerwiseLRDecayCallback(0.7),
]


@pytest.mark.parametrize("make", CALLBACKS, ids=["TransferCallback", "GradualUnfreezingCallback", "LLRD"])
def test_callbacks_refuse_at_trainer_construction(make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    args = cpu_args(tmp_path, ddp_find_unused_parameters=True)
    callback = make()
    FakeGroup(monkeypatch, 2)
    with pytest.raises(DistributedSetupError, match=f"^{type(callback).__name__}: 2 processes"):
        Trainer(model=tiny_bert(), args=args, train_dataset=RandomTokens(), callbacks=[callback])


@pytest.mark.parametrize("make", CALLBACKS, ids=["TransferCallback", "GradualUnfreezingCallback", "LLRD"])
def test_callbacks_refuse_at_train_begin_before_the_first_step(
    make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A callback added after `Trainer(...)` never sees ``on_init_end``: ``on_train_begin`` refuses."""
    callback = make()
    state = TrainerState()
    FakeGroup(monkeypatch, 2)

    class NotWrapped(DistributedArgs):
        parallel_mode = ParallelMode.NOT_PARALLEL

    with pytest.raises(DistributedSetupError, match=f"^{type(callback).__name__}: 2 processes"):
        callback.on_train_begin(NotWrapped(), state, TrainerControl(), model=tiny_bert())  # type: ignore[arg-type]
    assert state.global_step == 0


def test_every_tl_callback_event_that_runs_before_the_first_step_checks():
    """`TLCallback.__init_subclass__` wraps the overrides of ``on_init_end`` and ``on_train_begin``."""
    import tl_plugin.cache  # noqa: F401 - defines ActivationCacheCallback
    import tl_plugin.callbacks  # noqa: F401

    def subclasses(cls: type) -> list[type]:
        return [c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))]

    found = subclasses(TLCallback)
    assert len(found) >= 8, found
    for cls in found:
        for event in ("on_init_end", "on_train_begin"):
            method = getattr(cls, event)
            assert method is getattr(TLCallback, event) or getattr(method, "_tl_checks_ddp", False), (
                cls,
                event,
            )


def test_a_plain_subclass_checks_once_and_still_runs_its_handler(monkeypatch: pytest.MonkeyPatch):
    calls: list[str] = []

    class Mine(TLCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            calls.append("mine")

    class NotWrapped(DistributedArgs):
        parallel_mode = ParallelMode.NOT_PARALLEL

    Mine().on_train_begin(NotWrapped(), TrainerState(), TrainerControl())  # type: ignore[arg-type]
    assert calls == ["mine"]
    assert Mine.on_train_begin.__name__ == "on_train_begin"
    FakeGroup(monkeypatch, 2)
    with pytest.raises(DistributedSetupError, match="^Mine: 2 processes"):
        Mine().on_train_begin(NotWrapped(), TrainerState(), TrainerControl())  # type: ignore[arg-type]
    assert calls == ["mine"]


def test_transfer_trainer_refuses_in_its_constructor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from tl_plugin.trainer import TransferTrainer

    args = cpu_args(tmp_path)
    TransferTrainer(model=tiny_bert(), args=args, train_dataset=RandomTokens())  # one process: fine
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedSetupError, match="^TransferTrainer: 2 processes"):
        TransferTrainer(model=tiny_bert(), args=args, train_dataset=RandomTokens())


def test_a_plain_trainer_without_tl_callbacks_is_not_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The check lives in tl_plugin's objects (and in `tl-plugin train`): a plain Trainer is not patched."""
    args = cpu_args(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    Trainer(model=tiny_bert(), args=args, train_dataset=RandomTokens())


def test_the_module_docstring_examples_run():
    import doctest

    import tl_plugin.distributed

    result = doctest.testmod(tl_plugin.distributed, verbose=False, report=True)
    assert result.attempted > 0
    assert result.failed == 0


# ------------------------------------------------------------------------------------------------- the recipe
def _recipe() -> object:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "recipes" / "accelerate_finetune.py"
    spec = importlib.util.spec_from_file_location("accelerate_finetune", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_recipe_makes_cpu_runs_ddp_unless_told_otherwise():
    cpu_defaults = _recipe().cpu_defaults  # type: ignore[attr-defined]
    assert cpu_defaults(["--quick"], cuda_available=False) == [
        "--quick", "--use_cpu", "true", "--ddp_backend", "gloo",
    ]  # fmt: skip
    assert cpu_defaults(["--quick"], cuda_available=True) == ["--quick"]  # GPUs: NCCL, as Accelerate picks
    assert cpu_defaults(["--use_cpu", "false", "--ddp_backend=mpi"], cuda_available=False) == [
        "--use_cpu", "false", "--ddp_backend=mpi",
    ]  # fmt: skip
    assert cpu_defaults(["--use_cpu=true"], cuda_available=False) == [
        "--use_cpu=true",
        "--ddp_backend",
        "gloo",
    ]

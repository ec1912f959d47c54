"""Several machines, tested on one: two launcher node groups on 127.0.0.1, one CPU process each, DDP over gloo.

A multi-node launch starts the same launcher on every machine; the launchers meet at a rendezvous on machine 0 and
each starts its own processes. Here the two "machines" are two launchers on this machine, each in its own folder
(its own copy of the data, its own output folder), meeting over loopback:

- the torchrun command of docs/distributed.md (``--nnodes 2``, ``c10d`` rendezvous, the same command for both
  node groups) running ``tl-plugin train --lr_decay 0.8``, and the same launcher running
  ``tests/distributed_worker.py`` (scenario ``gradual_llrd``: `GradualUnfreezingCallback` plus
  `LayerwiseLRDecayCallback`), whose rank files prove DDP directly: the model each rank trained was a
  `DistributedDataParallel`, the ranks got different batches, each node group ran one process, and the final
  weights are bit-identical;
- the accelerate command of the page: ``recipes/accelerate/multi_node.yaml`` (a static rendezvous) with the flags
  that make it a 2-process CPU launch (``--num_processes 2 --mixed_precision no``) and ``--machine_rank 0|1``.

The commands are read from the page (the block after `MARKER`), not copied here: ``MAIN_IP`` becomes 127.0.0.1,
the port 29500 a free port, and a tiny BERT is added to the ``tl-plugin train`` options. Both node groups are
started with ``start_new_session``; when one has not finished by the deadline, both launchers and every process
under them are killed by PID, and the test fails with their output.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
DOC = ROOT / "docs" / "distributed.md"
DOC_PAGES = (DOC, ROOT / "README.md")
#: The block of docs/distributed.md that follows this line holds the multi-node commands this file runs.
MARKER = "<!-- multi-node commands: run by tests/test_multi_node.py -->"
EXIT_ABORT = "terminate called without an active exception"  # see tests/test_distributed.py
DDP_CLASS = "torch.nn.parallel.distributed.DistributedDataParallel"
NODE_TIMEOUT_S = 420  # both node groups together; a tiny run takes ~30 s on 2 idle cores
#: Added to the documented ``tl-plugin train`` options: the tiny model, and a run of a few seconds.
TINY_RUN = ["--num_train_epochs", "2", "--per_device_train_batch_size", "4", "--save_strategy", "no",
            "--disable_tqdm", "true", "--max_length", "16", "--learning_rate", "1e-3"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launch_lines(text: str) -> list[str]:
    """The ``accelerate launch`` / ``torchrun`` lines of every fenced block of `text` (continuations joined)."""
    lines = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(line.split()).removeprefix(".venv/bin/")
            if line.startswith(("accelerate launch", "torchrun")):
                lines.append(line)
    return lines


def documented_multi_node_commands() -> dict[str, str]:
    """The multi-node block of docs/distributed.md: ``{"torchrun": ..., "accelerate": ...}``."""
    text = DOC.read_text()
    assert MARKER in text, f"{DOC.name} lost its multi-node block marker"
    block = re.search(r"^```[^\n]*\n.*?^```", text[text.index(MARKER) :], re.S | re.M)
    assert block is not None
    lines = _launch_lines(block.group(0))
    commands = {("torchrun" if line.startswith("torchrun") else "accelerate"): line for line in lines}
    assert len(lines) == 2, lines
    assert commands.keys() == {"torchrun", "accelerate"}, lines
    return commands


def node_command(documented: str, *, port: int, machine_rank: int) -> list[str]:
    """A documented command as one "machine" runs it here: this venv's launcher, 127.0.0.1 and a free port."""
    words = shlex.split(documented.replace("MAIN_IP", "127.0.0.1").replace("29500", str(port)))
    if words[0] == "torchrun":
        launcher, words = [sys.executable, "-m", "torch.distributed.run"], words[1:]
    else:
        launcher, words = [sys.executable, "-m", "accelerate.commands.launch"], words[2:]
    if "--config_file" in words:  # a path in the repository (the node groups run in their own folders)
        at = words.index("--config_file") + 1
        words[at] = str(ROOT / words[at])
    if "--machine_rank" in words:
        words[words.index("--machine_rank") + 1] = str(machine_rank)
    return [*launcher, *words]


def launcher_part(command: list[str]) -> list[str]:
    """`command` up to its program (``-m module`` or a script)."""
    return command[: command.index("-m", 3)]


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def run_node_groups(
    commands: list[list[str]], folders: list[Path], timeout: float = NODE_TIMEOUT_S
) -> list[str]:
    """Start one launcher per "machine" (machine 0 first), each in its own folder; wait for both; their output.

    A launcher still running at the deadline is killed with everything it started (torch's elastic agent starts
    its workers in sessions of their own, so they are found through psutil and killed by PID too).
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    logs = [folder / "launcher.log" for folder in folders]
    hung = []
    try:
        for command, folder, log in zip(commands, folders, logs, strict=True):
            with open(log, "wb") as handle:
                procs.append(subprocess.Popen(command, cwd=folder, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                              start_new_session=True))  # fmt: skip
            time.sleep(0.5)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
            except subprocess.TimeoutExpired:
                hung.append(proc.pid)
    finally:
        for proc in procs:
            if proc.poll() is None:
                for pid in [*_descendants(proc.pid), proc.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait(timeout=30)
    outputs = [log.read_text(errors="replace") for log in logs]
    assert not hung, f"node group(s) {hung} still running after {timeout:.0f} s, killed:\n" + "\n".join(
        f"--- node {rank}:\n{out[-3000:]}" for rank, out in enumerate(outputs)
    )
    for rank, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        if proc.returncode != 0:  # only the known gloo abort at interpreter exit, never a Python error
            assert EXIT_ABORT in output, f"node {rank} exited {proc.returncode}:\n{output[-4000:]}"
            assert "Traceback" not in output, f"node {rank} exited {proc.returncode}:\n{output[-4000:]}"
    return outputs


def _node_folders(tmp_path: Path) -> list[Path]:
    folders = [tmp_path / f"node{rank}" for rank in (0, 1)]
    for folder in folders:
        folder.mkdir()
    return folders


# ------------------------------------------------------------------------------------------- the page
def test_the_page_shows_one_torchrun_and_one_accelerate_multi_node_command():
    commands = documented_multi_node_commands()
    torchrun = shlex.split(commands["torchrun"])
    for flag, value in [("--nnodes", "2"), ("--nproc_per_node", "1"), ("--rdzv_backend", "c10d"),
                        ("--rdzv_endpoint", "MAIN_IP:29500")]:  # fmt: skip
        assert torchrun[torchrun.index(flag) + 1] == value, (flag, commands["torchrun"])
    accelerate = shlex.split(commands["accelerate"])
    for flag, value in [("--config_file", "recipes/accelerate/multi_node.yaml"), ("--num_processes", "2"),
                        ("--machine_rank", "0"), ("--main_process_ip", "MAIN_IP"),
                        ("--main_process_port", "29500")]:  # fmt: skip
        assert accelerate[accelerate.index(flag) + 1] == value, (flag, commands["accelerate"])
    for command in commands.values():
        assert "-m tl_plugin.cli train" in command, command
        assert "--lr_decay 0.8" in command, command


def test_every_launch_command_of_the_pages_is_run_by_a_test_or_listed_as_gpu_only():
    """Any code block (tests/test_distributed.py checks the bash blocks; the multi-node block is ``shell``)."""
    from test_distributed import CPU_COMMANDS, GPU_ONLY_COMMANDS

    known = {*CPU_COMMANDS, *GPU_ONLY_COMMANDS, *documented_multi_node_commands().values()}
    for page in DOC_PAGES:
        unknown = set(_launch_lines(page.read_text())) - known
        assert not unknown, f"{page.name}: launch commands no test runs: {sorted(unknown)}"


def test_multi_node_yaml_is_a_two_machine_gpu_config_that_the_cpu_flags_override():
    """The flags of the documented command turn exactly the GPU-only settings into a CPU launch."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "recipes" / "accelerate" / "multi_node.yaml"))
    assert config.distributed_type == "MULTI_GPU"
    assert config.num_machines == 2
    assert (config.num_processes, config.mixed_precision) == (16, "bf16")  # GPU-only: not run here
    assert config.rdzv_backend == "static"
    assert config.same_network
    accelerate = shlex.split(documented_multi_node_commands()["accelerate"])
    for flag, value in [("--num_processes", "2"), ("--mixed_precision", "no")]:
        assert accelerate[accelerate.index(flag) + 1] == value


# ------------------------------------------------------------------------------------------- the runs
@pytest.fixture(scope="module")
def own_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small two-label CSV and a tiny BERT folder, shared by the tests (each node gets its own copy of the CSV)."""
    import csv

    from tl_plugin.tune import save_tiny_bert

    folder = tmp_path_factory.mktemp("multi-node-data")
    with open(folder / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(48):
            writer.writerow(
                [f"{'good great fine' if i % 2 else 'bad awful poor'} item {i}", "pos" if i % 2 else "neg"]
            )
    save_tiny_bert(folder / "tiny")
    return folder / "train.csv", folder / "tiny"


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_documented_multi_node_command_trains_one_ddp_model_on_two_node_groups(
    launcher: str, own_data: tuple[Path, Path], tmp_path: Path
):
    """The page's command on both "machines"; rank 0's metrics.json says DDP, 2 ranks, bit-identical weights."""
    train_csv, tiny = own_data
    folders = _node_folders(tmp_path)
    for folder in folders:
        shutil.copy(train_csv, folder / "train.csv")
    documented, port = documented_multi_node_commands()[launcher], _free_port()
    commands = [[*node_command(documented, port=port, machine_rank=rank), "--model_name_or_path", str(tiny), *TINY_RUN]
                for rank in (0, 1)]  # fmt: skip
    outputs = run_node_groups(commands, folders)
    written = [folder for folder in folders if (folder / "out" / "metrics.json").is_file()]
    # only the global main process writes outputs: on one "machine" (machine_rank 0 with accelerate's static
    # rendezvous; whichever the c10d rendezvous gave rank 0 with torchrun)
    assert len(written) == 1, "\n".join(out[-3000:] for out in outputs)
    if launcher == "accelerate":
        assert written == [folders[0]]
    metrics = json.loads((written[0] / "out" / "metrics.json").read_text())
    assert metrics["distributed"] == {
        "world_size": 2, "backend": "gloo", "wrapped_in": "DistributedDataParallel", "ranks_identical": True,
    }  # fmt: skip
    assert metrics["transfer_config"]["lr_decay"] == 0.8
    main_output = outputs[folders.index(written[0])]
    assert "Processes: 2 (distributed)" in main_output
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in "".join(outputs)


def test_torchrun_two_node_groups_gradual_unfreezing_with_lr_decay_stay_bit_identical(tmp_path: Path):
    """The documented torchrun launcher (c10d) with the DDP worker: unfreezing during training plus layer-wise LR
    decay, 3 epochs, one process per node group; each node group writes into its own folder."""
    sys.path.insert(0, str(WORKER.parent))
    try:
        from distributed_worker import MULTI_NODE_LR_DECAY
    finally:
        sys.path.remove(str(WORKER.parent))
    folders = _node_folders(tmp_path)
    port = _free_port()
    launcher = launcher_part(
        node_command(documented_multi_node_commands()["torchrun"], port=port, machine_rank=0)
    )
    commands = [[*launcher, str(WORKER), "--scenario", "gradual_llrd", "--out", str(folder / "out"), "--epochs", "3"]
                for folder in folders]  # fmt: skip
    for folder in folders:
        (folder / "out").mkdir()
    outputs = run_node_groups(commands, folders)
    detail = "\n".join(out[-3000:] for out in outputs)
    per_node = [sorted((folder / "out").glob("rank[0-9].json")) for folder in folders]
    assert [len(files) for files in per_node] == [1, 1], f"{per_node}\n{detail}"  # one process per node group
    results = sorted((json.loads(files[0].read_text()) for files in per_node), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    for result in results:
        # the launcher's view: two node groups (GROUP_RANK) of one process each
        assert result["node"] == {
            "GROUP_RANK": str(result["rank"]),
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
        }
        assert result["wrapped"] == DDP_CLASS, f"rank {result['rank']} trained a {result['wrapped']}, not DDP"
        assert (result["world_size"], result["parallel_mode"]) == (2, "distributed")
        assert result["global_step"] == result["training_steps"] == 12  # 64 examples / 2 ranks / 8, x3 epochs
    rank0, rank1 = results
    assert rank0["first_batch"] != rank1["first_batch"], "both ranks got the same batch: no data split"
    # bit-identical weights and the same freezing on both "machines"
    diverged = [n for n in rank0["final"] if rank0["final"][n] != rank1["final"][n]]
    assert rank0["final"].keys() == rank1["final"].keys()
    assert not diverged, f"ranks diverged on {len(diverged)} parameters: {diverged[:5]}"
    assert rank0["requires_grad"] == rank1["requires_grad"]
    # layer-wise LR decay: lr x decay ** depth from the top (head 0, block i of 4: 4 - i, embeddings 5)
    lr = 5e-3
    expected = {"head": lr, "other": lr, "embeddings": lr * MULTI_NODE_LR_DECAY**5,
                **{f"blocks.{i}": lr * MULTI_NODE_LR_DECAY ** (4 - i) for i in range(4)}}  # fmt: skip
    assert rank0["initial_lr"] == rank1["initial_lr"]
    for group, value in expected.items():
        assert rank0["initial_lr"][group] == pytest.approx(value), (group, rank0["initial_lr"])
    # gradual unfreezing, one group per epoch, top-down: head, other (the pooler), blocks.3 trained and moved;
    # blocks 0-2 and the embeddings frozen for the whole run, and unchanged
    grad, start, final = rank0["requires_grad"], rank0["start"], rank0["final"]
    for name in ("classifier.weight", "bert.pooler.dense.weight", "bert.encoder.layer.3.output.dense.weight"):
        assert grad[name], name
        assert start[name] != final[name], name
    frozen = ("bert.embeddings.", *(f"bert.encoder.layer.{i}." for i in range(3)))
    assert sum(name.startswith(frozen) for name in grad) == 5 + 3 * 16
    for name in grad:
        assert grad[name] != name.startswith(frozen), name
        if not grad[name]:
            assert start[name] == final[name], f"frozen parameter {name} changed"

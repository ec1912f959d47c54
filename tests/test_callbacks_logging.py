"""The tl_plugin logger follows the Trainer's logging: a plain Trainer script that configures no logging shows the
trainable-parameter table and the freeze events, and ``log_level="error"`` silences them (issue #14.2)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import transformers
from transformers import TrainingArguments

from tl_plugin.callbacks.base import tl_log_level

# A Trainer script of the usual shape: no `logging` import, no `transformers.logging` call. It trains once per
# `log_level` given on its command line (one interpreter: the imports are paid once), marking each run on stderr.
SCRIPT = textwrap.dedent(
    """
    import sys

    import torch
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from tl_plugin import TransferConfig
    from tl_plugin.callbacks import TransferCallback

    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, num_labels=2
    )
    data = [{"input_ids": torch.randint(0, 99, (8,)), "labels": torch.tensor(i % 2)} for i in range(8)]
    for log_level in sys.argv[2:]:
        print(f"=== run {log_level}", file=sys.stderr, flush=True)
        args = TrainingArguments(
            sys.argv[1], max_steps=2, per_device_train_batch_size=4, report_to="none", use_cpu=True,
            save_strategy="no", disable_tqdm=True, log_level=log_level,
        )
        trainer = Trainer(
            model=BertForSequenceClassification(config),
            args=args,
            train_dataset=data,
            callbacks=[TransferCallback(TransferConfig(strategy="layers", freeze_bottom_blocks="half"))],
        )
        trainer.train()
    print("DONE", file=sys.stderr, flush=True)
    """
)


def _runs(tmp_path: Path, *log_levels: str) -> dict[str, str]:
    """``{log_level: what the script wrote (stdout and stderr)}`` for its runs, in order."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRANSFORMERS_VERBOSITY", None)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out"), *log_levels],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "DONE" in result.stdout
    parts = result.stdout.split("=== run ")[1:]
    return {f"{i}:{part.split(maxsplit=1)[0]}": part for i, part in enumerate(parts)}


def _table_rows(text: str) -> dict[str, list[str]]:
    return {cells[0]: cells for cells in (line.split() for line in text.splitlines()) if cells}


def test_a_script_without_logging_setup_shows_the_table_and_log_level_error_hides_it(tmp_path: Path):
    # (a "passive" run after the "error" one would stay quiet, like the Trainer's own logs: the Trainer leaves
    # `transformers.logging` at error, and "passive" follows that verbosity)
    runs = _runs(tmp_path, "passive", "error", "info")
    assert list(runs) == ["0:passive", "1:error", "2:info"]
    for key in ("0:passive", "2:info"):  # shown again after the silenced run: the level follows each run
        shown = runs[key]
        # the freeze event, then the table: the frozen bottom half at 0 trainable, the top half trained
        assert "[tl_plugin] [step 0] TransferCallback: entered phase 0" in shown, shown[-3000:]
        assert "training blocks.2, blocks.3, other, head" in shown
        rows = _table_rows(shown)
        assert rows["group"][:3] == ["group", "trainable", "total"]
        assert rows["blocks.0"][1] == "0"
        assert rows["embeddings"][1] == "0"
        assert rows["blocks.3"][1] == rows["blocks.3"][2] != "0"
        assert rows["all"][1] == "14,700"
        assert shown.count("entered phase 0") == 1  # printed once, not once per handler
    quiet = runs["1:error"]
    assert "TransferCallback" not in quiet, quiet[-3000:]
    assert "trainable" not in quiet


def test_the_level_follows_log_level_and_the_transformers_verbosity(tmp_path: Path):
    def level(**kwargs: str) -> str:
        return logging.getLevelName(
            tl_log_level(TrainingArguments(str(tmp_path), report_to="none", **kwargs))
        )

    before = transformers.logging.get_verbosity()  # the test suite runs at error (tests/conftest.py)
    try:
        transformers.logging.set_verbosity_warning()  # transformers' default
        assert level() == "INFO"  # nothing asked: the table and events show
        assert level(log_level="error") == "ERROR"
        assert level(log_level="warning") == "WARNING"  # asked for explicitly: followed
        assert level(log_level="debug") == "DEBUG"
        transformers.logging.set_verbosity_error()  # `transformers.logging` silenced, log_level left passive
        assert level() == "ERROR"
        transformers.logging.set_verbosity_debug()
        assert level() == "DEBUG"
    finally:
        transformers.logging.set_verbosity(before)


def test_only_the_events_logger_follows_and_a_level_set_by_the_user_is_left_alone(tmp_path: Path):
    from tl_plugin.callbacks.base import EVENTS_LOGGER, follow_trainer_logging

    events, library = logging.getLogger(EVENTS_LOGGER), logging.getLogger("tl_plugin")
    saved = (events.level, library.level)
    try:
        events.setLevel(logging.NOTSET)
        library.setLevel(logging.NOTSET)
        follow_trainer_logging(TrainingArguments(str(tmp_path), report_to="none", log_level="error"))
        assert events.level == logging.ERROR
        assert library.level == logging.NOTSET  # the plugin's warnings are left to Python's logging
        follow_trainer_logging(TrainingArguments(str(tmp_path), report_to="none", log_level="info"))
        assert events.level == logging.INFO  # a level it set itself follows the next run
        events.setLevel(logging.DEBUG)  # the user's
        follow_trainer_logging(TrainingArguments(str(tmp_path), report_to="none", log_level="error"))
        assert events.level == logging.DEBUG
        events.setLevel(logging.NOTSET)
        library.setLevel(logging.WARNING)  # the user configured the library's logger: events inherit it
        follow_trainer_logging(TrainingArguments(str(tmp_path), report_to="none", log_level="info"))
        assert events.level == logging.NOTSET
    finally:
        events.setLevel(saved[0])
        library.setLevel(saved[1])

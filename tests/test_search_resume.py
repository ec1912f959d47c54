"""``tl-plugin search --resume`` resumes the search that was started, or refuses, naming what differs.

No Ray here: the saved search (``search.json``) is built from a parsed first command line the way
`tl_plugin.app.search.run_search` builds it, and the checks run before Ray would start. The end-to-end refusal
(through `run_search`, after a real interrupted search) is in tests/test_tune.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tl_plugin.app.errors import UsageError
from tl_plugin.app.resume_check import data_fingerprint, resume_differences
from tl_plugin.app.search import build_search_parser, run_search, search_options, user_train_flags


def _csv(path: Path, rows: int = 8) -> Path:
    lines = ["text,label"] + [f"review number {i},{'good' if i % 2 else 'bad'}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _parse(*argv: str):
    return build_search_parser().parse_args(list(argv))


def _saved(args) -> dict:
    """What the first run writes to search.json (minus the model's block count, which needs the model)."""
    train_flags = user_train_flags(args.model, args.data)
    settings = {"max_epochs": args.max_epochs, "seed": args.seed, "metric": args.metric, "mode": args.mode,
                "train_size": args.train_size, "max_length": args.max_length, "activation_cache": False,
                "train_args": train_flags}  # fmt: skip
    return {"settings": settings, "search": search_options(args), "data_fingerprint": data_fingerprint(args.data)}


def _differences(saved: dict, *argv: str) -> list[str]:
    args = _parse(*argv)
    return resume_differences(args, saved, explicit=args.explicit, train_flags=user_train_flags(args.model, args.data))


@pytest.fixture
def first(tmp_path):
    data = _csv(tmp_path / "reviews.csv")
    args = _parse("--train_file", str(data), "--lr_max", "1e-3", "--num_samples", "4", "--workers_per_trial", "2")
    return data, _saved(args)


def test_resume_with_no_options_or_the_same_options_is_the_same_search(first):
    data, saved = first
    assert _differences(saved, "--resume") == []
    assert _differences(saved, "--resume", "--train_file", str(data), "--lr-max", "1e-3", "--num-samples=4") == []
    # where it runs may change
    assert _differences(saved, "--resume", "--num_cpus", "8", "--max_concurrent", "1", "--verbose", "0") == []


def test_a_different_search_space_is_named_with_both_values(first):
    _, saved = first
    (lr,) = _differences(saved, "--resume", "--lr_max", "1e-2")
    assert lr == "--lr_max 0.01 (the search was started with 0.001)"
    found = _differences(saved, "--resume", "--strategies", "full", "--num_samples", "8", "--seed", "3")
    assert [f.split(" ")[0] for f in found] == ["--num_samples", "--strategies", "--seed"]
    (workers,) = _differences(saved, "--resume", "--workers_per_trial", "1")
    assert workers.startswith("--workers_per_trial 1 ")


def test_other_data_on_the_command_line_or_changed_data_on_disk_is_refused(first, tmp_path):
    data, saved = first
    other = _csv(tmp_path / "other.csv", rows=10)
    (changed,) = _differences(saved, "--resume", "--train_file", str(other))
    assert changed.startswith(f"--train_file {other.resolve()} (the search was started with {data.resolve()})")
    assert _differences(saved, "--resume", "--text_column", "text") == [
        "--text_column text (the search was started with (not given))"
    ]
    data.write_text(data.read_text() + "one more review,good\n")
    (edited,) = _differences(saved, "--resume")
    assert edited == f"--train_file {data.resolve()}: the data changed since the search started"
    os.remove(data)
    (gone,) = _differences(saved, "--resume")
    assert gone.endswith("the data is gone")


def test_a_folder_of_files_is_fingerprinted_by_names_and_sizes(tmp_path):
    folder = tmp_path / "images"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "a.png").write_bytes(b"x" * 10)
    args = _parse("--train_dir", str(folder))
    before = data_fingerprint(args.data)
    assert data_fingerprint(args.data) == before
    (folder / "cat" / "b.png").write_bytes(b"y")
    assert data_fingerprint(args.data) != before


def test_run_search_refuses_before_ray_starts_and_keeps_the_saved_search(first, tmp_path):
    pytest.importorskip("ray")
    _, saved = first
    out = tmp_path / "search"
    out.mkdir()
    saved["experiment_path"] = str(out / "ray_results" / "tl-search")
    (out / "search.json").write_text(json.dumps(saved))
    with pytest.raises(UsageError, match=r"--resume: not the search that was started .*--lr_max 0\.01"):
        run_search(_parse("--resume", "--output_dir", str(out), "--lr_max", "1e-2"))
    assert json.loads((out / "search.json").read_text()) == saved

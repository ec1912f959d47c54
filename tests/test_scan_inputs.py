"""The layer scan's input limits (issue #13, "Bad input"): features larger than the memory budget (a cut that the
result and ``tl-plugin scan`` say), ``--max_examples`` and ``--max_feature_memory_mb``, and a model list that does not
go together (an image model for text, mixed task heads, classifiers fine-tuned for other label sets).

Models are tiny BERTs built from configs; folders for the model-list checks hold only a config.json (the checks run
before any weights are loaded).
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from test_app_text import articles, write_csv  # noqa: E402
from test_scan import tiny_bert, token_batches  # noqa: E402

from tl_plugin.app.errors import UsageError  # noqa: E402
from tl_plugin.app.scan import check_model_list  # noqa: E402
from tl_plugin.cli import main  # noqa: E402
from tl_plugin.scan import DEFAULT_MAX_FEATURE_BYTES, ScanConfig, collect_layer_features, scan_layers  # noqa: E402

#: tiny_bert(): 3 blocks + embeddings = 4 layers of 16 float32 features
BYTES_PER_EXAMPLE = 4 * 16 * 4


def scan_with_budget(batches, examples_that_fit: int, **config):
    config = ScanConfig(pooling="first", max_feature_bytes=examples_that_fit * BYTES_PER_EXAMPLE, **config)
    return scan_layers(tiny_bert(), batches, config=config)


# ------------------------------------------------------------------------------------------------- memory budget
def test_default_budget_is_2_gib_and_a_small_data_set_is_not_cut():
    assert ScanConfig().max_feature_bytes == DEFAULT_MAX_FEATURE_BYTES == 2 * 1024**3
    scan = scan_layers(tiny_bert(), token_batches(48), config=ScanConfig(pooling="first"))
    assert (scan.num_examples, scan.subsampled, scan.subsampled_from, scan.notes) == (48, False, None, [])
    assert scan.feature_bytes == 48 * BYTES_PER_EXAMPLE


def test_budget_keeps_the_first_examples_that_fit_and_says_so():
    batches = token_batches(48, batch=16)
    scan = scan_with_budget(batches, 40)  # the cut falls inside the third batch
    assert (scan.num_examples, scan.subsampled, scan.subsampled_from) == (40, True, 48)
    assert scan.feature_bytes == 40 * BYTES_PER_EXAMPLE
    assert scan.notes == [
        "The features of all 48 examples would take 12.0 KiB, more than the memory budget of 10.0 KiB (256 bytes "
        "per example over 4 layer(s)): scanned the first 40, in the order of the data."
    ]
    assert scan.to_dict()["notes"] == scan.notes  # what scan.json gets


def test_budgeted_features_are_the_first_rows_of_the_full_ones():
    model, batches = tiny_bert(), token_batches(48, batch=16)
    full, full_labels = collect_layer_features(model, batches, pooling="first")
    with pytest.warns(UserWarning, match="scanned the first 20"):
        cut, labels = collect_layer_features(
            model, batches, pooling="first", max_feature_bytes=20 * BYTES_PER_EXAMPLE
        )
    assert list(cut) == list(full)
    for name in full:
        assert cut[name].shape == (20, 16)
        np.testing.assert_array_equal(cut[name], full[name][:20])
    np.testing.assert_array_equal(labels, full_labels[:20])


def test_budget_that_holds_everything_is_silent():
    batches = token_batches(48, batch=16)
    scan = scan_with_budget(batches, 48)
    assert (scan.num_examples, scan.subsampled, scan.notes) == (48, False, [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collect_layer_features(
            tiny_bert(), batches, pooling="first", max_feature_bytes=48 * BYTES_PER_EXAMPLE
        )


def test_data_of_unknown_size_stops_at_the_budget_and_says_it_stopped():
    scan = scan_with_budget(iter(token_batches(48, batch=16)), 32)
    assert (scan.num_examples, scan.subsampled, scan.subsampled_from) == (32, True, None)
    assert scan.notes == [
        "The features reached the memory budget of 8.0 KiB after 32 examples (256 bytes per example over 4 "
        "layer(s)): collection stopped there, and the data has more."
    ]
    # the budget reached exactly at the end of an iterable: nothing was left out, nothing to say
    scan = scan_with_budget(iter(token_batches(48, batch=16)), 48)
    assert (scan.num_examples, scan.subsampled, scan.notes) == (48, False, [])


def test_a_data_loader_tells_its_size():
    from torch.utils.data import DataLoader

    batches = token_batches(48, batch=48)[0]
    rows = [{k: v[i] for k, v in batches.items()} for i in range(48)]
    loader = DataLoader(rows, batch_size=16)
    scan = scan_with_budget(loader, 24)
    assert (scan.num_examples, scan.subsampled_from) == (24, 48)
    assert "all 48 examples" in scan.notes[0]


def test_max_examples_below_the_budget_is_no_cut_and_above_it_is_named():
    batches = token_batches(48, batch=16)
    scan = scan_with_budget(batches, 40, max_examples=30)
    assert (scan.num_examples, scan.subsampled, scan.notes) == (30, False, [])
    scan = scan_with_budget(batches, 36, max_examples=40)
    assert (scan.num_examples, scan.subsampled, scan.subsampled_from) == (36, True, 40)
    assert scan.notes[0].startswith("The features of the 40 examples asked for would take 10.0 KiB")


def test_budget_scales_with_the_layers_scanned():
    scan = scan_with_budget(token_batches(48, batch=16), 10, layers=["last"])  # 1 layer: 4x the examples fit
    assert (scan.num_examples, scan.subsampled) == (40, True)
    assert "64 bytes per example over 1 layer(s)" in scan.notes[0]


def test_budget_below_two_examples_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"holds the features of 1 example\(s\) \(256 bytes per example over 4 "
    ):
        scan_with_budget(token_batches(48), 1)


@pytest.mark.parametrize("value", [0, -5, 1.5, "1"])
def test_budget_must_be_a_positive_whole_number_of_bytes(value):
    with pytest.raises(ValueError, match="`max_feature_bytes` must be a whole number of bytes >= 1 or None"):
        ScanConfig(max_feature_bytes=value)


def test_no_budget():
    scan = scan_layers(
        tiny_bert(), token_batches(48), config=ScanConfig(pooling="first", max_feature_bytes=None)
    )
    assert (scan.num_examples, scan.subsampled) == (48, False)


# ------------------------------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """A tiny saved BERT with its tokenizer (scannable), and config-only folders for the model-list checks."""
    from transformers import BertConfig, ViTConfig, Wav2Vec2Config

    from tl_plugin.testing import save_tiny_bert

    root = tmp_path_factory.mktemp("scan-inputs")
    found = {"bert": str(save_tiny_bert(root / "bert", num_hidden_layers=2))}
    small = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 20}

    def save(name: str, config) -> None:
        config.save_pretrained(root / name)
        found[name] = str(root / name)

    save("vit", ViTConfig(image_size=8, patch_size=4, architectures=["ViTForImageClassification"], **small))
    save("wav2vec2", Wav2Vec2Config(architectures=["Wav2Vec2ForSequenceClassification"], **small))
    save("bert-mlm", BertConfig(architectures=["BertForMaskedLM"], **small))
    save("bert-token", BertConfig(architectures=["BertForTokenClassification"], **small))
    save("bert-seq", BertConfig(architectures=["BertForSequenceClassification"], **small))  # LABEL_0, LABEL_1
    save("sentiment", BertConfig(architectures=["BertForSequenceClassification"], id2label={0: "neg", 1: "pos"},
                                 **small))  # fmt: skip
    save("sentiment-reversed", BertConfig(architectures=["BertForSequenceClassification"],
                                          id2label={0: "pos", 1: "neg"}, **small))  # fmt: skip
    save("topics", BertConfig(architectures=["BertForSequenceClassification"],
                              id2label={0: "arts", 1: "science", 2: "sports"}, **small))  # fmt: skip
    return found


@pytest.fixture(scope="module")
def train_csv(tmp_path_factory) -> str:
    return str(
        write_csv(
            tmp_path_factory.mktemp("scan-inputs-data") / "train.csv",
            articles(16, classes=("sports", "science")),
        )
    )


FAST = ["--max_length", "24", "--batch_size", "8", "--pooling", "mean"]


def test_cli_budget_cut_is_one_line_in_the_output_and_in_scan_json(tmp_path, folders, train_csv, capsys):
    out = tmp_path / "scan"
    per_example = 3 * 32 * 4  # embeddings + 2 blocks of 32 features
    budget_mb = 24 * per_example / 1024**2  # 24 of the 29: at least 9 of each class
    code = main(["scan", "--model_name_or_path", folders["bert"], "--train_file", train_csv, "--output_dir", str(out),
                 "--max_feature_memory_mb", repr(budget_mb), *FAST])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    note = (
        "The features of all 29 examples would take 10.9 KiB, more than the memory budget of 9.0 KiB (384 bytes per "
        "example over 3 layer(s)): scanned the first 24, in the order of the data (the training split was shuffled "
        "with --seed 42 first, so they are a random sample)."
    )
    assert f"Note: {note}" in printed.splitlines()
    scan = json.loads((out / "scan.json").read_text())["scan"]
    assert (scan["num_examples"], scan["subsampled"], scan["subsampled_from"], scan["notes"]) == (
        24,
        True,
        29,
        [note],
    )


def test_cli_max_examples_scans_a_seeded_random_sample(tmp_path, folders, train_csv, capsys):
    def scanned(seed: str) -> dict:
        out = tmp_path / f"seed{seed}"
        code = main(["scan", "--model_name_or_path", folders["bert"], "--train_file", train_csv, "--output_dir",
                     str(out), "--max_examples", "24", "--seed", seed, *FAST])  # fmt: skip
        assert code == 0
        return json.loads((out / "scan.json").read_text())["scan"]

    scan = scanned("42")
    assert (scan["num_examples"], scan["subsampled"]) == (24, False)  # asked for: not the budget's cut
    assert scan["notes"] == [
        "--max_examples 24: scanned 24 of the 29 training examples (the training split was shuffled with --seed 42 "
        "first, so they are a random sample)."
    ]
    assert "Note: --max_examples 24: scanned 24 of the 29" in capsys.readouterr().out
    assert scanned("42")["layers"] == scan["layers"]  # seeded: the same sample again


def test_cli_budget_and_max_examples_bad_values(tmp_path, folders, train_csv, capsys, scan_error):
    assert scan_error("--max_examples", "1").endswith(
        "--max_examples must be at least 2 (or left out: all examples), got 1"
    )
    for value in ("0", "-3", "nan"):
        line = scan_error("--max_feature_memory_mb", value)
        assert "--max_feature_memory_mb must be a number of MiB above 0, got" in line, line
    assert "--max_feature_memory_mb" in scan_error("--max_feature_memory_mb", "lots")
    line = scan_error("--model_name_or_path", folders["bert"], "--train_file", train_csv, *FAST,
                "--max_feature_memory_mb", "0.0001", "--output_dir", str(tmp_path / "o"))  # fmt: skip
    assert line.startswith("tl-plugin scan: error: --max_feature_memory_mb 0.0001: The memory budget of 105 bytes "
                           "holds the features of 0 example(s) (384 bytes per example over 3 layer(s))")  # fmt: skip
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------- model lists
def test_an_image_or_audio_model_for_text_names_the_folder(folders):
    with pytest.raises(UsageError, match=rf"^--model {folders['vit']}: an image model \(model_type 'vit'\) that "
                       r"transformers cannot load for text-classification; the data is text: give text models$"):  # fmt: skip
        check_model_list([("--model", folders["bert"]), ("--model", folders["vit"])], "text-classification")
    with pytest.raises(UsageError, match=rf"^--model_name_or_path {folders['wav2vec2']}: an audio model"):
        check_model_list([("--model_name_or_path", folders["wav2vec2"])], "text-classification")
    with pytest.raises(
        UsageError, match=rf"^--model {folders['bert']}: a text model \(model_type 'bert'\) .* image"
    ):
        check_model_list([("--model", folders["vit"]), ("--model", folders["bert"])], "image-classification")
    check_model_list([("--model", folders["vit"])], "image-classification")  # fits


def test_mixed_task_heads_name_the_odd_one(folders):
    models = [("--model", folders[name]) for name in ("bert-seq", "sentiment", "bert-token")]
    with pytest.raises(UsageError, match=rf"^--model {folders['bert-token']}: its architecture has a "
                       rf"TokenClassification head, --model {folders['bert-seq']} a SequenceClassification head"):  # fmt: skip
        check_model_list(models, "text-classification")


def test_classifiers_fine_tuned_for_other_labels_name_the_odd_one_and_both_label_sets(folders):
    models = [("--model", folders[name]) for name in ("sentiment", "topics", "sentiment-reversed")]
    with pytest.raises(UsageError, match=rf"^--model {folders['topics']}: fine-tuned for the labels \['arts', "
                       rf"'science', 'sports'\], --model {folders['sentiment']} for \['neg', 'pos'\]"):  # fmt: skip
        check_model_list(models, "text-classification")


def test_models_that_go_together_pass(folders):
    # base models, pretraining heads and generic LABEL_i heads mix with a fine-tuned one; the same labels in
    # another order are the same label set
    names = ("bert", "bert-mlm", "bert-seq", "sentiment", "sentiment-reversed")
    check_model_list([("--model", folders[name]) for name in names], "text-classification")


def test_cli_refuses_a_mixed_list_before_loading_weights(tmp_path, folders, train_csv, capsys, scan_error):
    line = scan_error("--model", folders["bert"], "--model", folders["vit"], "--train_file", train_csv, *FAST,
                "--output_dir", str(tmp_path / "o"))  # fmt: skip
    assert line.startswith(
        f"tl-plugin scan: error: --model {folders['vit']}: an image model (model_type 'vit')"
    )
    line = scan_error("--model_name_or_path", folders["sentiment"], "--model", folders["topics"], "--train_file",
                train_csv, *FAST, "--output_dir", str(tmp_path / "o"))  # fmt: skip
    assert f"--model {folders['topics']}: fine-tuned for the labels ['arts', 'science', 'sports'], " \
           f"--model_name_or_path {folders['sentiment']} for ['neg', 'pos']" in line  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_an_unreadable_config_is_named(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match=rf"^--model {folder}: its config.json cannot be read"):
        check_model_list([("--model", str(folder))], "text-classification")


def test_a_model_with_its_own_code_is_not_checked_against_the_task(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "my-encoder", "architectures": ["MyEncoderForSequenceClassification"],
        "auto_map": {"AutoModelForSequenceClassification": "modeling_my.MyEncoderForSequenceClassification"},
    }))  # fmt: skip
    check_model_list([("--model", str(folder))], "text-classification")  # its own Auto classes: not refused
    plain = json.loads((folder / "config.json").read_text())
    del plain["auto_map"]
    (folder / "config.json").write_text(json.dumps(plain))
    with pytest.raises(
        UsageError, match=r"a model \(model_type 'my-encoder'\) that transformers cannot load"
    ):
        check_model_list([("--model", str(folder))], "text-classification")


def test_cli_ranking_under_a_budget(tmp_path, folders, train_csv, capsys, scan_error):
    from tl_plugin.testing import save_tiny_bert

    same_width = str(save_tiny_bert(tmp_path / "other", num_hidden_layers=2, seed=1))
    wider = str(save_tiny_bert(tmp_path / "wider", num_hidden_layers=2, hidden_size=64))
    budget_mb = repr(24 * 32 * 4 / 1024**2)  # the last layer only: 24 examples of 32 features fit
    out = tmp_path / "rank"
    code = main(["scan", "--model", folders["bert"], "--model", same_width, "--train_file", train_csv,
                 "--output_dir", str(out), "--max_feature_memory_mb", budget_mb, *FAST])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    saved = json.loads((out / "ranking.json").read_text())
    for model in (folders["bert"], same_width):
        scan = saved["scans"][model]
        assert (scan["num_examples"], scan["subsampled_from"]) == (24, 29)
        assert f"Note ({model}): The features of all 29 examples would take" in printed
    budget_mb = repr(24 * 64 * 4 / 1024**2)  # all 29 examples of the narrow model fit, 24 of the wider one
    line = scan_error("--model", folders["bert"], "--model", wider, "--train_file", train_csv,
                "--max_feature_memory_mb", budget_mb, *FAST, "--output_dir", str(tmp_path / "o"))  # fmt: skip
    assert line.startswith(f"tl-plugin scan: error: --max_feature_memory_mb {float(budget_mb):g}: the budget cut the "
                           "models' data differently (The scan of")  # fmt: skip
    assert line.endswith("give --max_examples to scan the same number of examples")


def test_cli_cut_of_a_file_sorted_by_label_still_sees_every_class(tmp_path, folders, capsys):
    # all sports rows first, then all science rows; a given validation file: no hold-out split reorders the rows
    rows = sorted(articles(16, classes=("sports", "science")), key=lambda row: row["label"] != "sports")
    train = write_csv(tmp_path / "sorted.csv", rows)
    validation = write_csv(tmp_path / "validation.csv", articles(2, seed=1, classes=("sports", "science")))
    for cut in (
        ["--max_examples", "16"],
        ["--max_feature_memory_mb", repr(16 * 32 * 4 / 1024**2), "--layers", "last"],
    ):
        out = tmp_path / cut[0].strip("-")
        code = main(["scan", "--model_name_or_path", folders["bert"], "--train_file", str(train), "--validation_file",
                     str(validation), "--probe_test_size", "0.5", "--output_dir", str(out), *cut, *FAST])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        scan = json.loads((out / "scan.json").read_text())["scan"]
        assert (scan["num_examples"], scan["num_classes"]) == (16, 2)  # the first 16 rows are all sports
        assert scan["majority_accuracy"] <= 0.75

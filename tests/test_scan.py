"""The layer scan (tl_plugin.scan) and ``tl-plugin scan``: features per layer, probe scores, the recommendation and
its YAML round trip through ``tl-plugin train``, model ranking, and every bad input.

Models are tiny BERTs built from configs (or saved by `tl_plugin.tune.save_tiny_bert` for the command line), data a
few dozen short texts whose label is given away by their words.
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from test_app_text import articles, write_csv  # noqa: E402
from tiny_models import build_tiny_model  # noqa: E402

import tl_plugin.scan as scan_module  # noqa: E402
from tl_plugin import TransferConfig, discover_layer_groups  # noqa: E402
from tl_plugin.app.scan import plot_scan, rank_models  # noqa: E402
from tl_plugin.cli import main  # noqa: E402
from tl_plugin.scan import (  # noqa: E402
    LayerScan,
    LayerScore,
    ScanConfig,
    collect_layer_features,
    min_examples_per_class,
    probe_accuracy,
    recommend,
    resolve_pooling,
    scan_layers,
)


def tiny_bert(layers: int = 3, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=20, max_position_embeddings=16)  # fmt: skip
    return BertForSequenceClassification(config)


def token_batches(n: int = 48, batch: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Sequences of 6 random tokens (padded at the end by 0-2 positions), the first token gives the class away."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    ids = torch.randint(3, 30, (n, 6), generator=generator)
    ids[:, 0] = labels + 1
    mask = torch.ones(n, 6, dtype=torch.long)
    for i in range(n):
        pad = i % 3
        if pad:
            mask[i, -pad:] = 0
            ids[i, -pad:] = 0
    return [
        {"input_ids": ids[i : i + batch], "attention_mask": mask[i : i + batch], "labels": labels[i : i + batch]}
        for i in range(0, n, batch)
    ]


def test_docstring_examples_run():
    result = doctest.testmod(scan_module, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


# ------------------------------------------------------------------------------------------------- features
@pytest.mark.parametrize("pooling", ["first", "mean", "last", "pooler"])
def test_hook_features_equal_the_models_hidden_states_pooled(pooling):
    model = tiny_bert()
    batches = token_batches()
    features, labels = collect_layer_features(model, batches, pooling=pooling)
    assert list(features) == ["embeddings", "blocks.0", "blocks.1", "blocks.2"]
    assert labels.tolist() == [b for batch in batches for b in batch["labels"].tolist()]
    model.eval()
    with torch.no_grad():
        parts = []
        for batch in batches:
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True).hidden_states  # fmt: skip
            mask = batch["attention_mask"].unsqueeze(-1).float()
            if pooling == "first":
                pooled = [h[:, 0] for h in hidden]
            elif pooling == "pooler":
                pooled = [model.bert.pooler(h) for h in hidden]
            elif pooling == "mean":
                pooled = [(h * mask).sum(1) / mask.sum(1) for h in hidden]
            else:
                last = batch["attention_mask"].sum(1) - 1
                pooled = [h[torch.arange(h.shape[0]), last] for h in hidden]
            parts.append(pooled)
    for k, name in enumerate(features):
        expected = torch.cat([p[k] for p in parts]).numpy()
        np.testing.assert_allclose(features[name], expected, atol=1e-5)


def test_shared_block_albert_keeps_one_row_per_example_and_the_final_output():
    model = build_tiny_model("albert")
    batches = [{k: v for k, v in b.items() if k != "attention_mask"} for b in token_batches()]
    features, labels = collect_layer_features(model, batches, pooling="first")
    assert list(features) == ["embeddings", "blocks.0"]
    assert features["blocks.0"].shape[0] == labels.shape[0] == 48
    model.eval()
    with torch.no_grad():
        final = torch.cat([model.albert(input_ids=b["input_ids"]).last_hidden_state[:, 0] for b in batches])
    np.testing.assert_allclose(features["blocks.0"], final.numpy(), atol=1e-5)


def test_image_feature_maps_are_globally_average_pooled():
    model = build_tiny_model("resnet").train()
    pixels = torch.randn(8, 3, 32, 32)
    features, _ = collect_layer_features(model, [{"pixel_values": pixels, "labels": torch.arange(8) % 2}])
    assert model.training  # put back in its former mode
    model.eval()
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    np.testing.assert_allclose(features["blocks.0"], hidden[1].mean(dim=(2, 3)).numpy(), atol=1e-5)


def test_pooling_follows_the_models_head():
    assert resolve_pooling(build_tiny_model("bert")) == "pooler"
    assert resolve_pooling(build_tiny_model("roberta")) == "first"
    assert resolve_pooling(build_tiny_model("gpt2")) == "last"
    assert resolve_pooling(build_tiny_model("roberta"), "mean") == "mean"


def test_undeterminable_pooling_asks_for_it():
    class Blocks(torch.nn.Module):  # a plain module: no config, no pooler
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(30, 8)
            self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))

        def forward(self, input_ids, attention_mask=None):
            x = self.embed(input_ids)
            for layer in self.layers:
                x = layer(x)
            return x

    with pytest.raises(ValueError, match=r"pass the pooling .*--pooling.*first, mean, last, pooler"):
        collect_layer_features(Blocks(), token_batches())
    features, _ = collect_layer_features(Blocks(), [{k: b[k] for k in ("input_ids", "labels")} for b in token_batches()],
                                         pooling="mean")  # fmt: skip
    assert features["blocks.1"].shape == (48, 8)
    with pytest.raises(ValueError, match="has no pooler with weights"):
        resolve_pooling(Blocks(), "pooler")


def test_unknown_layer_lists_the_layers():
    with pytest.raises(ValueError, match=r"Unknown layer\(s\) \['blocks.7'\]; .*embeddings, blocks.0, blocks.1, blocks.2"):
        collect_layer_features(tiny_bert(), token_batches(), layers=["blocks.7"])
    features, _ = collect_layer_features(tiny_bert(), token_batches(), layers=["last"], pooling="first")
    assert list(features) == ["blocks.2"]


def test_per_token_labels_are_refused():
    batches = [{"input_ids": b["input_ids"], "labels": b["input_ids"]} for b in token_batches()]
    with pytest.raises(ValueError, match="one class id per example"):
        collect_layer_features(tiny_bert(), batches, pooling="first")


# ------------------------------------------------------------------------------------------------- scores
def test_probe_scores_separable_features_perfectly_and_noise_near_chance():
    rng = np.random.default_rng(0)
    labels = np.arange(400) % 2
    assert probe_accuracy(np.c_[labels + 0.05 * rng.normal(size=400), rng.normal(size=(400, 3))], labels) == 1.0
    assert 0.35 < probe_accuracy(rng.normal(size=(400, 4)), labels) < 0.65
    # the split is fixed by the seed
    x = rng.normal(size=(400, 4)) + labels[:, None] * 0.3
    assert probe_accuracy(x, labels, seed=3) == probe_accuracy(x, labels, seed=3)


def test_scan_finds_the_planted_signal_and_records_what_it_scanned():
    scan = scan_layers(tiny_bert(), token_batches(n=64), config=ScanConfig(pooling="first"), name="tiny")
    assert [s.layer for s in scan.layers] == ["embeddings", "blocks.0", "blocks.1", "blocks.2"]
    assert [s.boundary for s in scan.layers] == [0, 1, 2, 3]
    assert scan.get("embeddings").probe_accuracy == 1.0
    assert (scan.num_examples, scan.num_classes, scan.num_blocks, scan.feature_dim) == (64, 2, 3, 16)
    assert scan.majority_accuracy == 0.5
    assert "embeddings" in scan.table()
    assert "LogME" in scan.table()
    # the same data with its labels shuffled: nothing to find, every layer's LogME is lower
    shuffled = token_batches(n=64)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    all_labels = torch.cat([b["labels"] for b in shuffled])[perm]
    for i, batch in enumerate(shuffled):
        batch["labels"] = all_labels[i * 16 : (i + 1) * 16]
    noise = scan_layers(tiny_bert(), shuffled, config=ScanConfig(pooling="first"))
    for planted, shuffled_score in zip(scan.layers, noise.layers, strict=True):
        assert planted.logme > shuffled_score.logme


def test_one_class_and_too_few_examples_are_clear_errors():
    batches = token_batches()
    one_class = [{**b, "labels": torch.zeros_like(b["labels"])} for b in batches]
    with pytest.raises(ValueError, match=r"at least 2 classes.*got only \[0\]"):
        scan_layers(tiny_bert(), one_class, config=ScanConfig(pooling="first"))
    minimum = min_examples_per_class(0.25)
    assert minimum == 8
    with pytest.raises(ValueError, match=rf"every class needs at least {minimum} examples.*\{{'0': 3, '1': 3\}}"):
        scan_layers(tiny_bert(), token_batches(n=6, batch=6), config=ScanConfig(pooling="first"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pooling": "max"}, "`pooling` must be one of auto, first, mean, last, pooler, got 'max'"),
        ({"probe_test_size": 1.0}, "`probe_test_size` must be between 0 and 1"),
        ({"layers": "blocks.0"}, "`layers` must be a non-empty list"),
        ({"max_examples": 1}, "`max_examples` must be >= 2"),
    ],
)
def test_scan_config_checks_its_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScanConfig(**kwargs)


# ------------------------------------------------------------------------------------------------- recommendation
def make_scan(probe: list[float], evidence: list[float], majority: float = 0.5) -> LayerScan:
    layers = [
        LayerScore("embeddings" if i == 0 else f"blocks.{i - 1}", i, p, e)
        for i, (p, e) in enumerate(zip(probe, evidence, strict=True))
    ]
    return LayerScan(layers, num_blocks=len(probe) - 1, num_examples=100, num_classes=2, feature_dim=8,
                     majority_accuracy=majority, pooling="first", forward_seconds=0.0, scoring_seconds=0.0)  # fmt: skip


def test_recommendation_freezes_below_the_first_layer_near_the_best():
    rec = recommend(make_scan([0.6, 0.7, 0.85, 0.86, 0.8, 0.7, 0.6], [-0.7, -0.6, -0.45, -0.44, -0.5, -0.6, -0.65]))
    assert rec.boundary == 2
    assert rec.transfer == TransferConfig(strategy="layers", freeze_bottom_blocks=2)
    assert rec.learning_rate_range == (5e-5, 2e-4)  # 4 of 6 blocks trained
    assert "blocks.1 is the first layer" in rec.reasons[0]


def test_recommendation_keeps_a_block_trained_and_trains_everything_when_features_are_useless():
    rising = recommend(make_scan([0.6, 0.7, 0.8, 0.9], [-0.7, -0.6, -0.5, -0.4]))
    assert rising.boundary == 2  # the best layer is the top one; 1 of 3 blocks stays trained
    assert rising.learning_rate_range == (1e-4, 5e-4)
    best_at_bottom = recommend(make_scan([0.9, 0.8, 0.7, 0.6], [-0.4, -0.5, -0.6, -0.7]))
    assert best_at_bottom.transfer == TransferConfig(strategy="full")
    assert best_at_bottom.learning_rate_range == (2e-5, 1e-4)
    useless = recommend(make_scan([0.52, 0.5, 0.53, 0.51], [-0.7, -0.69, -0.68, -0.7], majority=0.5))
    assert useless.transfer.strategy == "full"
    assert "majority baseline" in useless.reasons[0]


def test_recommended_yaml_loads_and_tl_plugin_train_accepts_it(tmp_path):
    from tl_plugin.app.train import parse_train_args
    from tl_plugin.transfer import apply_transfer

    rec = recommend(make_scan([0.6, 0.8, 0.85, 0.86, 0.8], [-0.7, -0.5, -0.45, -0.44, -0.5]))
    path = rec.save(tmp_path / "transfer_config.yaml")
    text = path.read_text()
    assert text.startswith("# Written by tl-plugin scan")
    assert "# Learning rate: try 5e-05 to 0.0002" in text
    assert TransferConfig.load(path) == rec.transfer
    options = parse_train_args(["--transfer_config", str(path), "--output_dir", str(tmp_path / "run")])
    assert options.transfer == rec.transfer
    model = tiny_bert(layers=4)
    apply_transfer(model, options.transfer, discover_layer_groups(model))
    frozen = {i for i in range(4) if not any(p.requires_grad for p in model.bert.encoder.layer[i].parameters())}
    assert frozen == set(range(rec.boundary)) == {0, 1}


def test_plot_is_written(tmp_path):
    scan = make_scan([0.6, 0.8, 0.85, 0.86], [-0.7, -0.5, -0.45, -0.44])
    path = plot_scan(scan, tmp_path / "scan.png", recommend(scan))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_rank_models_orders_by_last_layer_logme_and_refuses_other_data():
    good, poor = make_scan([0.6, 0.9], [-0.6, -0.3]), make_scan([0.6, 0.7], [-0.6, -0.5])
    assert [name for name, _ in rank_models({"poor": poor, "good": good})] == ["good", "poor"]
    other = make_scan([0.6, 0.9], [-0.6, -0.3])
    other.num_examples = 50
    with pytest.raises(ValueError, match="The scan of odd has 50 examples of 2 classes"):
        rank_models({"good": good, "odd": other})


# ------------------------------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[str, str]:
    """A tiny saved BERT, and a 'blind' copy whose word embeddings are all zero (it cannot tell texts apart)."""
    from transformers import BertModel

    from tl_plugin.tune import save_tiny_bert

    root = tmp_path_factory.mktemp("scan-models")
    informative = save_tiny_bert(root / "informative", num_hidden_layers=2)
    blind = root / "blind"
    model = BertModel.from_pretrained(informative)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.zero_()
    model.save_pretrained(blind)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(informative).save_pretrained(blind)
    return str(informative), str(blind)


@pytest.fixture(scope="module")
def train_csv(tmp_path_factory) -> str:
    return str(write_csv(tmp_path_factory.mktemp("scan-data") / "train.csv", articles(16, classes=("sports", "science"))))


FAST = ["--max_length", "24", "--batch_size", "16", "--pooling", "mean"]


def test_cli_scan_prints_the_table_and_writes_plot_json_and_a_config_train_reads(tmp_path, tiny_models, train_csv, capsys):
    out = tmp_path / "scan"
    code = main(["scan", "--model_name_or_path", tiny_models[0], "--train_file", train_csv,
                 "--output_dir", str(out), *FAST])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "layer        boundary probe acc     LogME" in printed
    assert "blocks.1" in printed
    result = json.loads((out / "scan.json").read_text())
    assert [s["layer"] for s in result["scan"]["layers"]] == ["embeddings", "blocks.0", "blocks.1"]
    assert result["scan"]["num_examples"] == 29  # 32 texts less the 10% validation split (stratified)
    assert (out / "scan.png").read_bytes()[:4] == b"\x89PNG"
    config = TransferConfig.load(out / "transfer_config.yaml")
    assert config.to_dict() == result["recommendation"]["transfer_config"]
    assert f"tl-plugin train --transfer_config {out / 'transfer_config.yaml'}" in printed


def test_cli_ranks_an_informative_model_above_a_blind_one(tmp_path, tiny_models, train_csv, capsys):
    informative, blind = tiny_models
    out = tmp_path / "rank"
    code = main(["scan", "--model", blind, "--model", informative, "--train_file", train_csv,
                 "--output_dir", str(out), *FAST])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    ranking = json.loads((out / "ranking.json").read_text())["ranking"]
    assert [r["model"] for r in ranking] == [informative, blind]
    assert [r["layer"] for r in ranking] == ["blocks.1", "blocks.1"]
    assert ranking[0]["probe_accuracy"] > ranking[1]["probe_accuracy"]
    assert "1     " + informative in capsys.readouterr().out


def test_cli_bad_input_is_one_line(tmp_path, tiny_models, train_csv, capsys, scan_error):
    model = tiny_models[0]
    assert "--model_name_or_path: no such folder" in scan_error("--model_name_or_path", str(tmp_path / "nope"))
    line = scan_error("--model", model, "--model", str(tmp_path / "nope"), "--train_file", train_csv)
    assert line.startswith("tl-plugin scan: error: --model: no such folder")
    line = scan_error("--model_name_or_path", model, "--train_file", train_csv, "--layers", "blocks.9", *FAST,
                "--output_dir", str(tmp_path / "o"))  # fmt: skip
    assert "--layers blocks.9: Unknown layer(s) ['blocks.9']; the layers of this model are: embeddings, blocks.0, blocks.1" in line
    few = write_csv(tmp_path / "few.csv", articles(4, classes=("sports", "science")))
    line = scan_error("--model_name_or_path", model, "--train_file", str(few), *FAST, "--output_dir", str(tmp_path / "o"))
    assert "every class needs at least 8 examples" in line
    assert "--pooling" in scan_error("--pooling", "max")
    assert not (tmp_path / "o").exists()


def test_console_script_scans_in_a_subprocess(tmp_path, tiny_models, train_csv):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "tl_plugin.cli", "scan", "--model_name_or_path", tiny_models[0],
         "--train_file", train_csv, "--output_dir", str(out), *FAST],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert TransferConfig.load(Path(out) / "transfer_config.yaml").strategy in ("full", "layers")


# ------------------------------------------------------------------------------------------------- benchmark
def load_benchmark():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "scan_vs_grid.py"
    spec = importlib.util.spec_from_file_location("scan_vs_grid", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_summary_puts_grid_and_scan_side_by_side():
    bench = load_benchmark()
    scan = make_scan([0.6, 0.7, 0.8, 0.75], [-0.7, -0.6, -0.5, -0.55])
    rec = recommend(scan)
    scan_json = {"scan": scan.to_dict(), "recommendation": rec.to_dict()}
    grid = {0: [0.80, 0.82], 1: [0.79, 0.81], 2: [0.78, 0.78], 3: [0.70, 0.72]}
    summary = bench.summarise(scan_json, grid, scan_seconds=10.0, full_seconds=40.0)
    assert summary["grid_best_boundary"] == 0
    assert summary["recommended_boundary"] == rec.boundary == 2
    assert summary["recommended_minus_best_points"] == pytest.approx(-3.0)
    assert summary["scan_over_full_run"] == 0.25
    # accuracy ranks 4 3 2 1 against probe ranks 1 2 4 3: rho = 1 - 6 * 18 / (4 * 15) = -0.8
    assert summary["spearman"]["probe_accuracy"] == pytest.approx(-0.8)
    report = bench.format_report(summary)
    assert "<- grid best" in report
    assert "<- recommended" in report
    assert "ratio 0.25" in report
    assert bench.with_recommended([0, 2, 4, 6], 5) == [0, 2, 4, 5, 6]
    command = bench.train_command({"train_size": 10, "test_size": 5, "epochs": 1, "learning_rate": 1e-4}, 3, 7, Path("o"))
    strategy = command.index("--strategy")
    assert command[strategy : strategy + 4] == ["--strategy", "layers", "--freeze_bottom_blocks", "3"]
    assert bench.transfer_flags(0) == ["--strategy", "full"]


@pytest.mark.slow
@pytest.mark.real_model
def test_benchmark_quick_mode_runs(tmp_path):
    """Several minutes (4 MiniLM fine-tuning runs of 300 reviews and a scan); its numbers are in docs/layer-scan.md."""
    result = subprocess.run(
        [sys.executable, "benchmarks/scan_vs_grid.py", "--quick", "--json", str(tmp_path / "quick.json")],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=3600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "quick.json").read_text())["summary"]
    assert summary["recommended_accuracy"] is not None
    assert summary["scan_seconds"] > 0

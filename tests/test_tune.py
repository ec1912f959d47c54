"""Ray Tune search over learning rate and which layers to transfer (`tl_plugin.tune`, ``recipes/tune_*.py``).

The ``ray`` tests start a real local Ray (2 CPUs, no dashboard, temp dir under /tmp) and run real trials on a tiny
random BERT (3 blocks, hidden size 32) that uses the real all-MiniLM-L6-v2 tokenizer, on 64 real fine-food reviews
(validation: the fixed 400). Every Ray test shuts Ray down when it ends (the ``ray_env`` fixture), runs with
``HOME`` pointed at a temporary folder (so the test also checks that nothing is written to ``~/.ray``) and with the
workers' logs not echoed, so that the test output stays readable.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest

from tl_plugin import TransferConfig
from tl_plugin import tune as tlt
from tl_plugin.app.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
TINY_BLOCKS = 3


def _load_recipe(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so that Ray can pickle its functions by reference
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model_dir():
    """A tiny BERT with the MiniLM tokenizer, saved under a short /tmp folder."""
    folder = tempfile.mkdtemp(prefix="tltiny-", dir="/tmp")
    try:
        yield str(tlt.save_tiny_bert(Path(folder) / "bert", num_hidden_layers=TINY_BLOCKS))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def fake_home():
    folder = tempfile.mkdtemp(prefix="tlhome-", dir="/tmp")
    try:
        yield Path(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def ray_env(monkeypatch, fake_home):
    """Readable, isolated Ray: HOME in a temp folder, log dedup on; Ray is shut down after the test."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("HOME", str(fake_home))
    monkeypatch.setenv("RAY_DEDUP_LOGS", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    yield ray
    if ray.is_initialized():
        ray.shutdown()
    assert not (fake_home / ".ray" / "auth_token").exists(), "the local Ray wrote a token to ~/.ray"


def _search_args(tiny_model_dir: str, output_dir: Path, *extra: str):
    recipe = _load_recipe("tune_search")
    return recipe.build_parser().parse_args(
        [
            "--model_name_or_path", tiny_model_dir,
            "--output-dir", str(output_dir),
            "--train-size", "64",
            "--metric", "eval_loss",
            "--mode", "min",
            "--quiet-workers",
            "--verbose", "0",
            *extra,
        ]
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- no Ray process
def test_missing_ray_and_matplotlib_raise_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.tune", None)
    with pytest.raises(ImportError, match=r"pip install 'tl-plugin\[ray\]'"):
        tlt.build_search_space(4)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'tl-plugin\[plot\]'"):
        tlt.plot_results([], "unused.png", "eval_accuracy")


def test_search_space_block_ranges_come_from_layer_discovery(tiny_model_dir):
    pytest.importorskip("ray")
    assert tlt.count_blocks(tiny_model_dir) == TINY_BLOCKS
    assert tlt.count_blocks(None) == 6  # the bundled all-MiniLM-L6-v2
    for blocks in (TINY_BLOCKS, 6):
        space = tlt.search_space_for_model(tiny_model_dir if blocks == TINY_BLOCKS else None)
        assert (space["freeze_bottom_blocks"].lower, space["freeze_bottom_blocks"].upper) == (1, blocks + 1)
        assert (space["reinit_top_k"].lower, space["reinit_top_k"].upper) == (1, max(1, blocks // 2) + 1)
        assert (space["learning_rate"].lower, space["learning_rate"].upper) == (1e-5, 5e-4)
        assert set(space["strategy"].categories) == {"full", "partial", "layers"}
    assert "l2sp_alpha" in tlt.build_search_space(4, l2sp_alphas=(0.0, 0.01))
    with pytest.raises(ValueError, match="num_blocks"):
        tlt.build_search_space(0)


def test_every_sampled_point_is_a_valid_config_that_fits_the_model():
    pytest.importorskip("ray")
    import numpy as np
    from tiny_models import build_tiny_bert

    from tl_plugin import apply_transfer

    space = tlt.build_search_space(4, l2sp_alphas=(0.0, 0.01))
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(60):
        point = {name: domain.sample(random_state=rng) for name, domain in space.items()}
        config = tlt.transfer_config_from_trial(point, seed=1)
        seen.add((config.strategy, config.freeze_bottom_blocks, config.reinit_top_k))
        report = apply_transfer(build_tiny_bert(), config)
        assert report.trainable > 0
        assert 1e-5 <= point["learning_rate"] <= 5e-4
    assert {s for s, _, _ in seen} == {"full", "partial", "layers"}
    assert {f for s, f, _ in seen if s == "layers"} == {1, 2, 3, 4}


def test_transfer_config_from_trial_uses_only_the_sampled_strategy_knobs():
    import numpy as np

    point = {"learning_rate": 1e-4, "freeze_bottom_blocks": np.int64(2), "reinit_top_k": np.int64(1)}
    assert tlt.transfer_config_from_trial({**point, "strategy": "layers", "lr_decay": 1.0}) == TransferConfig(
        strategy="layers", freeze_bottom_blocks=2
    )
    assert tlt.transfer_config_from_trial({**point, "strategy": "partial", "lr_decay": 0.8}, seed=7) == (
        TransferConfig(strategy="partial", reinit_top_k=1, lr_decay=0.8, reinit_seed=7)
    )
    assert tlt.transfer_config_from_trial({**point, "strategy": "full"}) == TransferConfig(strategy="full")
    assert tlt.baseline_point(6)["freeze_bottom_blocks"] == 3  # tl-plugin train's default: bottom half frozen


def test_optional_callback_knobs_train(tiny_model_dir):
    """Gradual unfreezing and L2-SP, when sampled, are added to the trial's Trainer (no Ray needed)."""
    settings = tlt.SearchSettings(
        num_blocks=TINY_BLOCKS, model_path=tiny_model_dir, train_size=32, max_epochs=1
    )
    point = {"learning_rate": 1e-3, "strategy": "layers", "freeze_bottom_blocks": 1, "lr_decay": 0.9,
             "unfreeze_pace": 2, "l2sp_alpha": 0.01}  # fmt: skip
    trainer = tlt._run_training(point, settings, [])
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert "GradualUnfreezingCallback" in names
    assert "L2SPCallback" in names
    assert trainer.state.epoch == 1.0
    # gradual unfreezing never trains more than the strategy does: block 0 and the embeddings stay frozen
    frozen = [n for n, p in trainer.model.named_parameters() if not p.requires_grad]
    assert any(n.startswith("bert.encoder.layer.0.") for n in frozen)
    assert any(n.startswith("bert.embeddings.") for n in frozen)


def test_absolute_storage_path():
    assert tlt.absolute_storage_path("results") == str(Path.cwd() / "results")
    assert tlt.absolute_storage_path("s3://bucket/results") == "s3://bucket/results"


def _rows(settings):
    base = {"strategy": "layers", "lr_decay": 1.0, "reinit_top_k": 1}
    return [
        tlt._row("a", {**base, "learning_rate": 1e-4, "freeze_bottom_blocks": 2}, "TERMINATED",
                 {"training_iteration": 2, "eval_accuracy": 0.80, "time_total_s": 3.0}, None, settings),
        tlt._row("b", {**base, "learning_rate": 3e-4, "freeze_bottom_blocks": 1}, "TERMINATED",
                 {"training_iteration": 1, "eval_accuracy": 0.90, "time_total_s": 1.0}, None, settings),
        tlt._row("c", {**base, "learning_rate": 2e-5, "strategy": "full"}, "TERMINATED",
                 {"training_iteration": 2, "eval_accuracy": 0.70, "time_total_s": 3.0}, None, settings),
        tlt._row("d", {**base, "learning_rate": 1e-3, "freeze_bottom_blocks": 9}, "ERROR", {},
                 "Traceback ...\nValueError: `freeze_bottom_blocks`=9 exceeds the number of blocks", settings),
    ]  # fmt: skip


def test_results_table_csv_plot_and_best_config(tmp_path):
    pytest.importorskip("matplotlib")
    settings = tlt.SearchSettings(num_blocks=4, max_epochs=2, train_size=100)
    rows = _rows(settings)
    assert [r["status"] for r in rows] == ["completed", "stopped early", "completed", "failed"]
    table = tlt.format_results_table(rows, "eval_accuracy")
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["trial", "status", "epochs", "learning_rate"]
    assert [line.split()[0] for line in lines[2:]] == ["b", "a", "c", "d"]  # best first, failed last
    assert "ValueError: `freeze_bottom_blocks`=9" in lines[-1]

    import csv

    written = list(csv.DictReader(tlt.write_results_csv(rows, tmp_path / "r.csv", "eval_accuracy").open()))
    assert [r["trial"] for r in written] == ["a", "b", "c", "d"]
    assert json.loads(written[0]["config"])["freeze_bottom_blocks"] == 2
    png = tlt.plot_results(rows, tmp_path / "r.png", "eval_accuracy")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the best is the best trial that ran every epoch ("b" was stopped early after 1 epoch)
    best = tlt.save_best(rows, settings, tmp_path)
    assert (best["trial"], best["learning_rate"]) == ("a", 1e-4)
    assert TransferConfig.load(tmp_path / "best.yaml") == TransferConfig(
        strategy="layers", freeze_bottom_blocks=2
    )
    saved = json.loads((tmp_path / "best_training_args.json").read_text())
    assert saved["command"] == best["command"]
    command = shlex.split(best["command"])
    assert command[:4] == ["tl-plugin", "train", "--transfer_config", str(tmp_path / "best.yaml")]
    assert command[command.index("--learning_rate") + 1] == "0.0001"

    from tl_plugin.cli import parse_train_args

    options = parse_train_args(command[2:])
    assert options.transfer == TransferConfig(strategy="layers", freeze_bottom_blocks=2)
    assert (options.training.learning_rate, options.training.num_train_epochs) == (1e-4, 2.0)


# ---------------------------------------------------------------------------------------------- real local Ray
def _final_epoch_eval(run_dir: Path, metric: str) -> float:
    (state,) = run_dir.glob("checkpoint-*/trainer_state.json")
    evals = [h for h in json.loads(state.read_text())["log_history"] if metric in h]
    return evals[-1][metric]


@pytest.mark.ray
def test_asha_search_stops_trials_early_and_the_best_config_reproduces(ray_env, tiny_model_dir, tmp_path):
    recipe = _load_recipe("tune_search")
    out = tmp_path / "search"
    # Trials run one at a time, the default config (lr 1e-4) first, then 3 sampled ones with 10-100x smaller
    # learning rates: after one epoch the first sampled trial is worse than the default, so ASHA (a rung at epoch
    # 1, keep the top half) must stop it. The order is fixed, so the test is deterministic.
    args = ["--num-samples", "4", "--max-epochs", "2", "--max-concurrent", "1",
            "--lr-min", "1e-6", "--lr-max", "1e-5"]  # fmt: skip
    summary = recipe.run_search(_search_args(tiny_model_dir, out, *args))
    assert not ray_env.is_initialized()  # the recipe shut down the local Ray it started
    rows = summary["rows"]
    assert summary["complete"]
    assert len(rows) == 4
    statuses = [r["status"] for r in rows]
    assert "stopped early" in statuses, tlt.format_results_table(rows, "eval_loss", "min")
    assert all(r["epochs"] < 2 for r in rows if r["status"] == "stopped early")
    assert all(r["epochs"] == 2 for r in rows if r["status"] == "completed")
    assert sum(
        r["strategy"] == "layers" and r["frozen_blocks"] == 1 and r["learning_rate"] == 1e-4 for r in rows
    )

    import csv

    with open(summary["csv"]) as handle:
        assert sorted(r["trial"] for r in csv.DictReader(handle)) == sorted(r["trial"] for r in rows)
    assert Path(summary["plot"]).read_bytes()[:4] == b"\x89PNG"
    best = summary["best"]
    TransferConfig.load(best["transfer_config"])  # a valid transfer config file

    # the final command, run as printed, reproduces the best trial's metric (same data, seed and schedule)
    from tl_plugin.cli import main as tl_plugin_main

    command = shlex.split(best["command"])
    assert command[:2] == ["tl-plugin", "train"]
    assert tl_plugin_main(command[1:]) == 0
    reproduced = _final_epoch_eval(Path(command[command.index("--output_dir") + 1]), "eval_loss")
    assert math.isclose(reproduced, best["value"], rel_tol=0, abs_tol=2e-3), (reproduced, best["value"])


@pytest.mark.ray
def test_a_failing_trial_is_recorded_and_the_search_goes_on(ray_env, tiny_model_dir, tmp_path, monkeypatch):
    from ray import tune

    from tl_plugin.tune.csv_callback import ResultsCSVCallback

    # Ray puts the driver's working directory first on the workers' sys.path: leave the repo, so that the workers
    # import the tl_plugin shipped to them (as on a cluster node, which has no checkout)
    monkeypatch.chdir(tmp_path)

    settings = tlt.SearchSettings(
        num_blocks=TINY_BLOCKS,
        model_path=tiny_model_dir,
        train_size=64,
        max_epochs=1,
        metric="eval_loss",
        mode="min",
    )
    space = {
        "learning_rate": 1e-3,
        "strategy": "layers",
        "freeze_bottom_blocks": tune.grid_search([99, 1]),  # 99 > the model's 3 blocks: the trial raises
        "lr_decay": 1.0,
    }
    csv_path = tmp_path / "results.csv"
    with tlt.ray_session(num_cpus=2, ship_package=True, log_to_driver=False):
        trainable = tune.with_resources(
            tune.with_parameters(tlt.train_transfer_trial, settings=settings.to_dict()), {"cpu": 1}
        )
        grid = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="eval_loss", mode="min", trial_dirname_creator=tlt.trial_dirname
            ),
            run_config=tune.RunConfig(
                name="failing",
                storage_path=str(tmp_path / "ray_results"),
                callbacks=[ResultsCSVCallback(csv_path, settings.to_dict())],
                verbose=0,
            ),
        ).fit()

        # the package is importable in the workers: here from the copy shipped with runtime_env py_modules
        @ray_env.remote(num_cpus=0)
        def where_is_tl_plugin() -> str:
            import tl_plugin

            return tl_plugin.__file__

        worker_file = ray_env.get(where_is_tl_plugin.remote())
    assert worker_file != str(Path(tlt.__file__).parents[1] / "__init__.py")
    assert "runtime_resources" in worker_file

    rows = tlt.rows_from_results(grid, settings)
    by_status = {r["status"]: r for r in rows}
    assert sorted(by_status) == ["completed", "failed"]
    assert "exceeds the number of blocks" in by_status["failed"]["error"]
    assert by_status["completed"]["eval_loss"] > 0
    import csv

    written = {r["status"]: r for r in csv.DictReader(csv_path.open())}  # the callback's incremental CSV
    assert sorted(written) == ["completed", "failed"]
    assert "exceeds the number of blocks" in written["failed"]["error"]


def _interrupt_after_first_trial(flag: Path):
    """A Tune callback that presses Ctrl-C (SIGINT to this process) once, when the first trial completes."""
    from ray import tune

    class InterruptOnce(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            if not flag.exists():  # the callback is restored with the experiment: interrupt only once
                flag.write_text(trial.trial_id)
                os.kill(os.getpid(), signal.SIGINT)

    return InterruptOnce()


@pytest.mark.ray
def test_an_interrupted_search_resumes_without_rerunning_finished_trials(ray_env, tiny_model_dir, tmp_path):
    recipe = _load_recipe("tune_search")
    out = tmp_path / "search"
    flag = tmp_path / "interrupted"
    args = _search_args(
        tiny_model_dir, out, "--num-samples", "3", "--max-epochs", "1", "--max-concurrent", "1"
    )
    first = recipe.run_search(args, extra_callbacks=[_interrupt_after_first_trial(flag)])
    assert flag.exists()
    assert not first["complete"]
    done_first = [r["trial"] for r in first["rows"] if r["status"] == "completed"]
    assert done_first == [flag.read_text()]
    trial_dir = Path(first["experiment_path"]) / f"trial_{done_first[0]}"
    before = (trial_dir / "result.json").read_text()
    assert len(before.splitlines()) == 1

    resumed = recipe.run_search(_search_args(tiny_model_dir, out, "--resume"))
    assert resumed["complete"]
    assert sorted(r["status"] for r in resumed["rows"]) == ["completed"] * 3
    assert (trial_dir / "result.json").read_text() == before  # the finished trial was not run again
    assert resumed["best"] is not None
    assert Path(out / "best.yaml").is_file()

    # a new search over the same experiment is refused (before anything is overwritten)
    saved = (out / "search.json").read_text()
    with pytest.raises(UsageError, match="pass --resume"):
        recipe.run_search(_search_args(tiny_model_dir, out, "--num-samples", "5"))
    assert (out / "search.json").read_text() == saved


@pytest.mark.ray
def test_trainer_hyperparameter_search_passes_transfer_keys_to_model_init(ray_env, tiny_model_dir, tmp_path):
    from ray import tune

    recipe = _load_recipe("tune_hp_search")
    args = recipe.build_parser().parse_args(
        ["--model-path", tiny_model_dir, "--output-dir", str(tmp_path / "hp"), "--train-size", "64",
         "--max-epochs", "1", "--n-trials", "1", "--metric", "eval_accuracy", "--mode", "max", "--quiet-workers",
         "--verbose", "0"]
    )  # fmt: skip

    def hp_space(trial):
        # not TrainingArguments fields: they only reach the model through model_init (99 blocks: it raises)
        return {
            "learning_rate": tune.grid_search([1e-3, 2e-3]),
            "strategy": "layers",
            "freeze_bottom_blocks": tune.grid_search([TINY_BLOCKS, 99]),
            "lr_decay": 0.8,
        }

    summary = recipe.run_hp_search(args, hp_space=hp_space)
    rows = summary["rows"]
    assert len(rows) == 4
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 2
    assert all("exceeds the number of blocks" in r["error"] for r in failed)
    done = [r for r in rows if r["status"] == "completed"]
    assert {r["frozen_blocks"] for r in done} == {TINY_BLOCKS}
    assert all(r["lr_decay"] == 0.8 for r in done)
    assert summary["best_run"].hyperparameters["freeze_bottom_blocks"] == TINY_BLOCKS
    assert TransferConfig.load(summary["best"]["transfer_config"]) == TransferConfig(
        strategy="layers", freeze_bottom_blocks=TINY_BLOCKS, lr_decay=0.8
    )
    # the plot's baseline: the share of the most frequent label among the validation reviews the trials evaluate on
    from collections import Counter

    from tl_plugin.data import load_fine_food_reviews

    labels = load_fine_food_reviews(train_size=64, test_size=1, seed=42)["validation"]["label"]
    assert summary["majority_rate"] == max(Counter(labels).values()) / len(labels)


# ---------------------------------------------------------------------------------------------- real model (slow)
@pytest.mark.slow
@pytest.mark.ray
def test_real_model_search_finds_a_config_that_beats_the_default(ray_env, tmp_path):
    """all-MiniLM-L6-v2 on the fine-food reviews: 8 trials x 2 epochs on 400 reviews (about 10 minutes on 2 CPUs).

    The best config's final run (the printed command) must beat the default config of ``tl-plugin train`` (bottom
    half frozen, lr 1e-4; same data, epochs and seed) on the 500 test reviews. Set ``TL_TUNE_RECORD_DIR`` to keep
    the outputs (the numbers in docs/hyperparameter-search.md come from such a run).
    """
    import time

    from tl_plugin.cli import main as tl_plugin_main

    record = Path(os.environ.get("TL_TUNE_RECORD_DIR") or tmp_path)
    recipe = _load_recipe("tune_search")
    started = time.perf_counter()
    args = recipe.build_parser().parse_args(
        ["--num-samples", "8", "--max-epochs", "2", "--train-size", "400", "--output-dir", str(record / "search"),
         "--quiet-workers"]
    )  # fmt: skip
    summary = recipe.run_search(args)
    search_s = time.perf_counter() - started
    assert summary["complete"]
    best = summary["best"]

    command = shlex.split(best["command"])
    best_metrics = tl_plugin_main(command[1:]) == 0 and json.loads(
        (Path(command[command.index("--output_dir") + 1]) / "metrics.json").read_text()
    )
    default_dir = record / "default-run"
    default_command = ["train", "--learning_rate", "1e-4", "--num_train_epochs", "2", "--seed", "42",
                       "--train_size", "400", "--output_dir", str(default_dir)]  # fmt: skip
    assert tl_plugin_main(default_command) == 0
    default_metrics = json.loads((default_dir / "metrics.json").read_text())
    (record / "real_run.json").write_text(
        json.dumps(
            {
                "search_wall_time_s": round(search_s, 1),
                "best_trial": best,
                "best_test_accuracy": best_metrics["test_accuracy"],
                "default_test_accuracy": default_metrics["test_accuracy"],
                "best_final_run_s": best_metrics["total_runtime_s"],
                "default_final_run_s": default_metrics["total_runtime_s"],
                "default_command": "tl-plugin " + shlex.join(default_command),
            },
            indent=2,
        )
        + "\n"
    )
    assert best_metrics["test_accuracy"] > default_metrics["test_accuracy"], (best_metrics, default_metrics)


def test_activation_cache_setting_trains_trials_on_cached_activations(tiny_model_dir, tmp_path):
    """With `activation_cache`, a trial trains on the shared cache, and the final command asks for it too."""
    cache_dir = tmp_path / "activations"
    settings = tlt.SearchSettings(
        num_blocks=TINY_BLOCKS, model_path=tiny_model_dir, train_size=32, max_epochs=1,
        activation_cache=True, activation_cache_dir=str(cache_dir),
    )  # fmt: skip
    point = {"learning_rate": 1e-3, "strategy": "layers", "freeze_bottom_blocks": 2, "lr_decay": 1.0}
    trainer = tlt._run_training(point, settings, [])
    cache = next(
        c.cache for c in trainer.callback_handler.callbacks if type(c).__name__ == "ActivationCacheCallback"
    )
    assert cache.frozen_blocks == 2
    assert cache.stats["builds"] == 2  # train and validation
    assert cache.stats["cached_batches"] >= 2
    assert cache.stats["uncached_batches"] == 0
    assert "forward" not in trainer.model.__dict__  # the trial gave the model its own forward back
    again = tlt._run_training(point, settings, [])  # a second trial with the same boundary loads the files
    cache = next(
        c.cache for c in again.callback_handler.callbacks if type(c).__name__ == "ActivationCacheCallback"
    )
    assert (cache.stats["builds"], cache.stats["loads"]) == (0, 2)
    command = tlt.final_command("best.yaml", 1e-3, settings)
    assert command[-4:] == ["--activation_cache", "true", "--activation_cache_dir", str(cache_dir)]


@pytest.mark.ray
def test_search_with_the_activation_cache_shares_files_per_boundary_and_reproduces(
    ray_env, tiny_model_dir, tmp_path
):
    recipe = _load_recipe("tune_search")
    out, cache_dir = tmp_path / "search", tmp_path / "activations"
    # more trials than boundaries (1 ... TINY_BLOCKS), so some trials must share a boundary
    args = ["--num-samples", str(TINY_BLOCKS + 1), "--max-epochs", "1", "--max-concurrent", "1", "--strategies", "layers",
            "--activation-cache", "--activation-cache-dir", str(cache_dir)]  # fmt: skip
    summary = recipe.run_search(_search_args(tiny_model_dir, out, *args))
    rows = summary["rows"]
    assert summary["complete"]
    assert all(r["status"] == "completed" for r in rows), tlt.format_results_table(rows, "eval_loss", "min")
    boundaries = {r["frozen_blocks"] for r in rows}
    assert len(boundaries) < len(rows)
    # one file per boundary and dataset (train, validation), however many trials used it
    assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == 2 * len(boundaries)
    command = shlex.split(summary["best"]["command"])
    assert command[command.index("--activation_cache") + 1] == "true"
    from tl_plugin.cli import main as tl_plugin_main

    assert tl_plugin_main(command[1:]) == 0  # loads the search's cache files, trains as the trial did
    reproduced = _final_epoch_eval(Path(command[command.index("--output_dir") + 1]), "eval_loss")
    assert math.isclose(reproduced, summary["best"]["value"], rel_tol=0, abs_tol=2e-3)
    assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == 2 * len(boundaries) + 1  # + the test split


@pytest.mark.ray
def test_search_on_your_own_csv_prints_a_final_command_with_your_data_that_reproduces(
    ray_env, tiny_model_dir, tmp_path
):
    """``tl-plugin search --train_file ...``: the trials train on the user's CSV (their label names, their
    columns), and the printed ``tl-plugin train`` command carries the data options and reproduces the best trial."""
    import csv

    from tl_plugin.cli import main as tl_plugin_main

    data = tmp_path / "reviews.csv"
    with open(data, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["body", "verdict"])
        for i in range(60):
            writer.writerow([f"{'lovely tasty fresh' if i % 3 else 'stale bland awful'} snack {i}",
                             "keep" if i % 3 else "return"])  # fmt: skip
    out = tmp_path / "search"
    code = tl_plugin_main(
        ["search", "--train_file", str(data), "--text_column", "body", "--label_column", "verdict",
         "--model_name_or_path", tiny_model_dir, "--num_samples", "2", "--max_epochs", "1", "--max_concurrent", "1",
         "--metric", "eval_loss", "--mode", "min", "--output_dir", str(out), "--quiet_workers", "--verbose", "0"]
    )  # fmt: skip
    assert code == 0
    best = json.loads((out / "best_training_args.json").read_text())
    command = shlex.split(best["command"])
    assert command[command.index("--train_file") + 1] == str(data.resolve())
    assert command[command.index("--text_column") + 1] == "body"
    assert "--train_size" not in command  # the demo's option is not carried into an own-data command
    assert tl_plugin_main(command[1:]) == 0
    final = Path(command[command.index("--output_dir") + 1])
    assert json.loads((final / "metrics.json").read_text())["labels"] == ["keep", "return"]
    reproduced = _final_epoch_eval(final, "eval_loss")
    assert math.isclose(reproduced, best["value"], rel_tol=0, abs_tol=2e-3)

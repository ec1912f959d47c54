"""The synthetic-speech transfer recipe (``recipes/speech_commands.py``).

The end-to-end test runs ``--quick`` (3 words, 3 training voices and 2 held-out voices, one accent, 32x32 log-mel,
one epoch; four real `transformers.Trainer` runs of EfficientNet-Lite0): the split has no voice in common, the
results file holds an accuracy per variant, the linear probe leaves every frozen tensor as it was, and a re-run
reuses the cached WAVs and the finished variants. 22-34 s measured on 2 shared cores (load 6-7).

Needs the program ``espeak-ng``; without it the tests that synthesise skip, unless ``TL_PLUGIN_REQUIRE_ESPEAK=1``
(then they fail). The missing-program message is tested without it.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tl_plugin.callbacks.batchnorm import batchnorm_modules
from tl_plugin.vision import EfficientNetLite0ForImageClassification

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "speech_commands.py"
QUICK_COMMAND = ["--quick", "--threads", "1"]  # docs/speech.md's smoke command, plus --output-dir


def _require_espeak() -> None:
    if shutil.which("espeak-ng"):
        return
    reason = "espeak-ng is not installed: apt-get install espeak-ng (or make system-deps)"
    if os.environ.get("TL_PLUGIN_REQUIRE_ESPEAK") == "1":
        pytest.fail(f"{reason} (TL_PLUGIN_REQUIRE_ESPEAK=1 makes this a failure)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("speech_commands_recipe", RECIPE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_mel_filterbank_puts_a_tone_in_the_right_band(recipe):
    sample_rate, n_fft, n_mels = 16_000, 512, 64
    bank = recipe.mel_filterbank(sample_rate, n_fft, n_mels, fmin=20.0)
    assert bank.shape == (n_mels, n_fft // 2 + 1)
    assert (bank >= 0).all()
    assert (bank.sum(axis=1) > 0).all(), "a mel band with no FFT bin"
    centres = recipe.mel_to_hz(np.linspace(recipe.hz_to_mel(20.0), recipe.hz_to_mel(8000.0), n_mels + 2))[
        1:-1
    ]
    assert np.all(np.diff(bank.argmax(axis=1)) >= 0), "band peaks must rise with the band index"
    # Slaney's scale: linear to 1 kHz, 1000 Hz is 15 mels, and it inverts.
    assert recipe.hz_to_mel(1000.0) == pytest.approx(15.0)
    assert recipe.mel_to_hz(recipe.hz_to_mel(np.array([100.0, 3000.0]))) == pytest.approx([100.0, 3000.0])
    for tone in (440.0, 2500.0):
        t = np.arange(sample_rate, dtype=np.float32) / sample_rate
        spec = recipe.log_mel(np.sin(2 * np.pi * tone * t).astype(np.float32), sample_rate)
        assert spec.shape == (recipe.N_MELS, recipe.N_FRAMES)
        assert float(spec.min()) >= 0.0
        assert float(spec.max()) == pytest.approx(1.0)
        loudest = int(spec[:, 32].argmax())
        assert abs(centres[loudest] - tone) < 0.1 * tone, (tone, centres[loudest])


def test_clips_are_split_by_voice_variant(recipe):
    assert not set(recipe.TRAIN_VARIANTS) & set(recipe.TEST_VARIANTS)
    clips = recipe.make_clips(["yes", "no"], ["en-us", "en-gb"], ["m1", "f1"], 3, seed=0)
    assert len(clips) == 2 * 2 * 2 * 3
    per_voice_word = {(c.voice, c.word) for c in clips}
    assert len(per_voice_word) == 8
    assert len({(c.voice, c.word, c.speed, c.pitch) for c in clips}) == len(clips), "repeated (speed, pitch)"
    assert clips == recipe.make_clips(["yes", "no"], ["en-us", "en-gb"], ["m1", "f1"], 3, seed=0)
    assert clips[0].voice == "en-us+m1"
    with pytest.raises(SystemExit, match="--clips-per-word"):
        recipe.make_clips(["yes"], ["en-us"], ["m1"], 10_000, seed=0)


def test_settings_are_checked(recipe):
    parse = recipe.build_parser().parse_args
    with pytest.raises(SystemExit):
        parse(["--runs", "probe,linear"])
    assert parse(["--runs", "scratch,probe"]).runs == ["probe", "scratch"]
    settings = recipe.resolve_settings(parse(["--quick"]))
    assert settings["image_size"] == 32
    assert settings["epochs"] == 1.0
    with pytest.raises(SystemExit, match="--test-voices must be between 1 and 8, got 9"):
        recipe.resolve_settings(parse(["--test-voices", "9"]))
    with pytest.raises(SystemExit, match="--words must be at least 2"):
        recipe.resolve_settings(parse(["--words", "1"]))


@pytest.mark.parametrize("how", ["path", "env"])
def test_without_espeak_the_recipe_stops_with_the_install_command(recipe, tmp_path, monkeypatch, capsys, how):
    if how == "path":
        monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
        monkeypatch.delenv(recipe.ESPEAK_ENV, raising=False)
    else:
        monkeypatch.setenv(recipe.ESPEAK_ENV, "espeak-ng-that-does-not-exist")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as excinfo:
        recipe.main([*QUICK_COMMAND, "--output-dir", str(out)])
    message = str(excinfo.value.code)
    assert "\n" not in message
    assert "espeak-ng" in message
    assert "apt-get install espeak-ng" in message
    assert "make system-deps" in message
    assert not out.exists(), "nothing is written before the check"


def test_quick_run_end_to_end(recipe, tmp_path):
    _require_espeak()
    out = tmp_path / "speech"
    argv = [*QUICK_COMMAND, "--output-dir", str(out)]
    pretrained = EfficientNetLite0ForImageClassification.from_pretrained_lite0(num_labels=3)
    reference = {n: p.detach().clone() for n, p in pretrained.named_parameters()}
    reference_bn = {
        name: {k: b.detach().clone() for k, b in module.named_buffers(recurse=False)}
        for name, module in batchnorm_modules(pretrained).items()
    }
    seen: dict[str, dict[str, torch.Tensor]] = {}

    def keep(name, model, result):
        seen[name] = {n: t.detach().clone() for n, t in model.state_dict().items()}

    results = recipe.main(argv, on_variant_end=keep)
    speaker = recipe.resemblyzer_checkpoint_path() is not None
    expected = ["probe", "partial_bn", "full", "scratch"]
    expected += ["speaker_probe", "speaker_top", "speaker_full", "speaker_scratch"] if speaker else []

    # The split: no voice, and no voice variant, is in both.
    split = results["split"]
    assert split["voice_overlap"] == []
    assert split["variant_overlap"] == []
    assert not set(split["train_voices"]) & set(split["test_voices"])
    assert len(split["train_voices"]) == 3
    assert len(split["test_voices"]) == 2
    assert split["train_clips"] == 3 * 3 * 2
    assert split["test_clips"] == 2 * 3 * 2
    wavs = sorted((out / "wavs").rglob("*.wav"))
    assert len(wavs) == split["train_clips"] + split["test_clips"]
    voices_on_disk = {p.parent.name for p in wavs}
    assert voices_on_disk == set(split["train_voices"]) | set(split["test_voices"])

    # The results file: an accuracy per variant, on the held-out voices and on the training voices.
    saved = json.loads((out / "results.json").read_text())
    assert saved["synthetic_speech"] is True
    assert list(saved["variants"]) == expected
    assert saved["chance"] == pytest.approx(1 / 3, abs=1e-4)
    for row in saved["variants"].values():
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert 0.0 <= row["train_voices_accuracy"] <= 1.0
        assert set(row["test_accuracy_per_voice"]) == set(split["test_voices"])
        assert row["steps"] == 1
    with (out / "results.csv").open() as handle:
        assert [r["variant"] for r in csv.DictReader(handle)] == expected
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Linear probe: only the classifier changed; every frozen tensor (BatchNorm statistics too) is as loaded.
    probe = seen["probe"]
    assert saved["variants"]["probe"]["trainable_params"] == 1280 * 3 + 3
    assert saved["variants"]["probe"]["bn_layers_stats_changed"] == 0
    for name, tensor in reference.items():
        if name.startswith("classifier."):
            continue
        assert torch.equal(probe[name], tensor), f"the linear probe changed the frozen {name}"
    for layer, buffers in reference_bn.items():
        for key, tensor in buffers.items():
            assert torch.equal(probe[f"{layer}.{key}"], tensor), f"the linear probe changed {layer}.{key}"
    initial, _ = recipe.build_model(recipe.VARIANTS["probe"], 3, ["yes", "no", "up"], seed=0)
    assert not torch.equal(probe["classifier.weight"], initial.classifier.weight), "the probe did not train"
    # ... whereas the full fine-tune moved the backbone.
    assert not torch.equal(seen["full"]["stem.conv.weight"], reference["stem.conv.weight"])

    if speaker:  # the speaker encoder's probe: LSTM layers and projection as loaded, the classifier trained
        encoder = recipe.SpeakerEncoderForWordClassification.from_resemblyzer(3)
        changed = [n for n, t in encoder.state_dict().items() if not torch.equal(seen["speaker_probe"][n], t)]
        assert changed == ["classifier.weight", "classifier.bias"]
        assert saved["variants"]["speaker_probe"]["trainable_groups"] == ["head"]
        top = seen["speaker_top"]
        assert torch.equal(top["lstm.1.weight_hh_l0"], encoder.state_dict()["lstm.1.weight_hh_l0"])
        assert not torch.equal(top["lstm.2.weight_hh_l0"], encoder.state_dict()["lstm.2.weight_hh_l0"])

    # A re-run synthesises nothing and trains nothing.
    mtimes = {p: p.stat().st_mtime_ns for p in wavs}
    trained: list[str] = []
    recipe.main(argv, on_variant_end=lambda name, model, result: trained.append(name))
    assert trained == []
    assert {p: p.stat().st_mtime_ns for p in wavs} == mtimes


def _require_resemblyzer(recipe) -> None:
    if recipe.resemblyzer_checkpoint_path() is not None:
        return
    reason = "resemblyzer is not installed: pip install --no-deps resemblyzer==0.1.4"
    if os.environ.get("TL_PLUGIN_REQUIRE_RESEMBLYZER") == "1":
        pytest.fail(f"{reason} (TL_PLUGIN_REQUIRE_RESEMBLYZER=1 makes this a failure)")
    pytest.skip(reason)


def test_speaker_encoder_weights_load_into_discoverable_layers_and_tell_voices_apart(recipe, tmp_path):
    """resemblyzer's weights, renamed, load completely; discovery finds its 3 LSTM layers; its embeddings of
    one voice saying different words are closer than those of different voices (what a speaker encoder is for),
    and a randomly initialised copy does not separate them."""
    _require_espeak()
    _require_resemblyzer(recipe)
    from tl_plugin import discover_layer_groups

    checkpoint = torch.load(recipe.resemblyzer_checkpoint_path(), map_location="cpu", weights_only=True)
    converted = recipe.convert_resemblyzer_state_dict(checkpoint["model_state"])
    assert len(converted) == len(checkpoint["model_state"]) - 2  # the GE2E loss's similarity weight and bias
    model = recipe.SpeakerEncoderForWordClassification.from_resemblyzer(num_labels=4).eval()
    for key, tensor in converted.items():
        assert torch.equal(model.state_dict()[key], tensor), key
    assert discover_layer_groups(model).names == ["blocks.0", "blocks.1", "blocks.2", "other", "head"]

    clips = recipe.make_clips(["yes", "no", "left", "stop"], ["en-us"], ["m1", "f1", "klatt"], 1, seed=0)
    recipe.synthesise(clips, tmp_path)
    features = torch.stack(
        [recipe.speaker_mel(recipe.centre_word(recipe.load_wav(tmp_path / c.filename))) for c in clips]
    )
    assert features.shape == (len(clips), recipe.SPEAKER_FRAMES, recipe.SPEAKER_N_MELS)
    voice = torch.tensor([[a.variant == b.variant for b in clips] for a in clips])
    off_diagonal = ~torch.eye(len(clips), dtype=torch.bool)

    def similarities(encoder):
        with torch.no_grad():
            x = features
            for layer in encoder.lstm:
                x, (h, _) = layer(x)
            e = torch.nn.functional.normalize(torch.relu(encoder.projection(h[-1])), dim=1)
        sim = e @ e.T
        return float(sim[voice & off_diagonal].mean()), float(sim[~voice].mean())

    same, other = similarities(model)
    assert same > other + 0.05, (same, other)
    torch.manual_seed(0)
    same, other = similarities(recipe.SpeakerEncoderForWordClassification(num_labels=4))
    assert abs(same - other) < 0.05, (same, other)


def test_speaker_variants_without_resemblyzer_stop_with_the_install_command(recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "resemblyzer_checkpoint_path", lambda: None)
    with pytest.raises(SystemExit, match="pip install --no-deps resemblyzer==0.1.4"):
        recipe.main([*QUICK_COMMAND, "--runs", "speaker_probe", "--output-dir", str(tmp_path)])


@pytest.mark.slow
def test_default_run_transfers_to_held_out_voices(recipe, tmp_path):
    """docs/speech.md's full command (all variants, 720 / 240 clips, 64x64, 3 epochs): 5-15 min on 2 cores."""
    _require_espeak()
    results = recipe.main(["--threads", "2", "--output-dir", str(tmp_path / "speech")])
    split = results["split"]
    assert (split["train_clips"], split["test_clips"]) == (720, 240)
    assert split["voice_overlap"] == []
    assert split["variant_overlap"] == []
    variants = results["variants"]
    chance = results["chance"]
    for name in ("probe", "full"):
        assert variants[name]["test_accuracy"] > 5 * chance, (name, variants[name]["test_accuracy"])

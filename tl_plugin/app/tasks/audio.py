"""Audio classification: one label per recording, from an audio folder or an audio column.

Data:

- ``--train_dir`` (``--validation_dir``, ``--test_dir``): one sub-folder per class of audio files (``.wav``,
  ``.flac``, ``.ogg``, ``.mp3`` ...), read by `load_audio_folders` into an ``audio`` column (the
  `datasets.Audio` feature, not decoded) and a `datasets.ClassLabel` ``label`` column (the sub-folder names).
  `datasets`' own ``audiofolder`` builder is not used: it needs ``torchcodec`` (and FFmpeg) even to list files;
- ``--dataset_dir`` / ``--dataset_name``: a column with the `datasets.Audio` feature (embedded bytes or paths);
- ``--train_file`` (CSV, JSON/JSONL, Parquet): a column of audio file paths (``--audio_column``, detected when its
  first values end in an audio extension); relative paths as for images (next to the split's file, next to
  ``--train_file``, then the current folder).

Audio is decoded with ``soundfile`` (libsndfile: WAV, FLAC, OGG/Vorbis, Opus, MP3 with libsndfile >= 1.1),
mixed down to mono, resampled to the feature extractor's ``sampling_rate`` (``scipy.signal.resample_poly``) and
cut to the first `MAX_AUDIO_SECONDS` seconds. `AudioClassification.preprocess` opens every file once (header and
length), so an unreadable or empty file stops the run before training with its path; the collator
(`AudioClassificationCollator`) decodes each batch and runs the feature extractor (padding to the batch's longest
clip where the extractor pads).

Model: there is no bundled audio model. ``--model_name_or_path`` is a local Hugging Face audio classification
model folder with its feature extractor (``AutoFeatureExtractor`` + ``AutoModelForAudioClassification``: wav2vec2,
HuBERT, WavLM, AST, Whisper encoders ...).
"""

from __future__ import annotations

import inspect
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data import _AUDIO_SUFFIXES, LABEL_COLUMN_CANDIDATES, detect_column, load_audio_folders
from ..errors import DataError, UsageError
from .base import Columns, LabelInfo, Task
from .image import (
    SingleLabelMetrics,
    describe_reference,
    finish_splits,
    media_references,
    pick_media_column,
    single_label_names,
    single_label_report,
)
from .models import check_model_folder, load_pretrained

__all__ = [
    "AUDIO_COLUMN_CANDIDATES",
    "MAX_AUDIO_SECONDS",
    "AudioClassification",
    "AudioClassificationCollator",
    "load_audio_folders",
    "load_waveform",
]

#: Longer recordings are cut to their first this many seconds (in training, evaluation and the report).
MAX_AUDIO_SECONDS = 10.0
#: Column names tried, in order, when no column has the `datasets.Audio` feature and ``--audio_column`` is unset.
AUDIO_COLUMN_CANDIDATES: tuple[str, ...] = (
    "audio",
    "speech",
    "sound",
    "wav",
    "audio_path",
    "audio_file",
    "filepath",
    "file_path",
    "path",
    "file",
    "filename",
)
#: The column `AudioClassification.preprocess` writes (one ``{"bytes", "path"}`` reference per row) when the
#: feature extractor does not name its input; otherwise the extractor's first ``model_input_names`` entry
#: (``input_values``, ``input_features``), so that the `Trainer` keeps it for the collator.
DEFAULT_REFERENCE_COLUMN = "input_values"


# ------------------------------------------------------------------------------------------------- folders
# ------------------------------------------------------------------------------------------------- decoding
def _source(reference: Mapping[str, Any]) -> Any:
    data = reference.get("bytes")
    return io.BytesIO(data) if data else reference["path"]


def load_waveform(
    audio: Any, sampling_rate: int, max_seconds: float | None = MAX_AUDIO_SECONDS, where: str | None = None
) -> np.ndarray:
    """Decode one recording as mono float32 at `sampling_rate`, cut to its first `max_seconds` seconds.

    Args:
        audio: a ``{"bytes", "path"}`` reference (as in a `datasets.Audio` column with ``decode=False``), a path,
            or a ``{"array", "sampling_rate"}`` dict.
        sampling_rate (`int`): the rate to resample to (the feature extractor's ``sampling_rate``).
        max_seconds (`float`, *optional*): cut longer recordings (`None`: keep everything).
        where (`str`, *optional*): how to name the recording in errors when it has no path.

    Returns:
        `np.ndarray`: 1-D float32 samples.

    Raises:
        DataError: the file cannot be decoded (its path is named).

    Example:

    ```python
    >>> import io
    >>> import numpy as np
    >>> import soundfile as sf
    >>> from tl_plugin.app.tasks.audio import load_waveform
    >>> buffer = io.BytesIO()
    >>> sf.write(buffer, np.zeros(8000, dtype="float32"), 8000, format="WAV")
    >>> load_waveform({"bytes": buffer.getvalue(), "path": None}, sampling_rate=16000).shape
    (16000,)

    ```
    """
    import soundfile as sf

    if isinstance(audio, Mapping) and "array" in audio:
        samples = np.asarray(audio["array"], dtype=np.float32)
        native = int(audio["sampling_rate"])
        if samples.ndim == 2:
            samples = samples.mean(axis=0 if samples.shape[0] < samples.shape[1] else 1)
    else:
        reference = audio if isinstance(audio, Mapping) else {"bytes": None, "path": str(audio)}
        name = describe_reference(reference, where or "an embedded recording")
        try:
            with sf.SoundFile(_source(reference)) as handle:
                native = int(handle.samplerate)
                frames = -1 if max_seconds is None else int(math.ceil(max_seconds * native))
                data = handle.read(frames=frames, dtype="float32", always_2d=True)
        except Exception as err:  # noqa: BLE001  (libsndfile errors come in several types)
            raise DataError(f"cannot read the audio file {name}: {err}; remove or replace the file") from err
        samples = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if max_seconds is not None:
        samples = samples[: int(math.ceil(max_seconds * native))]
    if native != sampling_rate and samples.size:
        from scipy.signal import resample_poly

        common = math.gcd(native, int(sampling_rate))
        samples = resample_poly(samples, int(sampling_rate) // common, native // common)
    return np.ascontiguousarray(samples, dtype=np.float32)


def _check_audio(reference: dict[str, Any]) -> str | None:
    import soundfile as sf

    try:
        with sf.SoundFile(_source(reference)) as handle:
            if handle.frames == 0:
                return "no samples"
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    return None


def reference_column(processor: Any) -> str:
    """The name of the feature extractor's main input (``input_values``, ``input_features`` ...)."""
    names = list(getattr(processor, "model_input_names", None) or [])
    return str(names[0]) if names else DEFAULT_REFERENCE_COLUMN


def _sampling_rate(processor: Any) -> int:
    rate = getattr(processor, "sampling_rate", None)
    if not rate:
        raise UsageError(
            f"the feature extractor {type(processor).__name__} has no sampling_rate; save the model's "
            f"feature extractor (with its sampling_rate) in the model folder"
        )
    return int(rate)


class AudioClassificationCollator:
    """Decodes the recordings of a batch (``{"bytes", "path"}`` references, as written by
    `AudioClassification.preprocess`), resamples them and runs the feature extractor.

    Args:
        processor: the feature extractor (``sampling_rate``, ``model_input_names``).
        max_seconds (`float`, *optional*, defaults to `MAX_AUDIO_SECONDS`): recordings are cut to this length.
        accepted (`Sequence[str]`, *optional*): the argument names of the model's ``forward``; extractor outputs
            it does not take (e.g. an ``attention_mask``) are dropped.

    Returns (per call):
        `dict[str, torch.Tensor]`: the extractor's outputs (``input_values`` ...) and, when the rows have them,
        ``labels``.
    """

    def __init__(
        self,
        processor: Any,
        max_seconds: float | None = MAX_AUDIO_SECONDS,
        accepted: Sequence[str] | None = None,
    ) -> None:
        self.processor = processor
        self.max_seconds = max_seconds
        self.accepted = set(accepted) if accepted is not None else None
        self.column = reference_column(processor)
        self.sampling_rate = _sampling_rate(processor)
        padding = inspect.signature(processor.__call__).parameters.get("padding")
        # Pad to the longest clip of the batch where the extractor's default is no padding (wav2vec2 and the
        # like); extractors with a fixed input size (Whisper: 30 s) or their own padding keep their defaults.
        self.extra: dict[str, Any] = (
            {"padding": "longest"} if padding is not None and padding.default is False else {}
        )

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        waves = [load_waveform(f[self.column], self.sampling_rate, self.max_seconds) for f in features]
        encoded = self.processor(waves, sampling_rate=self.sampling_rate, return_tensors="pt", **self.extra)
        keep = (
            self.accepted
            if self.accepted is not None
            else set(getattr(self.processor, "model_input_names", []))
        )
        batch: dict[str, Any] = {k: v for k, v in encoded.items() if k == self.column or k in keep}
        if features and "labels" in features[0]:
            batch["labels"] = torch.as_tensor([int(f["labels"]) for f in features], dtype=torch.long)
        return batch


class AudioClassification(Task):
    """Single-label audio classification with an ``AutoModelForAudioClassification`` folder (no bundled model)."""

    name = "audio-classification"
    expects = "an audio folder (one sub-folder per class) or an audio column and a label column"

    def __init__(self) -> None:
        self._accepted: list[str] | None = None

    @classmethod
    def looks_like(cls, dataset: Any) -> bool:
        from .image import media_paths_column

        try:
            from datasets import Audio

            if any(isinstance(f, Audio) for f in dataset.features.values()):
                return True
        except Exception:  # noqa: BLE001
            return False
        return bool(media_paths_column(dataset, _AUDIO_SUFFIXES))

    def resolve_columns(self, dataset: Any, args: Any) -> Columns:
        from datasets import Audio

        audio = pick_media_column(
            dataset,
            args.audio_column,
            "audio_column",
            Audio,
            _AUDIO_SUFFIXES,
            AUDIO_COLUMN_CANDIDATES,
            "audio",
        )
        label = detect_column(dataset, args.label_column, "label_column", LABEL_COLUMN_CANDIDATES, "labels")
        if label == audio:
            raise DataError(f"the label column {label!r} is also the audio column; pass --label_column")
        return Columns(input=audio, label=label)

    def label_info(self, data: Any, columns: Columns) -> LabelInfo:
        return single_label_names(data, columns.label, "audio")

    # ----------------------------------------------------------------------------------------------- model
    def default_model_path(self) -> str:
        raise UsageError(
            "audio-classification has no bundled model: pass --model_name_or_path, a local folder of a Hugging "
            "Face audio classification model saved with its feature extractor (wav2vec2, HuBERT, AST ...)"
        )

    def load_processor(self, model_path: str, args: Any) -> Any:
        from transformers import AutoFeatureExtractor

        check_model_folder(model_path)
        try:
            processor = AutoFeatureExtractor.from_pretrained(
                model_path, trust_remote_code=bool(getattr(args, "trust_remote_code", False))
            )
        except (OSError, ValueError) as err:
            raise UsageError(
                f"--model_name_or_path {model_path!r}: no feature extractor could be loaded "
                f"({str(err).splitlines()[0]}); the folder needs the preprocessor_config.json that "
                f"feature_extractor.save_pretrained(folder) writes"
            ) from err
        _sampling_rate(processor)
        return processor

    def load_model(self, model_path: str, labels: LabelInfo, args: Any) -> Any:
        from transformers import AutoModelForAudioClassification

        model = load_pretrained(AutoModelForAudioClassification, model_path, args, **labels.model_kwargs())
        self._accepted = list(inspect.signature(model.forward).parameters)
        return model

    # ----------------------------------------------------------------------------------------------- training
    def preprocess(self, data: Any, processor: Any, columns: Columns, labels: LabelInfo, args: Any) -> Any:
        from datasets import Audio

        checked = media_references(data, columns.input, args, "audio", Audio, _check_audio)
        return finish_splits(checked, columns.input, labels, columns.label, reference_column(processor))

    def data_collator(self, processor: Any) -> Any:
        return AudioClassificationCollator(processor, MAX_AUDIO_SECONDS, self._accepted)

    def compute_metrics(self, labels: LabelInfo) -> Callable[[Any], dict[str, float]]:
        return SingleLabelMetrics(labels.names)

    def report(self, prediction: Any, labels: LabelInfo, out_dir: Path | None) -> dict[str, Any]:
        return single_label_report(prediction, labels, out_dir)

    def supports_activation_cache(self) -> bool:
        return False

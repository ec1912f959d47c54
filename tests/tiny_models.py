"""Tiny, randomly initialised models of every architecture family the core is specified against.

Import it from any test module (pytest puts ``tests/`` on ``sys.path``)::

    from tiny_models import TINY_MODELS, TINY_MODEL_SPECS, build_tiny_model

    model = build_tiny_model("bert")            # seeded: the same weights on every call
    spec = TINY_MODEL_SPECS["bert"]             # what discovery must find on it
    assert discover_layer_groups(model).names == list(spec.group_names)

Every model is a few thousand parameters (hidden size 32, 2 attention heads, vocabulary 99) and builds in well
under a second, so whole-matrix parametrized tests stay fast. Nothing is downloaded: the models are built from
their configs. Encoder-decoder models have 2 encoder and 3 decoder layers, so that an ordering mistake between
the two stacks shows up in the block numbering.

The expectations are written out by hand from each architecture's module tree (not computed by the code under
test):

- `TinyModelSpec.group_names`: the group names `discover_layer_groups` returns, in order;
- `TinyModelSpec.stacks`: the block stacks, as ``(module path, number of blocks)`` in numbering order;
- `TinyModelSpec.head_modules`: the module paths of the task head added on top of the pretrained base model
  (``()`` when the model has no separate head, e.g. an LM head tied to the input embeddings).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers as T
from transformers import PreTrainedModel

__all__ = [
    "SEED",
    "TINY_MODELS",
    "TINY_MODEL_SPECS",
    "TinyModelSpec",
    "TINY_BERT_CONFIG",
    "TINY_BERT_GROUP_PREFIXES",
    "block_names",
    "build_lora_bert",
    "build_tiny_bert",
    "build_tiny_model",
    "tiny_bert_params",
]

#: Seed used by every builder: two builds of the same name give bit-identical weights.
SEED = 0

_SMALL = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "vocab_size": 99,
}
_SEQ2SEQ = {
    "d_model": 32,
    "encoder_layers": 2,
    "decoder_layers": 3,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 37,
    "decoder_ffn_dim": 37,
    "vocab_size": 99,
}
_VISION = {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 2, 1], "num_labels": 3}
_WAV2VEC2 = {
    "conv_dim": (8, 8),
    "conv_kernel": (3, 3),
    "conv_stride": (2, 2),
    "num_conv_pos_embeddings": 4,
    "num_conv_pos_embedding_groups": 2,
    **_SMALL,
}


@dataclass(frozen=True)
class TinyModelSpec:
    """A tiny model builder and what layer discovery must find on the model it builds.

    Args:
        build: builds the model (unseeded; use `build_tiny_model` for seeded builds).
        group_names: the expected group names, in order (``embeddings``, ``blocks.i``, ``other``, ``head``).
        stacks: the expected block stacks as ``(module path, block count)``, in numbering order.
        head_modules: module paths of the newly added task head; ``()`` when there is no separate head.
    """

    build: Callable[[], PreTrainedModel]
    group_names: tuple[str, ...]
    stacks: tuple[tuple[str, int], ...]
    head_modules: tuple[str, ...]

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    @property
    def num_blocks(self) -> int:
        return sum(n for _, n in self.stacks)


def block_names(n: int) -> tuple[str, ...]:
    """``("blocks.0", …, "blocks.<n-1>")``."""
    return tuple(f"blocks.{i}" for i in range(n))


def _groups(n_blocks: int, *, other: bool, head: bool) -> tuple[str, ...]:
    return (
        ("embeddings", *block_names(n_blocks)) + (("other",) if other else ()) + (("head",) if head else ())
    )


TINY_MODEL_SPECS: dict[str, TinyModelSpec] = {
    "bert": TinyModelSpec(
        lambda: T.BertForSequenceClassification(T.BertConfig(**_SMALL)),
        _groups(2, other=True, head=True),  # other: the pooler
        (("bert.encoder.layer", 2),),
        ("classifier",),
    ),
    "roberta": TinyModelSpec(
        lambda: T.RobertaForSequenceClassification(T.RobertaConfig(**_SMALL)),
        _groups(2, other=False, head=True),  # built without a pooler
        (("roberta.encoder.layer", 2),),
        ("classifier",),
    ),
    "distilbert": TinyModelSpec(
        lambda: T.DistilBertForSequenceClassification(
            T.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=37, vocab_size=99)
        ),
        _groups(2, other=False, head=True),
        (("distilbert.transformer.layer", 2),),
        ("pre_classifier", "classifier"),
    ),
    "albert": TinyModelSpec(
        # One hidden group (the default): the weights of all hidden layers are shared, so there is one block.
        lambda: T.AlbertForSequenceClassification(T.AlbertConfig(embedding_size=16, **_SMALL)),
        _groups(1, other=True, head=True),
        (("albert.encoder.albert_layer_groups", 1),),
        ("classifier",),
    ),
    "electra": TinyModelSpec(
        lambda: T.ElectraForSequenceClassification(T.ElectraConfig(embedding_size=16, **_SMALL)),
        _groups(2, other=False, head=True),  # embeddings_project goes to embeddings
        (("electra.encoder.layer", 2),),
        ("classifier",),
    ),
    "deberta-v2": TinyModelSpec(
        lambda: T.DebertaV2ForSequenceClassification(T.DebertaV2Config(**_SMALL)),
        _groups(2, other=False, head=True),
        (("deberta.encoder.layer", 2),),
        ("pooler", "classifier"),  # the ContextPooler lives outside the base model
    ),
    "gpt2": TinyModelSpec(
        lambda: T.GPT2ForSequenceClassification(
            T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=99, pad_token_id=0)
        ),
        _groups(2, other=True, head=True),  # other: ln_f
        (("transformer.h", 2),),
        ("score",),
    ),
    "gpt2-lm": TinyModelSpec(
        lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=99)),
        _groups(2, other=True, head=False),  # lm_head is tied to wte: it is the embedding matrix
        (("transformer.h", 2),),
        (),
    ),
    "llama": TinyModelSpec(
        lambda: T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **_SMALL)),
        _groups(2, other=True, head=True),  # Llama does not tie lm_head by default
        (("model.layers", 2),),
        ("lm_head",),
    ),
    "mistral": TinyModelSpec(
        lambda: T.MistralForSequenceClassification(
            T.MistralConfig(num_key_value_heads=2, pad_token_id=0, **_SMALL)
        ),
        _groups(2, other=True, head=True),
        (("model.layers", 2),),
        ("score",),
    ),
    "t5": TinyModelSpec(
        lambda: T.T5ForConditionalGeneration(
            T.T5Config(
                d_model=32, d_ff=37, num_layers=2, num_decoder_layers=3, num_heads=2, d_kv=16, vocab_size=99
            )
        ),
        _groups(5, other=True, head=False),  # other: both final layer norms; lm_head tied to `shared`
        (("encoder.block", 2), ("decoder.block", 3)),
        (),
    ),
    "marian": TinyModelSpec(
        lambda: T.MarianMTModel(T.MarianConfig(pad_token_id=0, decoder_start_token_id=0, **_SEQ2SEQ)),
        _groups(5, other=False, head=False),  # no final norms; lm_head tied to `shared`
        (("model.encoder.layers", 2), ("model.decoder.layers", 3)),
        (),
    ),
    "bart": TinyModelSpec(
        lambda: T.BartForSequenceClassification(T.BartConfig(**_SEQ2SEQ)),
        _groups(5, other=False, head=True),  # layernorm_embedding goes to embeddings
        (("model.encoder.layers", 2), ("model.decoder.layers", 3)),
        ("classification_head",),
    ),
    "vit": TinyModelSpec(
        lambda: T.ViTForImageClassification(
            T.ViTConfig(image_size=32, patch_size=8, **{k: v for k, v in _SMALL.items() if k != "vocab_size"})
        ),
        _groups(2, other=True, head=True),  # other: the final layernorm
        (("vit.layers", 2),),
        ("classifier",),
    ),
    "convnext": TinyModelSpec(
        lambda: T.ConvNextForImageClassification(T.ConvNextConfig(**_VISION)),
        _groups(4, other=True, head=True),  # one block per stage
        (("convnext.encoder.stages", 4),),
        ("classifier",),
    ),
    "resnet": TinyModelSpec(
        lambda: T.ResNetForImageClassification(T.ResNetConfig(embedding_size=8, **_VISION)),
        _groups(4, other=False, head=True),  # the pooler holds no parameters
        (("resnet.encoder.stages", 4),),
        ("classifier",),
    ),
    # The convolutional feature encoder is a module list of identical layers when feat_extract_norm="layer",
    # and of mixed layer classes with "group": in both cases it is the input stem, i.e. `embeddings`.
    "wav2vec2-group": TinyModelSpec(
        lambda: T.Wav2Vec2ForSequenceClassification(T.Wav2Vec2Config(feat_extract_norm="group", **_WAV2VEC2)),
        _groups(2, other=False, head=True),
        (("wav2vec2.encoder.layers", 2),),
        ("projector", "classifier"),
    ),
    "wav2vec2-layer": TinyModelSpec(
        lambda: T.Wav2Vec2ForSequenceClassification(T.Wav2Vec2Config(feat_extract_norm="layer", **_WAV2VEC2)),
        _groups(2, other=False, head=True),
        (("wav2vec2.encoder.layers", 2),),
        ("projector", "classifier"),
    ),
    "whisper": TinyModelSpec(
        lambda: T.WhisperForConditionalGeneration(
            T.WhisperConfig(
                num_mel_bins=8,
                max_source_positions=16,
                max_target_positions=16,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                decoder_start_token_id=1,
                **_SEQ2SEQ,
            )
        ),
        _groups(5, other=True, head=False),  # conv stem -> embeddings; proj_out tied to the token embeddings
        (("model.encoder.layers", 2), ("model.decoder.layers", 3)),
        (),
    ),
}


def build_tiny_model(name: str, seed: int = SEED) -> PreTrainedModel:
    """Build the tiny model called `name` with `torch.manual_seed(seed)` (in eval mode, as after loading)."""
    torch.manual_seed(seed)
    return TINY_MODEL_SPECS[name].build().eval()


#: Shape of the `tiny_bert` fixture: 4 blocks, so "the bottom half" is 2 blocks.
TINY_BERT_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "vocab_size": 99,
    "num_labels": 2,
}


#: The groups of `build_tiny_bert()` by the module-path prefixes of their parameters, written out by hand so that
#: tests can compute expected parameter sets without the discovery code.
TINY_BERT_GROUP_PREFIXES: dict[str, str] = {
    "embeddings": "bert.embeddings.",
    **{f"blocks.{i}": f"bert.encoder.layer.{i}." for i in range(TINY_BERT_CONFIG["num_hidden_layers"])},
    "other": "bert.pooler.",
    "head": "classifier.",
}


def tiny_bert_params(model: torch.nn.Module, *groups: str, prefix: str = "") -> list[str]:
    """Names of the parameters of `groups` of a tiny BERT (see `TINY_BERT_GROUP_PREFIXES`), in model order.

    `prefix` is prepended to the module paths, e.g. ``"base_model.model."`` for a PEFT-wrapped model.
    """
    prefixes = tuple(prefix + TINY_BERT_GROUP_PREFIXES[g] for g in groups)
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


def build_tiny_bert(seed: int = SEED, **overrides) -> T.BertForSequenceClassification:
    """A seeded `BertForSequenceClassification` with `TINY_BERT_CONFIG` (updated by `overrides`), in eval mode.

    Its groups are ``embeddings, blocks.0-3, other (the pooler), head (the classifier)``.
    """
    torch.manual_seed(seed)
    return T.BertForSequenceClassification(T.BertConfig(**{**TINY_BERT_CONFIG, **overrides})).eval()


def build_lora_bert(seed: int = SEED, r: int = 4):
    """`build_tiny_bert` wrapped by PEFT: LoRA on ``query`` and ``value``, task type ``SEQ_CLS``.

    PEFT adds 16 LoRA weights (4 layers x query/value x A/B, trainable) and wraps the classifier in
    ``modules_to_save`` (a trainable copy next to the frozen original). Needs `peft`: guard callers with
    ``pytest.importorskip("peft")``.
    """
    import peft

    config = peft.LoraConfig(target_modules=["query", "value"], task_type="SEQ_CLS", r=r)
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers-5 deprecated property while wrapping; not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        return peft.get_peft_model(build_tiny_bert(seed), config)


def _seeded_builder(name: str) -> Callable[[], PreTrainedModel]:
    def build() -> PreTrainedModel:
        return build_tiny_model(name)

    build.__name__ = f"build_{name.replace('-', '_')}"
    return build


#: Registry of seeded builders, ``{name: () -> model}``; the expectations are in `TINY_MODEL_SPECS`.
TINY_MODELS: dict[str, Callable[[], PreTrainedModel]] = {
    name: _seeded_builder(name) for name in TINY_MODEL_SPECS
}


# a seeded stand-in for a tokenized text-classification data set (random 0/1 labels), defined once
from tl_plugin.testing import RandomTokens  # noqa: E402, F401  (re-exported to the tests)

"""Specification of `discover_layer_groups`: embeddings → blocks.0..N-1 → other → head (+ adapters).

Checked on a tiny model of every supported architecture family (see ``tiny_models.py``), on plain
`torch.nn.Module`s, with explicit overrides, and on a PEFT LoRA-wrapped model.
"""

from __future__ import annotations

import re

import pytest
import torch
from tiny_models import (
    SEED,
    TINY_MODEL_SPECS,
    TinyModelSpec,
    block_names,
    build_lora_bert,
    build_tiny_bert,
    build_tiny_model,
)
from torch import nn

from tl_plugin import LayerDiscoveryError, discover_layer_groups


def _timm_importable() -> bool:
    """`timm` imports (it needs torchvision; PyPI's CUDA-linked torchvision does not import beside a CPU torch)."""
    try:
        import timm  # noqa: F401
    except (ImportError, RuntimeError):
        return False
    return True


def _timm_wrapper(architecture: str) -> nn.Module:
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    return TimmWrapperForImageClassification(TimmWrapperConfig(architecture=architecture, num_labels=3))


#: transformers' `TimmWrapperForImageClassification` around timm's tiny ``test_*`` architectures (random weights,
#: no download). Its base model ``timm_model`` is the whole timm model, so the classifier (found through timm's
#: ``get_classifier()``) lies inside the base model: ``head``, ``classifier`` or ``head.fc`` by architecture.
TIMM_WRAPPER_SPECS: dict[str, TinyModelSpec] = {
    "timm-wrapper-vit": TinyModelSpec(
        lambda: _timm_wrapper("test_vit"),
        ("embeddings", *block_names(6), "other", "head"),  # other: the final norm
        (("timm_model.blocks", 6),),
        ("timm_model.head",),
    ),
    "timm-wrapper-efficientnet": TinyModelSpec(
        lambda: _timm_wrapper("test_efficientnet"),
        ("embeddings", *block_names(5), "other", "head"),  # other: conv_head, bn2
        (("timm_model.blocks", 5),),
        ("timm_model.classifier",),
    ),
    "timm-wrapper-convnext": TinyModelSpec(
        lambda: _timm_wrapper("test_convnext"),
        ("embeddings", *block_names(4), "other", "head"),  # other: head.norm (only head.fc is the classifier)
        (("timm_model.stages", 4),),
        ("timm_model.head.fc",),
    ),
}
SPECS = {**TINY_MODEL_SPECS, **TIMM_WRAPPER_SPECS}
_NEEDS_TIMM = pytest.mark.skipif(not _timm_importable(), reason="timm does not import (it needs torchvision)")
MATRIX = [
    pytest.param(name, marks=_NEEDS_TIMM) if name in TIMM_WRAPPER_SPECS else name
    for name in sorted(TINY_MODEL_SPECS) + sorted(TIMM_WRAPPER_SPECS)
]


def _inside(name: str, module_path: str) -> bool:
    return name == module_path or name.startswith(module_path + ".")


class _Models(dict):
    def __missing__(self, name: str) -> nn.Module:
        if name in TINY_MODEL_SPECS:
            model = build_tiny_model(name)
        else:
            torch.manual_seed(SEED)
            model = SPECS[name].build().eval()
        self[name] = model
        return model


@pytest.fixture(scope="module")
def matrix_models():
    """Every matrix model, built once (on first use) for the whole module (the tests here only read them)."""
    return _Models()


# --------------------------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("name", MATRIX)
def test_group_names_and_count_are_as_expected(name, matrix_models):
    groups = discover_layer_groups(matrix_models[name])
    spec = SPECS[name]
    assert groups.names == list(spec.group_names)
    assert len(groups) == spec.num_groups
    assert groups.num_blocks == spec.num_blocks


@pytest.mark.parametrize("name", MATRIX)
def test_every_parameter_is_in_exactly_one_group(name, matrix_models):
    model = matrix_models[name]
    groups = discover_layer_groups(model)
    listed = [p for g in groups for p in g.param_names]
    assert sorted(listed) == sorted(n for n, _ in model.named_parameters())
    assert len(listed) == len(set(listed))


@pytest.mark.parametrize("name", MATRIX)
def test_blocks_are_numbered_in_stack_order_encoder_before_decoder(name, matrix_models):
    groups = discover_layer_groups(matrix_models[name])
    expected = [(f"{stack}.{i}", stack) for stack, n in SPECS[name].stacks for i in range(n)]
    assert [(b.module_name, b.stack) for b in groups.blocks] == expected
    assert [b.index for b in groups.blocks] == list(range(len(expected)))
    assert list(groups.stacks) == [stack for stack, _ in SPECS[name].stacks]
    for block in groups.blocks:
        assert block.param_names, f"{block.name} is empty"
        assert all(_inside(p, block.module_name) for p in block.param_names)


@pytest.mark.parametrize("name", MATRIX)
def test_the_head_is_exactly_the_newly_added_task_module(name, matrix_models):
    model = matrix_models[name]
    groups = discover_layer_groups(model)
    expected = [
        n
        for n, _ in model.named_parameters()
        if any(_inside(n, m) for m in SPECS[name].head_modules)
    ]
    if expected:
        assert groups.get("head").param_names == tuple(expected)
    else:
        assert "head" not in groups.names


@_NEEDS_TIMM
def test_a_timm_wrapper_without_a_classifier_has_no_head():
    from transformers import TimmWrapperConfig, TimmWrapperModel

    model = TimmWrapperModel(TimmWrapperConfig(architecture="test_vit"))  # timm's head is an nn.Identity
    groups = discover_layer_groups(model)
    assert groups.names == ["embeddings", *block_names(6), "other"]


class _TimmLikeNet(nn.Module):
    """Stand-in with timm's layout and API (``blocks``, ``norm``, ``head``, ``get_classifier()``), not timm."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.patch_embed = nn.Linear(4, 8)
        self.blocks = nn.Sequential(*(_Block() for _ in range(3)))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, num_classes) if num_classes else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head


def _timm_wrapper_stand_in(num_labels: int) -> nn.Module:
    """A `PreTrainedModel` laid out like `TimmWrapperForImageClassification` (``base_model_prefix="timm_model"``,
    the classifier inside it), for machines where timm does not import (the real one is in the matrix above)."""
    from transformers import PretrainedConfig, PreTrainedModel

    class TimmWrapperStandIn(PreTrainedModel):
        config_class = PretrainedConfig
        base_model_prefix = "timm_model"

        def __init__(self, config: PretrainedConfig):
            super().__init__(config)
            self.timm_model = _TimmLikeNet(config.num_labels)

    return TimmWrapperStandIn(PretrainedConfig(num_labels=num_labels))


def test_a_classifier_inside_the_base_model_reported_by_get_classifier_is_the_head():
    groups = discover_layer_groups(_timm_wrapper_stand_in(num_labels=3))
    assert groups.names == ["embeddings", *block_names(3), "other", "head"]
    assert groups.get("head").param_names == ("timm_model.head.weight", "timm_model.head.bias")
    assert groups.get("other").param_names == ("timm_model.norm.weight", "timm_model.norm.bias")
    assert "head" not in discover_layer_groups(_timm_wrapper_stand_in(num_labels=0)).names  # an nn.Identity


def test_a_head_override_wins_over_get_classifier():
    groups = discover_layer_groups(_timm_wrapper_stand_in(num_labels=3), head=["timm_model.norm"])
    assert groups.get("head").param_names == ("timm_model.norm.weight", "timm_model.norm.bias")
    assert "timm_model.head.weight" in groups.get("other").param_names


@pytest.mark.parametrize("name", ["gpt2-lm", "t5", "marian", "whisper"])
def test_a_tied_output_projection_is_listed_once_in_embeddings_and_is_not_a_head(name, matrix_models):
    model = matrix_models[name]
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    assert output.weight is inputs.weight  # the premise: the projection is tied
    groups = discover_layer_groups(model)
    tied_name = next(n for n, p in model.named_parameters() if p is inputs.weight)
    assert groups.group_of()[tied_name] == "embeddings"
    params = dict(model.named_parameters())
    listed = [params[n] for g in groups for n in g.param_names]
    assert sum(p is inputs.weight for p in listed) == 1
    assert "head" not in groups.names


def test_an_untied_lm_head_is_the_head(matrix_models):
    model = matrix_models["llama"]
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert discover_layer_groups(model).get("head").param_names == ("lm_head.weight",)


def test_a_question_answering_head_is_the_head():
    from transformers import BertConfig, BertForQuestionAnswering

    model = BertForQuestionAnswering(
        BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99
        )
    )
    groups = discover_layer_groups(model)
    assert groups.get("head").param_names == ("qa_outputs.weight", "qa_outputs.bias")
    assert "other" not in groups.names  # QA BERT is built without a pooler


@pytest.mark.parametrize("name", ["wav2vec2-group", "wav2vec2-layer"])
def test_the_wav2vec2_convolutional_feature_encoder_is_part_of_embeddings(name, matrix_models):
    model = matrix_models[name]
    conv = [n for n, _ in model.named_parameters() if n.startswith("wav2vec2.feature_extractor.")]
    assert conv
    embeddings = discover_layer_groups(model).get("embeddings").param_names
    assert set(conv) <= set(embeddings)


def test_the_whisper_convolutional_stem_and_decoder_token_embeddings_are_embeddings(matrix_models):
    embeddings = discover_layer_groups(matrix_models["whisper"]).get("embeddings").param_names
    for name in (
        "model.encoder.conv1.weight",
        "model.encoder.conv2.weight",
        "model.decoder.embed_tokens.weight",
    ):
        assert name in embeddings


def test_albert_has_one_block_per_hidden_group_not_per_hidden_layer():
    """ALBERT shares weights across layers: ``num_hidden_layers`` layers run on ``num_hidden_groups`` weight sets.

    A block is a set of *weights* (what freezing and re-initialising act on), so an ALBERT model has one block per
    hidden group: one block per hidden layer would put the same parameters in several groups, and freezing
    "blocks.0" would silently freeze other layers too.
    """
    from transformers import AlbertConfig, AlbertForSequenceClassification

    config = AlbertConfig(
        embedding_size=16, hidden_size=32, num_hidden_layers=4, num_hidden_groups=2,
        num_attention_heads=2, intermediate_size=37, vocab_size=99,
    )  # fmt: skip
    model = AlbertForSequenceClassification(config)
    stack = model.albert.encoder.albert_layer_groups
    assert len(stack) == 2  # the weights: 2 distinct layer groups for 4 hidden layers

    groups = discover_layer_groups(model)
    assert [b.module_name for b in groups.blocks] == [
        "albert.encoder.albert_layer_groups.0",
        "albert.encoder.albert_layer_groups.1",
    ]
    for block, module in zip(groups.blocks, stack, strict=True):
        assert len(block.param_names) == len(list(module.parameters()))


# --------------------------------------------------------------------------------------------- overrides
def test_a_module_path_override_gives_the_same_blocks_as_discovery():
    model = build_tiny_bert()
    found = discover_layer_groups(model)
    forced = discover_layer_groups(model, blocks="bert.encoder.layer")
    assert forced.groups == found.groups
    assert forced.stacks == ("bert.encoder.layer",)


def test_a_regex_override_selects_blocks_by_full_module_name():
    model = build_tiny_bert()
    groups = discover_layer_groups(model, blocks=r"bert\.encoder\.layer\.[0-3]")
    assert [b.module_name for b in groups.blocks] == [f"bert.encoder.layer.{i}" for i in range(4)]
    assert [b.param_names for b in groups.blocks] == [
        b.param_names for b in discover_layer_groups(model).blocks
    ]
    assert groups.stacks == (r"bert\.encoder\.layer\.[0-3]",)  # the stack is named by the override itself


def test_a_regex_override_can_select_part_of_a_stack():
    model = build_tiny_bert()
    groups = discover_layer_groups(model, blocks=r"bert\.encoder\.layer\.[12]")
    assert [b.module_name for b in groups.blocks] == ["bert.encoder.layer.1", "bert.encoder.layer.2"]
    # layer 0 comes before the first block (input side), layer 3 after the last one
    assert groups.group_of()["bert.encoder.layer.0.output.dense.weight"] == "embeddings"
    assert groups.group_of()["bert.encoder.layer.3.output.dense.weight"] == "other"


def test_a_list_of_two_stacks_is_numbered_in_the_order_given():
    model = build_tiny_model("t5")
    groups = discover_layer_groups(model, blocks=["decoder.block", "encoder.block"])
    assert [b.module_name for b in groups.blocks] == [
        "decoder.block.0", "decoder.block.1", "decoder.block.2", "encoder.block.0", "encoder.block.1",
    ]  # fmt: skip
    assert groups.stacks == ("decoder.block", "encoder.block")


def test_an_override_matching_nothing_raises_listing_the_module_lists():
    model = build_tiny_bert()
    with pytest.raises(LayerDiscoveryError, match=r"matches no module") as info:
        discover_layer_groups(model, blocks="bert.decoder.layer")
    assert "'bert.encoder.layer'" in str(info.value)


def test_an_invalid_override_regex_raises_a_discovery_error():
    with pytest.raises(LayerDiscoveryError, match=r"neither a module path .* nor a valid regex"):
        discover_layer_groups(build_tiny_bert(), blocks="bert.encoder.layer[")


def test_a_head_override_replaces_the_default_head():
    groups = discover_layer_groups(build_tiny_bert(), head=["bert.pooler"])
    assert groups.get("head").param_names == ("bert.pooler.dense.weight", "bert.pooler.dense.bias")
    # the classifier, no longer the head, is after the blocks: `other`
    assert groups.get("other").param_names == ("classifier.weight", "classifier.bias")


# --------------------------------------------------------------------------------------------- plain modules
class _Block(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(x + self.linear(x))


class _MLP(nn.Module):
    def __init__(self, depth: int = 3):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layers = nn.ModuleList(_Block() for _ in range(depth))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def test_a_plain_module_with_a_module_list_of_blocks_is_discovered():
    model = _MLP()
    groups = discover_layer_groups(model)
    assert groups.names == ["embeddings", "blocks.0", "blocks.1", "blocks.2", "other", "head"]
    assert groups.get("embeddings").param_names == ("embed.weight", "embed.bias")
    assert groups.blocks[1].param_names == (
        "layers.1.linear.weight", "layers.1.linear.bias", "layers.1.norm.weight", "layers.1.norm.bias",
    )  # fmt: skip
    assert groups.get("other").param_names == ("norm.weight", "norm.bias")
    assert groups.get("head").param_names == ("head.weight", "head.bias")


def test_a_root_sequential_of_identical_blocks_is_the_block_stack():
    model = nn.Sequential(*(_Block() for _ in range(3)))
    groups = discover_layer_groups(model)
    assert groups.names == ["blocks.0", "blocks.1", "blocks.2"]
    assert [b.module_name for b in groups.blocks] == ["0", "1", "2"]
    assert groups.blocks[2].param_names == (
        "2.linear.weight",
        "2.linear.bias",
        "2.norm.weight",
        "2.norm.bias",
    )


def test_a_nested_sequential_of_identical_blocks_is_found_between_stem_and_head():
    model = nn.Sequential()
    model.add_module("stem", nn.Linear(4, 8))
    model.add_module("body", nn.Sequential(*(_Block() for _ in range(2))))
    model.add_module("fc", nn.Linear(8, 2))
    groups = discover_layer_groups(model)
    assert groups.names == ["embeddings", "blocks.0", "blocks.1", "head"]
    assert groups.stacks == ("body",)


@pytest.mark.parametrize(
    ("model", "seen"),
    [
        (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), "children of different classes"),
        (nn.Linear(4, 2), "no nn.ModuleList or nn.Sequential at all"),
    ],
    ids=["mixed-sequential", "no-container"],
)
def test_a_plain_module_without_repeated_structure_raises_listing_candidates_and_the_override(model, seen):
    with pytest.raises(LayerDiscoveryError, match=r"Could not find the block stack") as info:
        discover_layer_groups(model)
    message = str(info.value)
    assert seen in message
    assert "blocks=" in message


def test_the_rejected_candidates_are_named_with_their_reason():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.acts = nn.ModuleList([nn.ReLU(), nn.ReLU()])
            self.mixed = nn.Sequential(nn.Linear(2, 2), nn.Tanh())

    with pytest.raises(LayerDiscoveryError) as info:
        discover_layer_groups(Model())
    message = str(info.value)
    assert re.search(r"acts \(ModuleList of 2 x ReLU; rejected: some children hold no parameters\)", message)
    assert re.search(
        r"mixed \(Sequential of 2 x Linear/Tanh; rejected: children of different classes\)", message
    )


# --------------------------------------------------------------------------------------------- PEFT
@pytest.fixture(scope="module")
def lora_bert():
    pytest.importorskip("peft")
    return build_lora_bert()


def _unwrap_peft_name(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def test_lora_wrapping_keeps_the_same_blocks(lora_bert):
    plain = discover_layer_groups(build_tiny_bert())
    wrapped = discover_layer_groups(lora_bert)
    assert [b.name for b in wrapped.blocks] == [b.name for b in plain.blocks]
    assert [b.module_name for b in wrapped.blocks] == [
        f"base_model.model.{b.module_name}" for b in plain.blocks
    ]
    for w, p in zip(wrapped.blocks, plain.blocks, strict=True):
        assert tuple(map(_unwrap_peft_name, w.param_names)) == p.param_names
    assert wrapped.names == [
        "embeddings",
        "blocks.0",
        "blocks.1",
        "blocks.2",
        "blocks.3",
        "other",
        "head",
        "adapters",
    ]


def test_lora_weights_are_in_adapters_and_only_there(lora_bert):
    groups = discover_layer_groups(lora_bert)
    lora = [n for n, _ in lora_bert.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    assert len(lora) == 4 * 2 * 2  # 4 layers x (query, value) x (A, B)
    assert list(groups.get("adapters").param_names) == lora
    assert "adapters" not in [g.name for g in groups.ordered()]


def test_peft_modules_to_save_copies_of_the_classifier_are_the_head(lora_bert):
    """PEFT keeps the pretrained classifier (``original_module``) and a trainable copy (``modules_to_save``).

    Both are copies of the task head, so both belong in ``head`` (never in ``adapters``, never in ``other``);
    discovery does not change which of them PEFT made trainable.
    """
    groups = discover_layer_groups(lora_bert)
    head = groups.get("head").param_names
    assert set(head) == {
        f"base_model.model.classifier.{copy}.{p}"
        for copy in ("original_module", "modules_to_save.default")
        for p in ("weight", "bias")
    }
    trainable = {n for n, p in lora_bert.named_parameters() if p.requires_grad}
    assert {n for n in head if n in trainable} == {n for n in head if ".modules_to_save." in n}


def test_discovery_does_not_change_the_model(lora_bert):
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in lora_bert.named_parameters()}
    discover_layer_groups(lora_bert)
    for name, param in lora_bert.named_parameters():
        assert param.requires_grad == before[name][0]
        assert torch.equal(param.detach(), before[name][1])

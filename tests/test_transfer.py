"""Specification of `apply_transfer` and `reinitialize`: which parameters train, which are re-initialised, and that
everything else is left bit-identical, also on models loaded with `from_pretrained` and on PEFT models.

Before each transfer the tiny models get "pretrained" weights (every parameter shifted away from its
initialisation), so a re-initialised parameter is always visibly different, and an untouched one must stay
`torch.equal` to its snapshot.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_lora_bert, build_tiny_bert, tiny_bert_params
from torch import nn

from tl_plugin import (
    LayerDiscoveryError,
    NoTrainableParametersError,
    TransferConfig,
    apply_transfer,
    discover_layer_groups,
    reinitialize,
)

ALL_GROUPS = ("embeddings", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "other", "head")


def pretend_pretrained(model: nn.Module, seed: int = 123) -> nn.Module:
    """Move every parameter away from its initial value, deterministically (stands in for pretraining)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.5 + 0.3 * torch.randn(param.shape, generator=generator))
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]


def trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.fixture
def pretrained_bert():
    return pretend_pretrained(build_tiny_bert())


# --------------------------------------------------------------------------------------------- the strategies
CASES = {
    "full": (TransferConfig(), ALL_GROUPS, ()),
    "full-freeze-embeddings": (TransferConfig(freeze_embeddings=True), ALL_GROUPS[1:], ()),
    "full-no-head": (TransferConfig(train_head=False), ALL_GROUPS[:-1], ()),
    "partial-reinit-top-1": (TransferConfig(strategy="partial", reinit_top_k=1), ALL_GROUPS, ("blocks.3",)),
    "partial-reinit-top-all": (
        TransferConfig(strategy="partial", reinit_top_k=4),
        ALL_GROUPS,
        ("blocks.0", "blocks.1", "blocks.2", "blocks.3"),
    ),
    "partial-reinit-top-2-freeze-transferred": (
        TransferConfig(strategy="partial", reinit_top_k=2, freeze_transferred=True),
        ("blocks.2", "blocks.3", "other", "head"),
        ("blocks.2", "blocks.3"),
    ),
    "partial-transfer-bottom-1": (
        TransferConfig(strategy="partial", transfer_bottom_n=1),
        ALL_GROUPS,
        ("blocks.1", "blocks.2", "blocks.3", "other"),
    ),
    "partial-transfer-bottom-3-freeze-transferred": (
        TransferConfig(strategy="partial", transfer_bottom_n=3, freeze_transferred=True),
        ("blocks.3", "other", "head"),
        ("blocks.3", "other"),
    ),
    "partial-transfer-bottom-0": (
        TransferConfig(strategy="partial", transfer_bottom_n=0),
        ALL_GROUPS,
        ("blocks.0", "blocks.1", "blocks.2", "blocks.3", "other"),
    ),
    "layers-train-groups": (
        TransferConfig(strategy="layers", train_groups=["blocks[-2:]"]),
        ("blocks.2", "blocks.3", "head"),  # the head is trained too: train_head defaults to True
        (),
    ),
    "layers-train-groups-no-head": (
        TransferConfig(strategy="layers", train_groups=["blocks.0", "other"], train_head=False),
        ("blocks.0", "other"),
        (),
    ),
    "layers-freeze-bottom-1": (
        TransferConfig(strategy="layers", freeze_bottom_blocks=1),
        ("blocks.1", "blocks.2", "blocks.3", "other", "head"),
        (),
    ),
    "layers-freeze-bottom-half": (
        TransferConfig(strategy="layers", freeze_bottom_blocks="half"),
        ("blocks.2", "blocks.3", "other", "head"),
        (),
    ),
    "layers-freeze-bottom-all": (
        TransferConfig(strategy="layers", freeze_bottom_blocks=4),
        ("other", "head"),
        (),
    ),
}


@pytest.mark.parametrize(("config", "train", "reinit"), CASES.values(), ids=CASES.keys())
def test_apply_transfer_trains_and_reinitialises_exactly_the_specified_groups(
    pretrained_bert, config, train, reinit
):
    model = pretrained_bert
    before = snapshot(model)
    report = apply_transfer(model, config)

    assert trainable(model) == tiny_bert_params(model, *train)
    assert report.trainable_groups == list(train)
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # every parameter of a re-initialised group changed; every other parameter is bit-identical
    assert changed(model, before) == tiny_bert_params(model, *reinit)


def test_apply_transfer_unfreezes_what_an_earlier_step_froze(pretrained_bert):
    for param in pretrained_bert.parameters():
        param.requires_grad_(False)
    apply_transfer(pretrained_bert, TransferConfig())
    assert trainable(pretrained_bert) == [n for n, _ in pretrained_bert.named_parameters()]


def test_a_config_training_nothing_raises_before_touching_the_model(pretrained_bert):
    before = snapshot(pretrained_bert)
    config = TransferConfig(strategy="layers", train_groups=["head"], train_head=False)
    with pytest.raises(NoTrainableParametersError, match="trains nothing on this model"):
        apply_transfer(pretrained_bert, config)
    assert changed(pretrained_bert, before) == []
    assert len(trainable(pretrained_bert)) == len(before)


def test_a_train_group_selector_matching_nothing_raises_before_touching_the_model(pretrained_bert):
    before = snapshot(pretrained_bert)
    with pytest.raises(ValueError, match=r"Block 'blocks.7' is out of range: this model has 4 blocks"):
        apply_transfer(pretrained_bert, TransferConfig(strategy="layers", train_groups=["blocks.7"]))
    assert len(trainable(pretrained_bert)) == len(before)


def test_the_config_overrides_are_used_for_discovery(pretrained_bert):
    config = TransferConfig(
        strategy="layers", train_groups=["blocks.-1"], blocks=r"bert\.encoder\.layer\.[0-2]"
    )
    apply_transfer(pretrained_bert, config)
    # with 3 blocks, layer 3 is after the stack (`other`, with the pooler): "blocks.-1" is layer 2
    assert trainable(pretrained_bert) == tiny_bert_params(pretrained_bert, "blocks.2", "head")

    with pytest.raises(LayerDiscoveryError, match="matches no module"):
        apply_transfer(pretrained_bert, TransferConfig(blocks="bert.decoder"))


@pytest.mark.parametrize(
    ("config", "name"),
    [
        (TransferConfig(strategy="partial", reinit_top_k=5), "reinit_top_k"),
        (TransferConfig(strategy="partial", transfer_bottom_n=5), "transfer_bottom_n"),
        (TransferConfig(strategy="layers", freeze_bottom_blocks=5), "freeze_bottom_blocks"),
    ],
)
def test_a_config_exceeding_the_block_count_raises_naming_the_count(pretrained_bert, config, name):
    before = snapshot(pretrained_bert)
    with pytest.raises(ValueError, match=rf"`{name}`=5 exceeds the number of blocks of this model \(4: "):
        apply_transfer(pretrained_bert, config)
    assert changed(pretrained_bert, before) == []
    assert len(trainable(pretrained_bert)) == len(before)


# --------------------------------------------------------------------------------------------- from_pretrained
@pytest.fixture
def saved_bert(tmp_path):
    """A tiny BERT with weights far from its initialisation (std ~1), saved with `save_pretrained`.

    Its config asks for ``initializer_range=0.05`` (not the default 0.02), so a re-initialisation can be told
    apart from both the saved weights and a default initialisation.
    """
    model = build_tiny_bert(initializer_range=0.05)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) + 0.5)
    model.save_pretrained(tmp_path)
    return tmp_path, snapshot(model)


def _load(path):
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(path)


def test_reinit_really_changes_weights_loaded_with_from_pretrained(saved_bert):
    path, saved = saved_bert
    model = _load(path)
    assert changed(model, saved) == []  # the premise: the saved weights were loaded

    apply_transfer(model, TransferConfig(strategy="partial", reinit_top_k=1))

    assert changed(model, saved) == tiny_bert_params(model, "blocks.3")
    block = model.bert.encoder.layer[3]
    linear_weights = torch.cat(
        [m.weight.detach().flatten() for m in block.modules() if isinstance(m, nn.Linear)]
    )
    assert linear_weights.numel() > 5000
    assert linear_weights.std().item() == pytest.approx(model.config.initializer_range, rel=0.1)
    assert linear_weights.mean().item() == pytest.approx(0.0, abs=0.01)
    for module in block.modules():
        if isinstance(module, nn.Linear):
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
        if isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))


def test_transfer_bottom_n_reinitialises_loaded_blocks_and_the_pooler(saved_bert):
    path, saved = saved_bert
    model = _load(path)
    apply_transfer(model, TransferConfig(strategy="partial", transfer_bottom_n=2, reinit_seed=0))
    assert changed(model, saved) == tiny_bert_params(model, "blocks.2", "blocks.3", "other")
    pooler = model.bert.pooler.dense.weight.detach()
    assert pooler.std().item() == pytest.approx(0.05, rel=0.25)


def test_reinitialize_on_a_loaded_model_returns_the_changed_names(saved_bert):
    path, saved = saved_bert
    model = _load(path)
    groups = discover_layer_groups(model)
    names = reinitialize(model, [groups.get("blocks.1"), groups.get("head")], seed=3)
    assert names == tiny_bert_params(model, "blocks.1", "head")
    assert changed(model, saved) == names


# --------------------------------------------------------------------------------------------- seeds
def _reinit_with_seed(seed: int | None) -> nn.Module:
    model = pretend_pretrained(build_tiny_bert())
    apply_transfer(model, TransferConfig(strategy="partial", reinit_top_k=2, reinit_seed=seed))
    return model


def test_reinit_seed_makes_the_reinitialisation_deterministic():
    first, second = _reinit_with_seed(11), _reinit_with_seed(11)
    assert changed(second, snapshot(first)) == []


def test_different_reinit_seeds_give_different_weights():
    first, other = _reinit_with_seed(11), _reinit_with_seed(12)
    differing = changed(other, snapshot(first))
    assert differing
    assert set(differing) <= set(tiny_bert_params(first, "blocks.2", "blocks.3"))


def test_reinit_seed_leaves_the_global_random_state_alone():
    model = pretend_pretrained(build_tiny_bert())
    torch.manual_seed(2024)
    expected = torch.rand(5)
    torch.manual_seed(2024)
    apply_transfer(model, TransferConfig(strategy="partial", reinit_top_k=1, reinit_seed=5))
    assert torch.equal(torch.rand(5), expected)


# --------------------------------------------------------------------------------------------- plain modules
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layers = nn.ModuleList(_Block() for _ in range(3))
        self.head = nn.Linear(8, 2)


def test_a_plain_module_is_reinitialised_with_reset_parameters():
    torch.manual_seed(0)
    model = pretend_pretrained(_MLP())
    before = snapshot(model)
    report = apply_transfer(model, TransferConfig(strategy="partial", reinit_top_k=1, reinit_seed=0))
    assert changed(model, before) == ["layers.2.linear.weight", "layers.2.linear.bias", "layers.2.norm.weight",
                                      "layers.2.norm.bias"]  # fmt: skip
    assert torch.equal(model.layers[2].norm.weight, torch.ones(8))  # LayerNorm.reset_parameters
    bound = 1 / 8**0.5  # nn.Linear.reset_parameters: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert model.layers[2].linear.weight.abs().max().item() <= bound
    assert report.trainable_groups == ["embeddings", "blocks.0", "blocks.1", "blocks.2", "head"]


def test_reinitialising_modules_without_any_initialisation_raises():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

    model = nn.Sequential(Scale(), Scale())
    groups = discover_layer_groups(model)
    with pytest.raises(RuntimeError, match="changed no parameter"):
        reinitialize(model, [groups.blocks[1]])


# --------------------------------------------------------------------------------------------- PEFT
@pytest.fixture
def lora_bert():
    pytest.importorskip("peft")
    model = build_lora_bert()
    with torch.no_grad():  # pretend the adapter was trained: lora_B starts at zero
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.add_(0.1)
    return model


def _lora(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".lora_" in n]


@pytest.mark.parametrize(
    "config",
    [
        TransferConfig(),
        TransferConfig(strategy="layers", freeze_bottom_blocks="half"),
        TransferConfig(strategy="layers", train_groups=["head"]),
        TransferConfig(strategy="partial", reinit_top_k=2, freeze_transferred=True),
    ],
    ids=["full", "layers-half", "layers-head-only", "partial"],
)
def test_apply_transfer_on_a_peft_model_leaves_lora_weights_trainable(lora_bert, config):
    report = apply_transfer(lora_bert, config)
    params = dict(lora_bert.named_parameters())
    assert len(_lora(lora_bert)) == 16
    assert all(params[n].requires_grad for n in _lora(lora_bert))
    assert "adapters" in report.trainable_groups


def test_reinit_on_a_peft_model_changes_the_block_but_not_its_lora_weights(lora_bert):
    before = snapshot(lora_bert)
    apply_transfer(lora_bert, TransferConfig(strategy="partial", reinit_top_k=1, reinit_seed=0))
    moved = changed(lora_bert, before)
    block = "base_model.model.bert.encoder.layer.3."
    assert moved
    assert all(n.startswith(block) for n in moved)
    assert not [n for n in moved if ".lora_" in n]
    assert f"{block}attention.self.query.base_layer.weight" in moved

"""Specification of the freezing utilities: selectors, freeze / unfreeze / freeze_to / freeze_bottom_blocks /
freeze_all_but, trainable_report and requires_grad maps, plus a real training loop that must not move frozen weights.

Expected parameter sets are computed here from ``named_parameters()`` and BERT's module names, independently of
the discovery code.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from tiny_models import TINY_BERT_GROUP_PREFIXES, build_lora_bert, build_tiny_bert, tiny_bert_params

from tl_plugin import (
    NoTrainableParametersError,
    freeze,
    freeze_all_but,
    freeze_bottom_blocks,
    freeze_to,
    requires_grad_map,
    select_parameters,
    trainable_report,
    unfreeze,
)
from tl_plugin.freezing import load_requires_grad_map

NUM_BLOCKS = 4
GROUP_PREFIXES = TINY_BERT_GROUP_PREFIXES
VALID_GROUPS = re.escape("valid groups: embeddings, other, head; blocks (0-3")
names_of = tiny_bert_params


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def frozen_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if not p.requires_grad]


def blocks(*indices: int) -> list[str]:
    return [f"blocks.{i}" for i in indices]


# --------------------------------------------------------------------------------------------- selectors
@pytest.mark.parametrize(
    ("selector", "groups"),
    [
        ("embeddings", ["embeddings"]),
        ("other", ["other"]),
        ("head", ["head"]),
        ("blocks", blocks(0, 1, 2, 3)),
        ("blocks.2", blocks(2)),
        ("blocks.0", blocks(0)),
        ("blocks.1-2", blocks(1, 2)),
        ("blocks.0-3", blocks(0, 1, 2, 3)),
        ("blocks.-1", blocks(3)),
        ("blocks.-4", blocks(0)),
        ("blocks[:2]", blocks(0, 1)),
        ("blocks[-2:]", blocks(2, 3)),
        ("blocks[1:3]", blocks(1, 2)),
        ("blocks[:]", blocks(0, 1, 2, 3)),
    ],
)
def test_group_and_block_selectors_select_exactly_their_groups(tiny_bert, selector, groups):
    assert select_parameters(tiny_bert, selector) == names_of(tiny_bert, *groups)


def test_a_glob_selects_parameter_names_by_shell_pattern(tiny_bert):
    expected = [n for n, _ in tiny_bert.named_parameters() if ".attention.self." in n]
    assert len(expected) == NUM_BLOCKS * 6
    assert select_parameters(tiny_bert, "*.attention.self.*") == expected


def test_a_glob_can_name_one_block_by_module_path(tiny_bert):
    assert select_parameters(tiny_bert, "bert.encoder.layer.1.*") == names_of(tiny_bert, "blocks.1")


def test_a_re_selector_fully_matches_parameter_names(tiny_bert):
    selected = select_parameters(tiny_bert, r"re:.*\.(query|key)\.weight")
    assert selected == [
        n for n, _ in tiny_bert.named_parameters() if n.endswith((".query.weight", ".key.weight"))
    ]
    assert len(selected) == 2 * NUM_BLOCKS
    # a full match: "query" alone matches no complete parameter name
    with pytest.raises(ValueError, match="matches no parameter"):
        select_parameters(tiny_bert, "re:query")


def test_several_selectors_select_their_union_once_in_model_order(tiny_bert):
    selected = select_parameters(tiny_bert, ["head", "embeddings", "blocks.-1", "blocks[-1:]", "*.bias"])
    wanted = set(names_of(tiny_bert, "head", "embeddings", "blocks.3")) | {
        n for n, _ in tiny_bert.named_parameters() if n.endswith(".bias")
    }
    assert selected == [n for n, _ in tiny_bert.named_parameters() if n in wanted]
    assert len(selected) == len(set(selected))


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ("blocks[7:]", "matches no parameter"),
        ("*.does_not_exist", "matches no parameter"),
        ("adapters", "matches no parameter"),  # a known group kind this model lacks
        ("blocks.4", r"out of range: this model has 4 blocks"),
        ("blocks.-5", r"out of range: this model has 4 blocks"),
        ("blocks.2-4", r"out of range: this model has 4 blocks"),
        ("blocks.3-1", r"out of range"),
        ("re:(unclosed", "not a valid regex"),
        ("encoder", "Unknown selector"),
        ("", "must be a non-empty string"),
    ],
)
def test_a_bad_selector_raises_naming_the_valid_groups(tiny_bert, selector, message):
    with pytest.raises(ValueError, match=message) as info:
        select_parameters(tiny_bert, selector)
    assert re.search(VALID_GROUPS, str(info.value)), str(info.value)


def test_a_bad_selector_in_a_list_changes_nothing(tiny_bert):
    with pytest.raises(ValueError, match="blocks.9"):
        freeze(tiny_bert, ["embeddings", "blocks.9"])
    assert frozen_names(tiny_bert) == []


# --------------------------------------------------------------------------------------------- freeze / unfreeze
def test_freeze_sets_requires_grad_false_on_exactly_the_selection(tiny_bert):
    returned = freeze(tiny_bert, ["embeddings", "blocks[:2]"])
    expected = names_of(tiny_bert, "embeddings", "blocks.0", "blocks.1")
    assert returned == expected
    assert frozen_names(tiny_bert) == expected


def test_unfreeze_sets_requires_grad_true_on_exactly_the_selection(tiny_bert):
    freeze(tiny_bert, "blocks")
    assert unfreeze(tiny_bert, "blocks.-1") == names_of(tiny_bert, "blocks.3")
    assert frozen_names(tiny_bert) == names_of(tiny_bert, "blocks.0", "blocks.1", "blocks.2")


def test_freezing_everything_raises_and_leaves_the_model_unchanged(tiny_bert):
    freeze(tiny_bert, "*.bias")
    before = requires_grad_map(tiny_bert)
    with pytest.raises(NoTrainableParametersError, match="no trainable parameters"):
        freeze(tiny_bert, ["embeddings", "blocks", "other", "head"])
    assert requires_grad_map(tiny_bert) == before


def test_no_trainable_parameters_error_is_a_value_error():
    assert issubclass(NoTrainableParametersError, ValueError)


def test_allow_no_trainable_freezes_everything(tiny_bert):
    freeze(tiny_bert, ["embeddings", "blocks", "other", "head"], allow_no_trainable=True)
    assert trainable_names(tiny_bert) == []


def test_freeze_all_but_makes_exactly_the_selection_trainable(tiny_bert):
    freeze(tiny_bert, "head")
    returned = freeze_all_but(tiny_bert, ["blocks.-1", "head"])
    assert returned == names_of(tiny_bert, "blocks.3", "head")
    assert trainable_names(tiny_bert) == returned


# --------------------------------------------------------------------------------------------- freeze_to
def test_freeze_to_a_positive_n_freezes_the_first_n_groups(tiny_bert):
    assert freeze_to(tiny_bert, 2) == ["blocks.1", "blocks.2", "blocks.3", "other", "head"]
    assert frozen_names(tiny_bert) == names_of(tiny_bert, "embeddings", "blocks.0")


def test_freeze_to_a_negative_n_trains_the_last_groups(tiny_bert):
    assert freeze_to(tiny_bert, -2) == ["other", "head"]
    assert trainable_names(tiny_bert) == names_of(tiny_bert, "other", "head")
    assert freeze_to(tiny_bert, -1) == ["head"]
    assert trainable_names(tiny_bert) == names_of(tiny_bert, "head")


def test_freeze_to_unfreezes_the_groups_above_n(tiny_bert):
    freeze_to(tiny_bert, -1)
    freeze_to(tiny_bert, 0)
    assert frozen_names(tiny_bert) == []


@pytest.mark.parametrize("n", [7, -7, 100, True, 1.0])
def test_freeze_to_out_of_range_raises_listing_the_groups(tiny_bert, n):
    with pytest.raises(
        ValueError, match=r"\[-6, 6\] for this model's 7 groups \(embeddings, blocks\.0, .*head\)"
    ):
        freeze_to(tiny_bert, n)
    assert frozen_names(tiny_bert) == []


# --------------------------------------------------------------------------------------------- freeze_bottom_blocks
def test_freeze_bottom_blocks_freezes_the_embeddings_and_the_bottom_n_blocks(tiny_bert):
    returned = freeze_bottom_blocks(tiny_bert, 2)
    expected = names_of(tiny_bert, "embeddings", "blocks.0", "blocks.1")
    assert returned == expected
    assert frozen_names(tiny_bert) == expected


def test_freeze_bottom_blocks_can_leave_the_embeddings_trainable(tiny_bert):
    freeze_bottom_blocks(tiny_bert, 3, include_embeddings=False)
    assert frozen_names(tiny_bert) == names_of(tiny_bert, "blocks.0", "blocks.1", "blocks.2")


def test_freeze_bottom_blocks_zero_freezes_only_the_embeddings(tiny_bert):
    freeze_bottom_blocks(tiny_bert, 0)
    assert frozen_names(tiny_bert) == names_of(tiny_bert, "embeddings")
    assert freeze_bottom_blocks(build_tiny_bert(), 0, include_embeddings=False) == []


def test_freeze_bottom_blocks_all_blocks_keeps_other_and_head_trainable(tiny_bert):
    freeze_bottom_blocks(tiny_bert, NUM_BLOCKS)
    assert trainable_names(tiny_bert) == names_of(tiny_bert, "other", "head")


@pytest.mark.parametrize("n", [5, -1, "2"])
def test_freeze_bottom_blocks_out_of_range_raises_naming_the_block_count(tiny_bert, n):
    with pytest.raises(ValueError, match=r"in \[0, 4\] \(the number of blocks\)"):
        freeze_bottom_blocks(tiny_bert, n)


# --------------------------------------------------------------------------------------------- PEFT adapters
@pytest.fixture
def lora_bert():
    pytest.importorskip("peft")
    return build_lora_bert()


def _lora_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".lora_" in n]


@pytest.mark.parametrize(
    "operation",
    [
        lambda m: freeze(m, "blocks"),
        lambda m: freeze(m, "*"),
        lambda m: freeze(m, "re:.*"),
        lambda m: freeze_to(m, -1),
        lambda m: freeze_bottom_blocks(m, NUM_BLOCKS),
        lambda m: freeze_all_but(m, "head"),
        lambda m: unfreeze(m, "*"),
    ],
    ids=[
        "freeze-blocks",
        "freeze-glob-all",
        "freeze-regex-all",
        "freeze_to",
        "freeze_bottom_blocks",
        "freeze_all_but",
        "unfreeze-all",
    ],  # fmt: skip
)
def test_adapters_are_never_touched_unless_named(lora_bert, operation):
    lora = _lora_names(lora_bert)
    assert lora
    operation(lora_bert)
    assert all(dict(lora_bert.named_parameters())[n].requires_grad for n in lora)


def test_a_selector_matching_only_adapter_weights_matches_nothing(lora_bert):
    with pytest.raises(ValueError, match="matches no parameter"):
        freeze(lora_bert, "*.lora_A.*")


def test_naming_adapters_freezes_exactly_the_adapter_weights(lora_bert):
    before = set(trainable_names(lora_bert))
    assert freeze(lora_bert, "adapters") == _lora_names(lora_bert)
    assert set(trainable_names(lora_bert)) == before - set(_lora_names(lora_bert))
    unfreeze(lora_bert, "adapters")
    assert set(trainable_names(lora_bert)) == before


# --------------------------------------------------------------------------------------------- trainable_report
def _expected_counts(model) -> dict[str, tuple[int, int]]:
    params = dict(model.named_parameters())
    return {
        group: (
            sum(params[n].numel() for n in names_of(model, group) if params[n].requires_grad),
            sum(params[n].numel() for n in names_of(model, group)),
        )
        for group in GROUP_PREFIXES
    }


def test_trainable_report_counts_every_group(tiny_bert):
    freeze(tiny_bert, ["embeddings", "blocks.0", "bert.encoder.layer.1.*.bias"])
    report = trainable_report(tiny_bert)
    expected = _expected_counts(tiny_bert)
    assert [r.group for r in report.rows] == list(GROUP_PREFIXES)
    assert {r.group: (r.trainable, r.total) for r in report.rows} == expected

    all_params = list(tiny_bert.parameters())
    assert report.total == sum(p.numel() for p in all_params)
    assert report.trainable == sum(p.numel() for p in all_params if p.requires_grad)
    assert report.percent == pytest.approx(100 * report.trainable / report.total)
    partial = next(r for r in report.rows if r.group == "blocks.1")
    assert 0 < partial.trainable < partial.total
    assert partial.percent == pytest.approx(100 * partial.trainable / partial.total)
    assert report.frozen_groups == ["embeddings", "blocks.0"]
    assert report.trainable_groups == ["blocks.1", "blocks.2", "blocks.3", "other", "head"]


def test_trainable_report_to_dict_holds_the_numbers_for_logging(tiny_bert):
    freeze_bottom_blocks(tiny_bert, 2)
    report = trainable_report(tiny_bert)
    expected = _expected_counts(tiny_bert)
    logged = report.to_dict()
    trainable_total = sum(t for t, _ in expected.values())
    all_total = sum(n for _, n in expected.values())
    assert logged["trainable_params/trainable"] == float(trainable_total)
    assert logged["trainable_params/total"] == float(all_total)
    assert logged["trainable_params/percent"] == pytest.approx(100 * trainable_total / all_total, abs=1e-4)
    for group, (trainable, _) in expected.items():
        assert logged[f"trainable_params/{group}"] == float(trainable)
    assert set(logged) == {
        "trainable_params/trainable",
        "trainable_params/total",
        "trainable_params/percent",
    } | {f"trainable_params/{g}" for g in GROUP_PREFIXES}
    assert all(isinstance(v, float) for v in logged.values())
    assert set(report.to_dict(prefix="tl")) == {k.replace("trainable_params/", "tl/") for k in logged}


def test_trainable_report_table_shows_each_group_and_the_total(tiny_bert):
    freeze(tiny_bert, "embeddings")
    expected = _expected_counts(tiny_bert)
    table = trainable_report(tiny_bert).to_table()
    assert str(trainable_report(tiny_bert)) == table
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:] if not line.startswith("-")}
    for group, (trainable, total) in expected.items():
        assert rows[group] == [f"{trainable:,}", f"{total:,}", f"{100 * trainable / total:.1f}%"]
    trainable_total = sum(t for t, _ in expected.values())
    all_total = sum(n for _, n in expected.values())
    assert rows["all"] == [
        f"{trainable_total:,}",
        f"{all_total:,}",
        f"{100 * trainable_total / all_total:.1f}%",
    ]


# --------------------------------------------------------------------------------------------- requires_grad maps
def test_a_requires_grad_map_round_trips_through_json(tiny_bert):
    freeze(tiny_bert, ["embeddings", "blocks[:3]", "*.LayerNorm.bias"])
    saved = json.loads(json.dumps(requires_grad_map(tiny_bert)))
    assert list(saved) == [n for n, _ in tiny_bert.named_parameters()]

    other = build_tiny_bert(seed=1)
    load_requires_grad_map(other, saved)
    assert requires_grad_map(other) == requires_grad_map(tiny_bert)


def test_a_requires_grad_map_naming_unknown_parameters_is_rejected(tiny_bert):
    with pytest.raises(ValueError, match=r"lacks: \['decoder.weight'\]"):
        load_requires_grad_map(tiny_bert, {"decoder.weight": False, "classifier.weight": False})
    assert frozen_names(tiny_bert) == []


# --------------------------------------------------------------------------------------------- real training
def test_training_after_freezing_the_bottom_half_never_moves_frozen_weights(tiny_bert):
    model = tiny_bert.train()
    frozen = freeze_bottom_blocks(model, NUM_BLOCKS // 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # All parameters go to the optimizer, as a careless training script would do: freezing alone must hold.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        input_ids = torch.randint(0, 99, (8, 12), generator=generator)
        labels = torch.randint(0, 2, (8,), generator=generator)
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    after = dict(model.named_parameters())
    assert frozen == names_of(model, "embeddings", "blocks.0", "blocks.1")
    for name in frozen:
        assert after[name].grad is None
        assert torch.equal(after[name].detach(), before[name]), f"frozen {name} moved"
    trained = [n for n in after if n not in frozen]
    assert trained == names_of(model, "blocks.2", "blocks.3", "other", "head")
    for name in trained:
        assert not torch.equal(after[name].detach(), before[name]), f"trainable {name} did not move"


def test_peft_original_copy_of_a_trained_head_is_never_marked_trainable():
    """PEFT trains a copy of the classifier (``modules_to_save``) and keeps the pretrained one unused: unfreezing
    ``head`` must not mark the unused one trainable (it would get no gradient and inflate the report)."""
    pytest.importorskip("peft")
    model = build_lora_bert()
    original = {n for n, _ in model.named_parameters() if ".original_module." in n}
    copy = {n for n, _ in model.named_parameters() if ".modules_to_save." in n}
    assert len(original) == len(copy) == 2
    freeze_all_but(model, ["head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert copy <= trainable
    assert not original & trainable
    freeze(model, "head", allow_no_trainable=True)
    unfreeze(model, ["head", "blocks[-1:]"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert copy <= trainable
    assert not original & trainable
    head_row = next(row for row in trainable_report(model).rows if row.group == "head")
    assert head_row.trainable == sum(p.numel() for n, p in model.named_parameters() if n in copy)
    with pytest.raises(ValueError, match="matches no parameter"):
        select_parameters(model, "re:.*original_module.*")


# --------------------------------------------------------------------------------------------- trainable BatchNorm
def tiny_conv_model():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    return ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    )


def bn_affine_names_by_hand(model) -> set[str]:
    """BatchNorm affine parameters found from the module types, independently of the code under test."""
    return {
        f"{module_name}.{p}"
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.BatchNorm2d)
        for p in ("weight", "bias")
    }


def test_the_batchnorm_selector_selects_exactly_the_batchnorm_affine_parameters():
    model = tiny_conv_model()
    expected = bn_affine_names_by_hand(model)
    assert len(expected) == 2 * 8  # stem 1, stage 0: 3 (bottleneck), stage 1: 4 (bottleneck + shortcut)
    assert set(select_parameters(model, "batchnorm")) == expected


def test_the_batchnorm_selector_on_a_model_without_batchnorm_matches_nothing(tiny_bert):
    with pytest.raises(
        ValueError, match=r"Selector 'batchnorm' matches no parameter.*'batchnorm' \(BatchNorm affine"
    ):
        select_parameters(tiny_bert, "batchnorm")


def test_freeze_with_train_batchnorm_keeps_the_affine_parameters_of_the_frozen_groups_trainable():
    model = tiny_conv_model()
    bn = bn_affine_names_by_hand(model)
    selected = set(select_parameters(model, ["embeddings", "blocks.0"]))
    frozen = freeze(model, ["embeddings", "blocks.0"], train_batchnorm=True)
    assert set(frozen) == selected - bn
    assert selected & bn  # the groups do hold BatchNorm layers
    assert set(frozen_names(model)) == selected - bn
    # the default freezes the whole group, and a later train_batchnorm=True makes its BatchNorm affine trainable again
    model = tiny_conv_model()
    freeze(model, ["embeddings", "blocks.0"])
    assert set(frozen_names(model)) == selected
    freeze(model, ["embeddings", "blocks.0"], train_batchnorm=True)
    assert set(frozen_names(model)) == selected - bn


def test_train_batchnorm_in_freeze_all_but_freeze_to_and_freeze_bottom_blocks():
    model = tiny_conv_model()
    bn = bn_affine_names_by_hand(model)
    head = set(select_parameters(model, "head"))
    assert set(freeze_all_but(model, "head", train_batchnorm=True)) == head | bn
    assert set(trainable_names(model)) == head | bn
    model = tiny_conv_model()
    freeze_to(model, -1, train_batchnorm=True)
    assert set(trainable_names(model)) == head | bn
    model = tiny_conv_model()
    frozen = freeze_bottom_blocks(model, 1, train_batchnorm=True)
    assert not set(frozen) & bn
    assert set(frozen_names(model)) == set(select_parameters(model, ["embeddings", "blocks.0"])) - bn


def test_train_batchnorm_through_a_transfer_config_selector():
    from tl_plugin import TransferConfig, apply_transfer

    model = tiny_conv_model()
    apply_transfer(model, TransferConfig(strategy="layers", train_groups=["head", "batchnorm"]))
    assert set(trainable_names(model)) == set(select_parameters(model, "head")) | bn_affine_names_by_hand(
        model
    )


@pytest.mark.parametrize("function", [freeze, freeze_all_but])
def test_train_batchnorm_must_be_a_bool(function):
    model = tiny_conv_model()
    with pytest.raises(ValueError, match=r"`train_batchnorm` must be True or False, got 'yes'"):
        function(model, "embeddings", train_batchnorm="yes")

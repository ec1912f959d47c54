"""Specification of `TransferConfig`: defaults, validation, and the YAML / JSON round trip."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tl_plugin import CONFIG_VERSION, STRATEGIES, TransferConfig


# --------------------------------------------------------------------------------------------- defaults
def test_the_default_config_is_full_transfer_training_everything():
    config = TransferConfig()
    assert config.strategy == "full"
    assert config.reinit_top_k == 0
    assert config.transfer_bottom_n is None
    assert config.freeze_transferred is False
    assert config.train_groups == []
    assert config.freeze_bottom_blocks == 0
    assert config.freeze_embeddings is False
    assert config.train_head is True
    assert config.lr_decay is None
    assert config.blocks is None
    assert config.head is None
    assert config.reinit_seed is None
    assert config.version == CONFIG_VERSION == 1


def test_the_strategies_are_full_partial_and_layers():
    assert STRATEGIES == ("full", "partial", "layers")


def test_default_lists_are_not_shared_between_configs():
    first, second = TransferConfig(), TransferConfig()
    first.train_groups.append("head")
    assert second.train_groups == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"strategy": "partial", "reinit_top_k": 2},
        {"strategy": "partial", "transfer_bottom_n": 0, "freeze_transferred": True},
        {"strategy": "layers", "train_groups": ["blocks[-2:]", "head"]},
        {"strategy": "layers", "freeze_bottom_blocks": "half"},
        {"strategy": "layers", "freeze_bottom_blocks": 3, "lr_decay": 1},
        {"freeze_embeddings": True, "train_head": False, "lr_decay": 0.5, "reinit_seed": 0},
        {"blocks": "bert.encoder.layer", "head": ["classifier"]},
        {"blocks": ["encoder.block", "decoder.block"]},
    ],
)
def test_valid_configs_are_accepted(kwargs):
    config = TransferConfig(**kwargs)
    for key, value in kwargs.items():
        assert getattr(config, key) == value


# --------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"strategy": "everything"},
            "`strategy` must be one of 'full', 'partial', 'layers', got 'everything'",
        ),
        ({"strategy": None}, "`strategy` must be one of"),
        ({"strategy": "partial", "reinit_top_k": -1}, "`reinit_top_k` must be an integer >= 0, got -1"),
        (
            {"strategy": "partial", "transfer_bottom_n": -2},
            "`transfer_bottom_n` must be an integer >= 0, got -2",
        ),
        (
            {"strategy": "layers", "freeze_bottom_blocks": -1},
            "`freeze_bottom_blocks` must be an integer >= 0",
        ),
        ({"reinit_seed": -1}, "`reinit_seed` must be an integer >= 0, got -1"),
        ({"lr_decay": 0}, r"`lr_decay` must be a number in \(0, 1\], got 0"),
        ({"lr_decay": -0.5}, r"`lr_decay` must be a number in \(0, 1\]"),
        ({"lr_decay": 1.01}, r"`lr_decay` must be a number in \(0, 1\], got 1.01"),
        (
            {"strategy": "partial", "reinit_top_k": 1, "transfer_bottom_n": 2},
            "takes either `reinit_top_k` or `transfer_bottom_n`, not both",
        ),
        ({"strategy": "partial"}, "strategy 'partial' needs `reinit_top_k` > 0"),
        ({"strategy": "partial", "freeze_transferred": True}, "strategy 'partial' needs"),
        ({"strategy": "layers"}, "strategy 'layers' needs `train_groups`"),
        (
            {"strategy": "layers", "train_groups": ["head"], "freeze_bottom_blocks": 2},
            "takes either `train_groups` or `freeze_bottom_blocks`, not both",
        ),
        ({"reinit_top_k": 2}, "only apply to strategy 'partial', got strategy='full'"),
        (
            {"strategy": "layers", "train_groups": ["head"], "transfer_bottom_n": 1},
            "only apply to strategy 'partial'",
        ),
        ({"freeze_transferred": True}, "only apply to strategy 'partial'"),
        (
            {"strategy": "partial", "reinit_top_k": 1, "train_groups": ["head"]},
            "only apply to strategy 'layers'",
        ),
        ({"freeze_bottom_blocks": "half"}, "only apply to strategy 'layers', got strategy='full'"),
        ({"version": CONFIG_VERSION + 1}, "Upgrade tl_plugin to read newer configs"),
        ({"version": 0}, r"`version` must be an integer from 1 to 1"),
    ],
)
def test_an_invalid_config_is_rejected_with_a_precise_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransferConfig(**kwargs)


LAYERS = {"strategy": "layers"}
PARTIAL = {"strategy": "partial", "reinit_top_k": 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "partial", "reinit_top_k": "2"}, "`reinit_top_k` must be an integer >= 0, got '2'"),
        ({"strategy": "partial", "reinit_top_k": 1.0}, "`reinit_top_k` must be an integer >= 0, got 1.0"),
        ({"strategy": "partial", "reinit_top_k": True}, "`reinit_top_k` must be an integer >= 0, got True"),
        (
            {**LAYERS, "freeze_bottom_blocks": "all"},
            "`freeze_bottom_blocks` must be an integer >= 0 or 'half', got 'all'",
        ),
        (
            {**LAYERS, "train_groups": "head"},
            "`train_groups` must be a list of non-empty strings, got 'head'",
        ),
        ({**LAYERS, "train_groups": ["head", ""]}, "`train_groups` must be a list of non-empty strings"),
        ({**LAYERS, "train_groups": ["head", 3]}, "`train_groups` must be a list of non-empty strings"),
        ({"head": "classifier"}, "`head` must be a list of non-empty strings, got 'classifier'"),
        ({"blocks": 3}, "`blocks` must be a list of non-empty strings, got 3"),
        ({"blocks": ["encoder.block", None]}, "`blocks` must be a list of non-empty strings"),
        ({**PARTIAL, "freeze_transferred": "no"}, "`freeze_transferred` must be true or false, got 'no'"),
        ({"freeze_embeddings": "yes"}, "`freeze_embeddings` must be true or false, got 'yes'"),
        ({"train_head": 1}, "`train_head` must be true or false, got 1"),
        ({"lr_decay": "0.5"}, r"`lr_decay` must be a number in \(0, 1\], got '0.5'"),
        ({"lr_decay": True}, r"`lr_decay` must be a number in \(0, 1\], got True"),
        ({"reinit_seed": "42"}, "`reinit_seed` must be an integer >= 0, got '42'"),
        ({"reinit_seed": 1.5}, "`reinit_seed` must be an integer >= 0, got 1.5"),
        ({"version": "1"}, "`version` must be an integer from 1 to"),
        ({"version": True}, "`version` must be an integer from 1 to"),
    ],
)
def test_a_value_of_the_wrong_type_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransferConfig(**kwargs)


def test_unknown_keys_are_rejected_listing_the_valid_keys():
    with pytest.raises(
        ValueError, match=r"Unknown transfer-config key\(s\) \['reinit_top', 'stratgy'\]"
    ) as info:
        TransferConfig.from_dict({"stratgy": "full", "reinit_top": 1})
    valid = str(info.value).split("valid keys are: ", 1)[1].rstrip(".").split(", ")
    assert valid == TransferConfig.field_names()
    assert {"strategy", "reinit_top_k", "train_groups", "version"} <= set(valid)


def test_a_config_that_is_not_a_mapping_is_rejected():
    with pytest.raises(ValueError, match="must be a mapping of field names to values, got list"):
        TransferConfig.from_dict(["strategy", "full"])


def test_from_dict_validates_like_the_constructor():
    with pytest.raises(ValueError, match="`lr_decay` must be a number"):
        TransferConfig.from_dict({"lr_decay": 2})


# --------------------------------------------------------------------------------------------- round trip
ROUND_TRIP_CONFIGS = [
    TransferConfig(),
    TransferConfig(strategy="partial", reinit_top_k=2, freeze_transferred=True, reinit_seed=7, lr_decay=0.8),
    TransferConfig(strategy="partial", transfer_bottom_n=3, blocks=["encoder.block", "decoder.block"]),
    TransferConfig(strategy="layers", train_groups=["blocks[-2:]", "re:.*\\.bias"], head=["classifier"]),
    TransferConfig(strategy="layers", freeze_bottom_blocks="half", freeze_embeddings=True, train_head=False),
]


@pytest.mark.parametrize("config", ROUND_TRIP_CONFIGS)
def test_to_dict_and_from_dict_round_trip(config):
    data = config.to_dict()
    assert list(data) == TransferConfig.field_names()
    assert TransferConfig.from_dict(data) == config


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
@pytest.mark.parametrize("config", ROUND_TRIP_CONFIGS)
def test_save_and_load_round_trip(tmp_path, config, suffix):
    path = config.save(tmp_path / "nested" / f"transfer{suffix}")
    assert path == tmp_path / "nested" / f"transfer{suffix}"
    assert TransferConfig.load(path) == config


def test_the_yaml_file_is_plain_readable_yaml_in_field_order(tmp_path):
    config = TransferConfig(strategy="layers", freeze_bottom_blocks="half", lr_decay=0.9)
    text = config.save(tmp_path / "c.yaml").read_text()
    assert yaml.safe_load(text) == config.to_dict()
    assert [line.split(":")[0] for line in text.splitlines()] == TransferConfig.field_names()
    assert "strategy: layers\n" in text
    assert "!!python" not in text


def test_the_json_file_is_valid_json(tmp_path):
    config = TransferConfig(strategy="partial", reinit_top_k=1)
    assert json.loads(config.save(tmp_path / "c.json").read_text()) == config.to_dict()


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_saved_file_without_version_loads_as_version_1(tmp_path, suffix):
    data = TransferConfig(strategy="partial", reinit_top_k=1).to_dict()
    del data["version"]
    path = tmp_path / f"old{suffix}"
    path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
    loaded = TransferConfig.load(path)
    assert loaded.version == 1
    assert loaded == TransferConfig(strategy="partial", reinit_top_k=1, version=1)


def test_an_unversioned_file_stays_version_1_when_the_format_version_is_bumped(tmp_path, monkeypatch):
    import tl_plugin.config

    monkeypatch.setattr(tl_plugin.config, "CONFIG_VERSION", 2)  # a future tl_plugin with format version 2
    path = tmp_path / "old.yaml"
    path.write_text("strategy: layers\nfreeze_bottom_blocks: half\n")
    assert TransferConfig.load(path).version == 1


def test_a_saved_file_with_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "new.yaml"
    path.write_text(yaml.safe_dump({"strategy": "full", "version": CONFIG_VERSION + 1}))
    with pytest.raises(ValueError, match=f"got {CONFIG_VERSION + 1}. Upgrade tl_plugin"):
        TransferConfig.load(path)


def test_an_empty_yaml_file_loads_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert TransferConfig.load(path) == TransferConfig()


def test_a_saved_file_with_unknown_keys_is_refused(tmp_path):
    path = tmp_path / "typo.yml"
    path.write_text("strategy: layers\nfreeze_bottom_block: 2\n")
    with pytest.raises(ValueError, match=re.escape("Unknown transfer-config key(s) ['freeze_bottom_block']")):
        TransferConfig.load(path)


@pytest.mark.parametrize("name", ["config.txt", "config", "config.yaml.bak"])
def test_saving_to_an_unknown_suffix_is_refused(tmp_path, name):
    with pytest.raises(ValueError, match=r"`path` must end in .yaml, .yml or .json"):
        TransferConfig().save(tmp_path / name)
    assert not (tmp_path / name).exists()


def test_loading_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TransferConfig.load(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("name", "text", "line", "column", "problem"),
    [
        # an unclosed flow list: PyYAML notices at the next key (the problem mark), the list started at 2:15
        (
            "c.yaml",
            "strategy: layers\ntrain_groups: [head\nfreeze_embeddings: true\n",
            3,
            18,
            "expected ',' or ']', but got ':' (while parsing a flow sequence, started at line 2, column 15)",
        ),
        ("c.yml", "strategy: layers\n  reinit_top_k: 2\n", 2, 15, "mapping values are not allowed here"),
        ("c.yaml", "strategy: full\n\tlr_decay: 0.5\n", 2, 1, "character '\\t' that cannot start any token"),
        ("c.yaml", "strategy: full\nhead: [\x07]\n", 2, 8, "unacceptable character #x0007"),
        ("c.json", '{"strategy": "full",\n  "lr_decay": }\n', 2, 15, "invalid JSON: Expecting value"),
    ],
)
def test_a_malformed_file_names_the_file_line_and_column(tmp_path, name, text, line, column, problem):
    from tl_plugin.config import ConfigFileError

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigFileError) as info:
        TransferConfig.load(path)
    message = str(info.value)
    where = f"cannot be parsed at line {line}, column {column}: "
    assert message.startswith(f"Transfer config file {str(path)!r} {where}"), message
    assert problem in message
    assert (info.value.path, info.value.line, info.value.column) == (path, line, column)
    assert isinstance(info.value, ValueError)  # callers catching ValueError keep working
    assert not isinstance(info.value, yaml.YAMLError)


def test_a_file_that_is_not_utf8_text_is_named(tmp_path):
    from tl_plugin.config import ConfigFileError

    path = tmp_path / "c.yaml"
    path.write_bytes(b"strategy: \xff\n")
    expected = f"{str(path)!r} cannot be parsed: not UTF-8 text (byte 10"
    with pytest.raises(ConfigFileError, match=re.escape(expected)):
        TransferConfig.load(path)

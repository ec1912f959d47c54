"""`TransferConfig`: the typed, validated description of a transfer strategy, saved as YAML or JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .checks import check_int, check_str_list

#: Version of the saved config format. Bump it when a field changes meaning, and migrate in `_migrate`.
CONFIG_VERSION = 1

STRATEGIES = ("full", "partial", "layers")
Strategy = Literal["full", "partial", "layers"]


class ConfigFileError(ValueError):
    """A config or schedule file that cannot be parsed (malformed YAML or JSON, not UTF-8 text).

    The message names the file and, when the parser gives one, the line and column (1-based) of the problem.

    Attributes:
        path (`Path`): the file.
        line (`int` or `None`): 1-based line of the problem, when known.
        column (`int` or `None`): 1-based column of the problem, when known.
    """

    def __init__(
        self, path: Path, kind: str, problem: str, line: int | None = None, column: int | None = None
    ) -> None:
        self.path = path
        self.line = line
        self.column = column
        where = f" at line {line}, column {column}" if line is not None and column is not None else ""
        super().__init__(
            f"{kind} file {str(path)!r} cannot be parsed{where}: {problem}. Fix the file and load it again."
        )


def read_config_file(path: Path, kind: str, json_suffix: bool = True) -> Any:
    """Parse `path` as JSON (suffix ``.json``, when `json_suffix`) or YAML (`yaml.safe_load`, which also reads JSON).

    `kind` names the file in errors (e.g. ``"Transfer config"``). Raises `ConfigFileError` (a `ValueError`) naming
    the file, line and column when the text cannot be parsed.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigFileError(path, kind, f"not UTF-8 text (byte {err.start}: {err.reason})") from err
    if json_suffix and path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigFileError(path, kind, f"invalid JSON: {err.msg}", err.lineno, err.colno) from err
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:  # scanner / parser / composer errors: PyYAML marks are 0-based
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or type(err).__name__
        if err.problem and err.context and err.context_mark is not None:
            start = err.context_mark
            problem += f" ({err.context}, started at line {start.line + 1}, column {start.column + 1})"
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
        raise ConfigFileError(path, kind, f"invalid YAML: {problem}", line, column) from err
    except yaml.reader.ReaderError as err:  # a character YAML does not allow; PyYAML gives its offset only
        line = text.count("\n", 0, err.position) + 1
        column = err.position - (text.rfind("\n", 0, err.position) + 1) + 1
        problem = f"unacceptable character #x{err.character:04x} ({err.reason})"
        raise ConfigFileError(path, kind, f"invalid YAML: {problem}", line, column) from err
    except yaml.YAMLError as err:
        raise ConfigFileError(path, kind, f"invalid YAML: {err}") from err


@dataclass
class TransferConfig:
    """How to transfer a pretrained model: which weights to reuse, which to re-initialise, which to train.

    Args:
        strategy (`str`, *optional*, defaults to ``"full"``):
            - ``"full"``: all pretrained weights are reused and everything is trained (``freeze_embeddings``
              may still freeze the input embeddings);
            - ``"partial"``: only part of the pretrained weights are reused: re-initialise the top
              ``reinit_top_k`` blocks, or keep only the bottom ``transfer_bottom_n`` blocks' weights (the blocks
              above and the ``other`` group are re-initialised with the model's own initialisation);
            - ``"layers"``: specific-layer transfer: only ``train_groups`` (selectors such as ``"blocks[-2:]"``)
              are trained, or, when it is empty, everything above the bottom ``freeze_bottom_blocks`` blocks;
              the rest is frozen.
        reinit_top_k (`int`, *optional*, defaults to 0): ``partial``: number of top blocks to re-initialise.
        transfer_bottom_n (`int`, *optional*): ``partial``: number of bottom blocks whose weights are kept.
        freeze_transferred (`bool`, *optional*, defaults to `False`):
            ``partial``: freeze the reused (transferred) blocks and embeddings, train only the re-initialised part.
        train_groups (`list[str]`, *optional*): ``layers``: selectors of the groups to train.
        freeze_bottom_blocks (`int` or ``"half"``, *optional*, defaults to 0):
            ``layers``: when ``train_groups`` is empty, freeze the embeddings and this many bottom blocks
            (``"half"``: half of the model's blocks, rounded down) and train the rest.
        freeze_embeddings (`bool`, *optional*, defaults to `False`): freeze the ``embeddings`` group.
        train_head (`bool`, *optional*, defaults to `True`): train the ``head`` group (always, in every strategy).
        lr_decay (`float`, *optional*):
            layer-wise LR decay factor in (0, 1]: lr of a group = base lr x lr_decay ** (depth from the top).
            Used by the optimizer factory and the callbacks; `None` means no decay.
        blocks (`str` or `list[str]`, *optional*): override for the block stack, see `discover_layer_groups`.
        head (`list[str]`, *optional*): override for the head modules, see `discover_layer_groups`.
        reinit_seed (`int`, *optional*): seed for re-initialisation (`None`: the current RNG state).
        version (`int`, *optional*, defaults to `CONFIG_VERSION`): format version of a saved config.

    Example:

    ```python
    >>> from tl_plugin import TransferConfig
    >>> config = TransferConfig(strategy="partial", reinit_top_k=2)
    >>> TransferConfig.from_dict(config.to_dict()) == config
    True
    >>> TransferConfig(strategy="everything")
    Traceback (most recent call last):
    ...
    ValueError: `strategy` must be one of 'full', 'partial', 'layers', got 'everything'.

    ```
    """

    strategy: Strategy = field(
        default="full", metadata={"help": "Transfer strategy: full, partial or layers."}
    )
    reinit_top_k: int = field(default=0, metadata={"help": "partial: re-initialise the top k blocks."})
    transfer_bottom_n: int | None = field(
        default=None, metadata={"help": "partial: keep only the bottom N blocks' pretrained weights."}
    )
    freeze_transferred: bool = field(
        default=False, metadata={"help": "partial: freeze the reused blocks and embeddings."}
    )
    train_groups: list[str] = field(
        default_factory=list, metadata={"help": "layers: groups to train, e.g. 'blocks[-2:]' 'head'."}
    )
    freeze_bottom_blocks: int | str = field(
        default=0, metadata={"help": "layers: freeze embeddings + this many bottom blocks ('half' = half)."}
    )
    freeze_embeddings: bool = field(default=False, metadata={"help": "Freeze the embeddings group."})
    train_head: bool = field(default=True, metadata={"help": "Train the head group."})
    lr_decay: float | None = field(
        default=None, metadata={"help": "Layer-wise LR decay factor in (0, 1] (None: no decay)."}
    )
    blocks: str | list[str] | None = field(
        default=None, metadata={"help": "Override of the block stack: module path or regex."}
    )
    head: list[str] | None = field(default=None, metadata={"help": "Override of the head modules."})
    reinit_seed: int | None = field(default=None, metadata={"help": "Seed for re-initialisation."})
    version: int = field(default=CONFIG_VERSION, metadata={"help": "Format version of the saved config."})

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"`strategy` must be one of {', '.join(repr(s) for s in STRATEGIES)}, got {self.strategy!r}."
            )
        if (
            not isinstance(self.version, int)
            or isinstance(self.version, bool)
            or not 1 <= self.version <= CONFIG_VERSION
        ):
            raise ValueError(
                f"`version` must be an integer from 1 to {CONFIG_VERSION} (this tl_plugin reads versions up to "
                f"{CONFIG_VERSION}), got {self.version!r}. Upgrade tl_plugin to read newer configs."
            )
        check_int("reinit_top_k", self.reinit_top_k, minimum=0)
        if self.transfer_bottom_n is not None:
            check_int("transfer_bottom_n", self.transfer_bottom_n, minimum=0)
        if self.reinit_seed is not None:
            check_int("reinit_seed", self.reinit_seed, minimum=0)
        if self.freeze_bottom_blocks != "half" and (
            not isinstance(self.freeze_bottom_blocks, int)
            or isinstance(self.freeze_bottom_blocks, bool)
            or self.freeze_bottom_blocks < 0
        ):
            raise ValueError(
                f"`freeze_bottom_blocks` must be an integer >= 0 or 'half', got {self.freeze_bottom_blocks!r}."
            )
        check_str_list("train_groups", self.train_groups)
        if self.head is not None:
            check_str_list("head", self.head)
        if self.blocks is not None and not isinstance(self.blocks, str):
            check_str_list("blocks", self.blocks)
        for name in ("freeze_transferred", "freeze_embeddings", "train_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be true or false, got {getattr(self, name)!r}.")
        if self.lr_decay is not None and (
            isinstance(self.lr_decay, bool)
            or not isinstance(self.lr_decay, (int, float))
            or not 0 < self.lr_decay <= 1
        ):
            raise ValueError(f"`lr_decay` must be a number in (0, 1], got {self.lr_decay!r}.")
        self._check_strategy_options()

    def _check_strategy_options(self) -> None:
        partial_set = self.reinit_top_k > 0 or self.transfer_bottom_n is not None
        layers_set = bool(self.train_groups) or self.freeze_bottom_blocks not in (0,)
        if self.strategy == "partial":
            if self.reinit_top_k > 0 and self.transfer_bottom_n is not None:
                raise ValueError(
                    "strategy 'partial' takes either `reinit_top_k` or `transfer_bottom_n`, not both "
                    f"(got reinit_top_k={self.reinit_top_k}, transfer_bottom_n={self.transfer_bottom_n})."
                )
            if not partial_set:
                raise ValueError(
                    "strategy 'partial' needs `reinit_top_k` > 0 (re-initialise the top k blocks) or "
                    "`transfer_bottom_n` (keep only the bottom N blocks' weights)."
                )
        elif partial_set or self.freeze_transferred:
            raise ValueError(
                f"`reinit_top_k`, `transfer_bottom_n` and `freeze_transferred` only apply to strategy 'partial', "
                f"got strategy={self.strategy!r}."
            )
        if self.strategy == "layers":
            if self.train_groups and self.freeze_bottom_blocks not in (0,):
                raise ValueError(
                    "strategy 'layers' takes either `train_groups` or `freeze_bottom_blocks`, not both "
                    f"(got train_groups={self.train_groups}, freeze_bottom_blocks={self.freeze_bottom_blocks!r})."
                )
            if not layers_set:
                raise ValueError(
                    "strategy 'layers' needs `train_groups` (e.g. ['blocks[-2:]', 'head']) or `freeze_bottom_blocks` "
                    "(an integer, or 'half')."
                )
        elif layers_set:
            raise ValueError(
                f"`train_groups` and `freeze_bottom_blocks` only apply to strategy 'layers', got "
                f"strategy={self.strategy!r}."
            )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON/YAML-safe) of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransferConfig:
        """Build a config from a dict; unknown keys are an error listing the valid keys."""
        if not isinstance(data, dict):
            raise ValueError(
                f"A transfer config must be a mapping of field names to values, got {type(data).__name__}."
            )
        data = _migrate(dict(data))
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"Unknown transfer-config key(s) {unknown}; valid keys are: {', '.join(cls.field_names())}."
            )
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        """Write the config as YAML (``.yaml``/``.yml``) or JSON (``.json``); returns the path."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix in (".yaml", ".yml"):
            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        elif suffix == ".json":
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        else:
            raise ValueError(f"`path` must end in .yaml, .yml or .json, got {str(path)!r}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TransferConfig:
        """Read a config written by :meth:`save` (YAML via `yaml.safe_load`, or JSON).

        Raises:
            `FileNotFoundError`: when `path` is not a file.
            `ConfigFileError` (a `ValueError`): when the file is not valid YAML / JSON, naming the file, the line
                and the column of the problem.
            `ValueError`: when the content is not a valid config.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Transfer config file {str(path)!r} does not exist.")
        data = read_config_file(path, "Transfer config")
        if data is None:
            data = {}
        return cls.from_dict(data)


def _migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Bring an older saved config up to `CONFIG_VERSION` (version 1 is the first: nothing to do yet).

    A config saved without a ``version`` predates versioning: it is version 1, whatever `CONFIG_VERSION` is now.
    """
    data.setdefault("version", 1)
    return data

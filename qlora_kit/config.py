"""The typed recipe: YAML plus `key=value` overrides in, a validated frozen `Recipe` out.

Everything a run needs is checked here, before a model or dataset is touched: unknown keys (with the closest
valid name), types (an int is not a bool; an int is fine where a float is expected) and ranges. Key names
follow HF TrainingArguments / axolotl so existing recipes translate line by line. Paths in a recipe file are
relative to that file; paths given as overrides on the command line are relative to the working directory,
because that is where the user typed them.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from qlora_kit.atomic import atomic_write
from qlora_kit.device import DTYPES
from qlora_kit.distributed import DistributedConfig
from qlora_kit.errors import ConfigError
from qlora_kit.lora import LoraConfig
from qlora_kit.optim import OPTIMIZERS, SCHEDULERS
from qlora_kit.quant import QuantConfig

COMPUTE_DTYPES = tuple(DTYPES)
FORMATS = ("alpaca", "messages", "text")
ON_NONFINITE = ("stop", "skip")
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt", ".arrow")
_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass(frozen=True)
class DatasetConfig:
    """Where the examples come from and how they are rendered."""

    path: str
    """A local JSON / JSONL / Parquet / CSV file or directory, or a Hugging Face Hub dataset name."""
    format: str = "alpaca"
    """"alpaca" (instruction, input, output), "messages" (OpenAI `messages` or ShareGPT `conversations`) or "text"."""
    split: str = "train"
    """Split to train on (local files have only "train")."""
    eval_path: str | None = None
    """A separate evaluation set, in the same format."""
    eval_split: str | None = None
    """Split of `eval_path` (default: `split`), or without `eval_path` a split of `path` held out for evaluation."""
    eval_fraction: float = 0.0
    """Without an eval set, hold out this fraction of the training rows (seeded); 0 disables evaluation."""
    train_on_prompt: bool = False
    """Also train on prompt / user / system tokens; by default their labels are -100 and only responses count."""
    text_field: str = "text"
    """Column holding the document for the "text" format."""

    def __post_init__(self) -> None:
        _require(bool(self.path), "dataset.path", "a non-empty path or dataset name", self.path)
        _one_of("dataset.format", self.format, FORMATS)
        _require(0.0 <= self.eval_fraction < 1.0, "dataset.eval_fraction", "in [0, 1)", self.eval_fraction)
        _require(bool(self.text_field), "dataset.text_field", "a non-empty column name", self.text_field)
        if self.eval_fraction > 0 and (self.eval_path or self.eval_split):
            raise ConfigError("dataset.eval_fraction holds out rows only without eval_path/eval_split; set one of them")


@dataclass(frozen=True)
class Recipe:
    """One fine-tuning run: the model, the data, the adapters and the loop."""

    model: str
    """Directory of a Hugging Face checkpoint (config.json, tokenizer, *.safetensors)."""
    dataset: DatasetConfig
    """Training (and evaluation) data."""
    model_config: str | None = None
    """A config.json describing `model`, so memory can be planned before the weights are downloaded."""
    trust_remote_code: bool = False
    """Allow a checkpoint's own Python code to run when loading its config and tokenizer."""
    compute_dtype: str = "bfloat16"
    """Dtype the 4-bit weights are dequantized to for the matmuls: bfloat16 | float16 | float32."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapter shape and placement."""
    quant: QuantConfig = field(default_factory=QuantConfig)
    """Storage of the frozen base."""
    output_dir: str = "runs/default"
    """Where adapters, checkpoints, logs and the resolved recipe go (load_recipe's default: ./runs/<recipe name>)."""
    max_steps: int = 0
    """Optimizer steps to run; when > 0 it decides the length of training and `epochs` is ignored."""
    epochs: float = 1.0
    """Passes over the training set, used when `max_steps` is 0 (fractions allowed)."""
    batch_size: int = 1
    """Examples (or packed rows) per micro-batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; the effective batch is batch_size × this."""
    max_seq_len: int = 512
    """Tokens per example (or packed row); longer examples are truncated and counted."""
    learning_rate: float = 2e-4
    """Peak learning rate."""
    lr_scheduler: str = "constant"
    """Shape after warmup: constant | cosine | linear (to zero at the last step)."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming up linearly from 0; `warmup_steps` wins when > 0."""
    warmup_steps: int = 0
    """Warmup length in steps, overriding `warmup_ratio` when > 0."""
    max_grad_norm: float = 0.3
    """Clip the global gradient norm to this (the QLoRA paper's 0.3); 0 disables clipping."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay on the adapters."""
    seed: int = 42
    """Seeds adapter init, dropout, the eval hold-out and the shuffle order."""
    save_steps: int = 0
    """Save a resumable checkpoint every this many steps; 0 saves only at the end."""
    save_total_limit: int = 3
    """Keep only the last N checkpoints; 0 keeps them all."""
    logging_steps: int = 10
    """Log loss, learning rate and grad norm every this many steps."""
    eval_steps: int = 0
    """Evaluate every this many steps when there is an eval set; 0 evaluates only at the end."""
    optimizer: str = "paged_adamw_32bit"
    """paged_adamw_32bit | paged_adamw_8bit | adamw_8bit | adamw (torch's)."""
    gradient_checkpointing: bool = True
    """Recompute each block's activations in backward, trading ~30% compute for most activation memory."""
    packing: bool = False
    """Concatenate several examples per row of max_seq_len (attention stays within each example)."""
    padding_free: bool = True
    """Without packing: run each batch as one row of its examples back to back (positions restarting, attention
    within each example) rather than padded to the longest. The same examples per step and the same loss; the
    gradients equal to rounding; none of the padding's compute. Applies where the model runs transformers' sdpa
    (others are padded as before); false pads every batch."""
    tensorboard: bool = False
    """Also write TensorBoard event files to output_dir."""
    on_nonfinite: str = "stop"
    """On a nan/inf loss or gradient: "stop" the run, or "skip" that step and go on."""
    max_eval_batches: int = 0
    """Cap on batches per evaluation, to keep it cheap on large eval sets; 0 uses them all."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """How several processes (torchrun) share the run; batch_size is per process, so the global batch is
    batch_size × gradient_accumulation_steps × world size."""

    def __post_init__(self) -> None:
        _require(bool(self.model), "model", "a checkpoint directory", self.model)
        _one_of("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        _require(self.max_steps >= 0, "max_steps", ">= 0", self.max_steps)
        _require(self.epochs >= 0, "epochs", ">= 0", self.epochs)
        if self.max_steps == 0 and self.epochs == 0:
            raise ConfigError("max_steps and epochs are both 0: set max_steps > 0 or epochs > 0")
        for key in ("batch_size", "gradient_accumulation_steps", "max_seq_len", "logging_steps"):
            _require(getattr(self, key) >= 1, key, ">= 1", getattr(self, key))
        for key in ("warmup_steps", "max_grad_norm", "weight_decay", "seed", "save_steps", "save_total_limit",
                    "eval_steps", "max_eval_batches"):
            _require(getattr(self, key) >= 0, key, ">= 0", getattr(self, key))
        _require(self.learning_rate > 0, "learning_rate", "> 0", self.learning_rate)
        _require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "in [0, 1)", self.warmup_ratio)
        _one_of("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("on_nonfinite", self.on_nonfinite, ON_NONFINITE)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe data (tuples become lists) that `load_recipe` reads back to an equal Recipe."""
        return _plain(dataclasses.asdict(self))


def _require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {allowed}, got {value!r}")


def _one_of(key: str, value: Any, choices: Sequence[str]) -> None:
    _require(value in choices, key, f"one of {', '.join(choices)}", value)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `2e-4` is a string; recipes are full of such numbers, so read them as 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.\d*|\.\d+|\d[\d_]*)(?:[eE][-+]?\d+)$|^[-+]?(?:\d[\d_]*)?\.\d+$|^[-+]?\d[\d_]*\.$"),
    list("-+0123456789."),
)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """`["lora.r=8", "lora.target_modules=[q_proj,v_proj]"]` -> `{"lora": {"r": 8, "target_modules": [...]}}`.

    Values are parsed as YAML (numbers, booleans, null, lists); the structure is checked later, with the rest.
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. lora.r=8)")
        try:
            value = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
        *parents, leaf = key.strip().split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is already set to a value by another override")
        node[leaf] = value
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _resolve(value: Any, base: Path, maybe_hub: bool = False) -> Any:
    """An absolute path (`~` expanded); a relative dataset path not on disk that looks like `owner/name` stays a
    hub name."""
    if isinstance(value, str):
        value = os.path.expanduser(value)
    if not isinstance(value, str) or not value or os.path.isabs(value):
        return value
    local = base / value
    if maybe_hub and not local.exists() and _HUB_NAME.match(value) and not value.endswith(DATA_SUFFIXES):
        return value
    return str(local.resolve())


def _resolve_paths(data: Mapping[str, Any], base: Path) -> dict[str, Any]:
    out = dict(data)
    for key in ("model", "model_config", "output_dir"):
        if key in out:
            out[key] = _resolve(out[key], base)
    if isinstance(out.get("dataset"), Mapping):
        dataset = dict(out["dataset"])
        for key in ("path", "eval_path"):
            if key in dataset:
                dataset[key] = _resolve(dataset[key], base, maybe_hub=True)
        out["dataset"] = dataset
    if isinstance(out.get("quant"), Mapping) and "calibration" in out["quant"]:
        out["quant"] = {**out["quant"], "calibration": _resolve(out["quant"]["calibration"], base)}
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError(f"recipe not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of key: value at the top level")
    return data


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` checked against the annotation `hint`; ints widen to float, lists of strings become tuples."""
    if get_origin(hint) in (Union, types.UnionType):
        if value is None and type(None) in get_args(hint):
            return None
        (hint,) = [arg for arg in get_args(hint) if arg is not type(None)]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping of its own keys, got {value!r}")
        return _build(hint, value, key + ".")
    if get_origin(hint) is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{key} must be a list of strings, got {value!r}")
        return tuple(items)
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ConfigError(f"{key} must be {_EXPECTED[hint]}, got {value!r} ({type(value).__name__})")
    return value


def _unknown_key(key: str, prefix: str, names: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"did you mean {prefix + close[0]!r}?" if close else f"valid keys: {', '.join(prefix + n for n in names)}"
    return ConfigError(f"unknown key {prefix + key!r}; {hint}")


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """An instance of dataclass `cls` from `data`, every key and type checked; ranges are checked by `cls` itself."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise _unknown_key(str(key), prefix, list(fields))
    hints = get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(prefix + name, data[name], hints[name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {prefix + name!r}")
    return cls(**kwargs)


def load_recipe(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> Recipe:
    """A validated Recipe from a YAML file (or a dict, with paths relative to the working directory) and overrides."""
    if isinstance(source, Mapping):
        data, base, name = dict(source), Path.cwd(), "default"
    else:
        path = Path(source)
        data, base, name = _read_yaml(path), path.resolve().parent, path.stem
    data = _resolve_paths(data, base)
    data.setdefault("output_dir", str(Path.cwd() / "runs" / name))  # absolute, so a dumped recipe means the same
    return _build(Recipe, _merge(data, _resolve_paths(parse_overrides(overrides), Path.cwd())))


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as YAML, atomically, so a crash never leaves half a recipe next to the outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))

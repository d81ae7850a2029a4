"""LoRA adapters on disk in the PEFT format, both ways.

Written: `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, which `peft.PeftModel.from_pretrained` loads with
every tensor matched. Read: the same, or what peft wrote (keys with or without the adapter name, rsLoRA, any
subset of modules). The adapter's modules are found by name in the loaded model; nothing is guessed.

Beside them the trainer writes what inference needs to reproduce training: the record of the 4-bit layers
(`targets.RECORD_NAME`) and, when training rendered conversations, the chat template it used
(`CHAT_TEMPLATE_NAME`, transformers' own file name, so an exported model's tokenizer picks it up too).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from qlora_kit.safetensors_io import TensorInfo, read_header
from qlora_kit.atomic import atomic_write
from qlora_kit.errors import CheckpointError
from qlora_kit.lora import LoraConfig, QLinear, RowGroups, route_rows
from qlora_kit.targets import RECORD_NAME, LayerRecord, read_record, record_text

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CHAT_TEMPLATE_NAME = "chat_template.jinja"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<ab>lora_A|lora_B)(?:\.(?P<name>[^.]+))?\.weight$")


def adapted_modules(model: nn.Module, name: str = "default") -> dict[str, QLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QLinear) and name in m.lora_A}


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT's saved layout: adapter name dropped, `base_model.model.` in front."""
    out = {}
    for module_name, layer in adapted_modules(model, name).items():
        out[f"{PREFIX}{module_name}.lora_A.weight"] = layer.lora_A[name].weight.detach()
        out[f"{PREFIX}{module_name}.lora_B.weight"] = layer.lora_B[name].weight.detach()
    return out


def adapter_config(model: nn.Module, lora: LoraConfig, base_model: str, name: str = "default") -> dict:
    modules = adapted_modules(model, name)
    conv1d = type(model).__name__.startswith("GPT2")  # peft marks Conv1D-based models as fan_in_fan_out
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if hasattr(model, "lm_head") else "FEATURE_EXTRACTION",
        "base_model_name_or_path": base_model,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "use_rslora": lora.use_rslora,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}),
        "bias": "none",
        "fan_in_fan_out": conv1d,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


@dataclass
class AdapterFiles:
    """An adapter directory's contents in memory: the PEFT tensors (saved layout) and config, the record of the
    4-bit layers, the chat template. What `save_adapter` writes, and the adapter part of a training checkpoint."""

    tensors: dict[str, torch.Tensor]
    config: dict
    record: LayerRecord | None = None
    chat_template: str | None = None

    @classmethod
    def of(cls, model: nn.Module, lora: LoraConfig, base_model: str, name: str = "default",
           chat_template: str | None = None, tensors: dict[str, torch.Tensor] | None = None) -> AdapterFiles:
        """Adapter `name` of `model`, copied to the CPU. `tensors`: `adapter_state_dict(model, name)` already
        gathered into whole tensors (a sharded model's)."""
        tensors = adapter_state_dict(model, name) if tensors is None else tensors
        tensors = {k: v.to("cpu", copy=True).contiguous() for k, v in tensors.items()}
        return cls(tensors, adapter_config(model, lora, base_model, name), layer_record(model), chat_template)

    def write(self, out_dir: Path) -> None:
        """Each file atomically (temp file + rename), adapter_config.json last: it is what marks an adapter."""
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / WEIGHTS_NAME, lambda p: save_file(self.tensors, p, metadata={"format": "pt"}))
        if self.record is not None:
            atomic_write(out_dir / RECORD_NAME, record_text(self.record))
        if self.chat_template:
            atomic_write(out_dir / CHAT_TEMPLATE_NAME, self.chat_template)
        atomic_write(out_dir / CONFIG_NAME, json.dumps(self.config, indent=2) + "\n")

    @classmethod
    def read(cls, adapter_dir: Path) -> AdapterFiles:
        """What `write` wrote (or peft did), tensors under their saved keys; every file checked as it is read."""
        _, raw = read_adapter_config(adapter_dir)
        path = _weights_file(adapter_dir)
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read ({e}); the file is corrupt or truncated") from None
        _modules(path, tensors)
        return cls(tensors, raw, read_record(adapter_dir), read_chat_template(adapter_dir))


def save_adapter(model: nn.Module, out_dir: Path, lora: LoraConfig, base_model: str, name: str = "default",
                 chat_template: str | None = None) -> None:
    """Write the PEFT files into `out_dir` (created), and beside them the record of the layers the base holds in
    4 bits (`targets.RECORD_NAME`) when the model came from the loader, and `chat_template` (the one training
    rendered conversations with) when given."""
    AdapterFiles.of(model, lora, base_model, name, chat_template).write(out_dir)


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor], name: str = "default",
                       copy: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> None:
    """Copy saved tensors (`adapter_state_dict`'s keys) into adapter `name` of `model`, which must have exactly
    those layers with those shapes; a difference is an error naming it (a changed lora.target_modules or r).
    `copy(param, whole)`: how a whole tensor goes into a parameter that may be a shard (`Dist.load_into`)."""
    own = adapter_state_dict(model, name)
    if tensors.keys() != own.keys():
        raise CheckpointError(
            "the saved adapter and this model adapt different layers (lora.target_modules changed?): only in the "
            f"saved one: {_few(tensors.keys() - own.keys())}; only in this model: {_few(own.keys() - tensors.keys())}"
        )
    for key, param in own.items():
        if param.shape != tensors[key].shape:
            raise CheckpointError(f"{key.removeprefix(PREFIX)} has shape {list(tensors[key].shape)} in the saved "
                                  f"adapter, {list(param.shape)} in this model (lora.r changed?)")
    with torch.no_grad():
        for key, param in own.items():
            if copy is None:
                param.copy_(tensors[key])  # detached views share the parameters' storage
            else:
                copy(param, tensors[key])


def _few(keys) -> str:
    """Up to three module names of a set of adapter keys, for a message."""
    modules = sorted({m["module"] if (m := _KEY.match(k)) else k for k in keys})
    return "none" if not modules else ", ".join(modules[:3]) + (f" and {len(modules) - 3} more" if len(modules) > 3 else "")


def layer_record(model: nn.Module) -> LayerRecord | None:
    """What `load_quantized` held in 4 bits, and how; None for a model it did not build."""
    targets, quant = getattr(model, "qlora_targets", None), getattr(model, "qlora_quant", None)
    if not targets or quant is None:
        return None
    return LayerRecord(quant, getattr(model, "base_model_prefix", "") or "", dict(targets))


def read_adapter_config(adapter_dir: Path) -> tuple[LoraConfig, dict]:
    """The LoraConfig of a PEFT adapter directory, plus the raw JSON (for base_model_name_or_path and friends)."""
    path = adapter_dir / CONFIG_NAME
    if not adapter_dir.is_dir():
        raise CheckpointError(f"{adapter_dir}: no such adapter directory (it holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; an adapter directory needs adapter_config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if raw.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {raw.get('peft_type')!r} is not LORA")
    targets = raw.get("target_modules") or ["all-linear"]
    lora = LoraConfig(
        r=int(raw["r"]), alpha=float(raw.get("lora_alpha", raw["r"])), dropout=float(raw.get("lora_dropout", 0.0)),
        target_modules=[targets] if isinstance(targets, str) else targets, use_rslora=bool(raw.get("use_rslora")),
    )
    return lora, raw


def read_chat_template(adapter_dir: Path) -> str | None:
    """The chat template the adapter was trained with, or None when training rendered no conversations."""
    path = Path(adapter_dir) / CHAT_TEMPLATE_NAME
    try:
        return path.read_text(encoding="utf-8") if path.is_file() else None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); restore it or delete it") from None


def read_adapter_weights(adapter_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """module name -> {"lora_A": tensor, "lora_B": tensor}, whatever adapter name peft put in the keys."""
    path = _weights_file(adapter_dir)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read ({e}); the file is corrupt or truncated") from None
    return {module: {ab: tensors[key] for ab, key in keys.items()} for module, keys in _modules(path, tensors).items()}


def adapter_index(adapter_dir: Path) -> tuple[dict[str, TensorInfo], dict[str, dict[str, str]]]:
    """The adapter file's tensor index (its header only) and module name -> {"lora_A": key, "lora_B": key}.

    Why, beside `read_adapter_weights`: export reads each layer's factors when it merges that layer instead of
    holding the whole adapter (3.3 GB in fp32 at r=64 on a 70B model) for the whole run."""
    path = _weights_file(adapter_dir)
    try:
        infos = read_header(path)
    except CheckpointError as e:
        detail = str(e).removeprefix(f"{path}: ")
        raise CheckpointError(f"{path}: cannot read ({detail}); the file is corrupt or truncated") from None
    return infos, _modules(path, infos)


def _weights_file(adapter_dir: Path) -> Path:
    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; an adapter directory needs {WEIGHTS_NAME}")
    return path


def _modules(path: Path, keys) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for key in keys:
        m = _KEY.match(key)
        if m is None:
            raise CheckpointError(f"{path}: unexpected tensor {key!r}; only LoRA A/B weights are supported")
        out.setdefault(m["module"], {})[m["ab"]] = key
    return out


def load_adapter(model: nn.Module, adapter_dir: str | Path, name: str = "default") -> LoraConfig:
    """Add adapter `name` from a PEFT directory to the modules it names; every tensor must find its module."""
    adapter_dir = Path(adapter_dir)
    lora, _ = read_adapter_config(adapter_dir)
    weights = read_adapter_weights(adapter_dir)
    _check_quantization(model, adapter_dir)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    for module_name, ab in weights.items():
        layer = layers.get(module_name)
        if layer is None or set(ab) != {"lora_A", "lora_B"}:
            raise CheckpointError(
                f"{adapter_dir}: adapter tensors for {module_name!r} match no quantized linear layer of this "
                "model (is it the base the adapter was trained on?)"
            )
        r = ab["lora_A"].shape[0]
        layer.add_adapter(name, LoraConfig(r, lora.alpha, lora.dropout, lora.target_modules, lora.use_rslora))
        for key in ("lora_A", "lora_B"):
            param = getattr(layer, key)[name].weight
            if param.shape != ab[key].shape:
                raise CheckpointError(
                    f"{adapter_dir}: {module_name}.{key} has shape {list(ab[key].shape)}, "
                    f"the model needs {list(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(ab[key])
    return lora


def _check_quantization(model: nn.Module, adapter_dir: Path) -> None:
    """Warn when the adapter was trained against a base quantized otherwise than this one: it still loads (serving
    on another base can be deliberate), but its outputs will not be the ones evaluated after training."""
    record, quant = read_record(adapter_dir), getattr(model, "qlora_quant", None)
    if record is not None and quant is not None and record.quant != quant:
        log.warning(
            "%s was trained against a %s base; this model holds %s, so its outputs will differ from training's "
            "(load the base with the recorded quantization to match)", adapter_dir, record.quant, quant,
        )


# --- several adapters on one base ------------------------------------------------------------------------


def _layers(model: nn.Module) -> list[QLinear]:
    return [m for m in model.modules() if isinstance(m, QLinear)]


def adapter_names(model: nn.Module) -> list[str]:
    return sorted({name for layer in _layers(model) for name in layer.lora_A})


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Switch every layer to adapter `name` (None: the bare base). Nothing is reloaded or copied."""
    if name is not None and name not in adapter_names(model):
        raise CheckpointError(f"no adapter named {name!r}; loaded: {', '.join(adapter_names(model)) or 'none'}")
    for layer in _layers(model):
        layer.active_adapter = name


def merge_adapter(model: nn.Module, name: str) -> None:
    """Fold `name` into dense copies of the dequantized weights (zero adapter latency); `unmerge_adapters` undoes it."""
    set_active_adapter(model, name)
    for layer in _layers(model):
        if name in layer.lora_A:
            layer.merge(name)


def unmerge_adapters(model: nn.Module) -> None:
    for layer in _layers(model):
        layer.unmerge()


@contextmanager
def per_row_adapters(model: nn.Module, names: list[str | None]) -> Iterator[None]:
    """`with per_row_adapters(model, ["a", "b", None, "a"]):` runs row i of every batch with adapter names[i]
    (None: the bare base) in one forward pass; outputs equal running each row alone with its adapter.

    Safe to enter from several threads at once on one model, and nested: the routing belongs to the calling
    thread's context (`lora.route_rows`), not to the layers, so concurrent requests never see each other's rows."""
    unknown = {n for n in names if n is not None} - set(adapter_names(model))
    if unknown:
        raise CheckpointError(f"no adapter named {', '.join(sorted(unknown))}; loaded: {adapter_names(model)}")
    layers = _layers(model)
    if any(layer.merged is not None for layer in layers):
        raise CheckpointError("unmerge adapters before running per-row adapter batches")
    with route_rows(layers, RowGroups(names)):
        yield

"""Which linear layers a model holds in 4 bits, and the record of them that an adapter carries.

Why a record: exporting an adapter must know every layer that training quantized — each is written as
dequant(quant(W)), the weight the adapter saw — and with which settings. The architecture knows the layers,
but asking it means importing transformers' modeling code and building the model, about a second, which is
as long as merging a 300M model takes. So the trainer writes what it quantized beside the adapter
(`qlora_kit.json`: the quantization settings and every quantized layer with its shape) and export reads that.
peft ignores the file; an adapter without it (one peft wrote) is exported by building the architecture.
"""

from __future__ import annotations

import json
from collections.abc import Container
from dataclasses import asdict, dataclass
from pathlib import Path

from qlora_kit.errors import CheckpointError, ConfigError
from qlora_kit.quant import QuantConfig

RECORD_NAME = "qlora_kit.json"
_FORMAT = "qlora-kit quantized layers"
_VERSION = 1


@dataclass(frozen=True)
class Target:
    """A linear layer to hold in 4 bits; Conv1D (GPT-2) stores its weight transposed and is flipped on load."""

    name: str
    transposed: bool
    has_bias: bool
    shape: tuple[int, int]
    """(out_features, in_features), whatever the orientation on disk."""

    @property
    def stored_shape(self) -> tuple[int, int]:
        """The weight's shape in the checkpoint."""
        return self.shape[::-1] if self.transposed else self.shape


@dataclass(frozen=True)
class LayerRecord:
    """What training held in 4 bits: the settings, the model's base prefix (`model`, `bert`, ...) and the layers."""

    quant: QuantConfig
    base_model_prefix: str
    targets: dict[str, Target]


def record_text(record: LayerRecord) -> str:
    """The record as JSON, one layer per line (a 70B model has 560 of them)."""
    head = {"format": _FORMAT, "version": _VERSION, "quantization": asdict(record.quant),
            "base_model_prefix": record.base_model_prefix}
    layers = [
        f"  {json.dumps(name)}: " + json.dumps({"shape": list(t.shape), "conv1d": t.transposed, "bias": t.has_bias})
        for name, t in sorted(record.targets.items())
    ]
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    return "{\n" + "\n".join(lines) + '\n  "layers": {\n' + ",\n".join("  " + x for x in layers) + "\n  }\n}\n"


def read_record(adapter_dir: Path) -> LayerRecord | None:
    """The adapter's record, or None when it has none; a damaged one is an error, not a silent fallback."""
    path = adapter_dir / RECORD_NAME
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != _FORMAT or doc.get("version") != _VERSION:
            raise ValueError(f"format {doc.get('format')!r} version {doc.get('version')!r} is not {_FORMAT!r} "
                             f"version {_VERSION}")
        quant = QuantConfig(**doc["quantization"])
        targets = {
            name: Target(name, bool(layer["conv1d"]), bool(layer["bias"]), _shape(layer["shape"]))
            for name, layer in doc["layers"].items()
        }
        return LayerRecord(quant, str(doc["base_model_prefix"]), targets)
    except (ValueError, KeyError, TypeError, AttributeError, ConfigError) as e:
        raise CheckpointError(
            f"{path}: unreadable ({e}); it records the layers training quantized — restore it from the training "
            "output, or delete it and export again (the layers are then found by building the architecture)"
        ) from None


def _shape(value) -> tuple[int, int]:
    out_f, in_f = (int(v) for v in value)
    if out_f <= 0 or in_f <= 0:
        raise ValueError(f"layer shape {value} is not two positive sizes")
    return out_f, in_f


def prefix_variants(key: str, prefix: str) -> list[str]:
    """The names one tensor may have when a checkpoint and a model disagree on the base-model prefix (`bert.`):
    as it is, without the prefix, with it — in the order transformers tries them when it loads."""
    if not prefix:
        return [key]
    dotted = prefix + "."
    return [key, *([key[len(dotted):]] if key.startswith(dotted) else []), dotted + key]


def checkpoint_key(key: str, stored: Container[str], prefix: str) -> str | None:
    """The checkpoint's name for the model's tensor `key` (None when the checkpoint lacks it)."""
    return next((c for c in prefix_variants(key, prefix) if c in stored), None)

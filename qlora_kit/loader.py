"""HF checkpoint directory -> transformers model with frozen 4-bit linears, streamed tensor by tensor.

The architecture is built on the meta device (parameters only; buffers such as rotary tables are real), then
every tensor is read from disk on its own, quantized if it is the weight of a linear layer, and placed on the
device. Peak host memory is the quantized model plus the largest single tensor: the bf16 model never exists
whole. Checkpoints already in the bitsandbytes 4-bit layout load as they are, recognised by their quant-state
entries, not by configuration flags.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationConfig, PretrainedConfig
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.quantizers_utils import should_convert_module

from qlora_kit.safetensors_io import TensorInfo, TensorReader, iter_by_file, read_config_json, tensor_index
from qlora_kit.errors import CheckpointError
from qlora_kit.lora import LoraConfig, QLinear, add_lora, use_decode_head
from qlora_kit.rmsnorm import use_native_rms_norm
from qlora_kit.quant import QuantConfig, QuantizedWeight, stored_quant_config
from qlora_kit.targets import Target, prefix_variants

log = logging.getLogger(__name__)


def read_config(model_dir: Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """config.json through transformers, with one clear error for a missing file or unknown architecture."""
    model_type = read_config_json(model_dir).get("model_type")
    cfg_file = model_dir / "config.json"
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        raise CheckpointError(
            f"{cfg_file}: unsupported architecture (model_type={model_type!r}) for this transformers version ({e})"
        ) from None


def model_class(config: PretrainedConfig) -> type:
    """Causal LMs get their LM head; everything else (encoders such as BERT) the bare AutoModel."""
    archs = config.architectures or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return AutoModelForCausalLM
    return AutoModel


def build_empty(config: PretrainedConfig, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The architecture with parameters on the meta device (no memory), buffers real."""
    cls = model_class(config)
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model


def skip_patterns(model: nn.Module) -> list[str]:
    """Modules kept in full precision, chosen exactly as transformers' bitsandbytes integration chooses them
    (output embeddings, tied modules, the module of the last parameter, `_keep_in_fp32_modules`), so a
    checkpoint written by `qlora-kit quantize` loads in transformers without extra arguments."""
    skip = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip |= {name for name, mod in model.named_modules() if head is not None and mod is head}
    params = list(model.named_parameters(remove_duplicate=False))
    if params:  # transformers strips only ".weight": a last parameter that is a bias skips nothing
        skip.add(params[-1][0].removesuffix(".weight"))
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    skip |= {k.removesuffix(".weight") for pair in tied.items() for k in pair}
    return sorted(skip)


def quant_targets(model: nn.Module) -> dict[str, Target]:
    """Every linear layer (nn.Linear or GPT-2's Conv1D) outside `skip_patterns`: these are held in 4 bits."""
    patterns = skip_patterns(model)
    targets = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, Conv1D)) and should_convert_module(name, patterns):
            conv1d = isinstance(mod, Conv1D)
            shape = tuple(mod.weight.shape)
            has_bias = getattr(mod, "bias", None) is not None
            targets[name] = Target(name, conv1d, has_bias, shape[::-1] if conv1d else shape)
    return targets


def checkpoint_quant_config(config: PretrainedConfig) -> QuantConfig | None:
    """The quant settings of a checkpoint saved in the bitsandbytes 4-bit layout, if it is one."""
    return stored_quant_config(getattr(config, "quantization_config", None))


def _key_map(model: nn.Module, infos: dict[str, TensorInfo]) -> dict[str, str]:
    """Checkpoint key -> model key, bridging a base-model prefix (`bert.`) present on one side only."""
    wanted = set(model.state_dict(keep_vars=True))
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for key in infos:
        base = key.split(".weight.", 1)[0] + ".weight" if ".weight." in key else key
        pairs = zip(prefix_variants(base, prefix), prefix_variants(key, prefix))
        match = next((variant for base_variant, variant in pairs if base_variant in wanted), None)
        if match is not None:
            out[key] = match
    return out


class _Streamer:
    """Places tensors into the meta-built model one at a time, swapping target linears for `QLinear`s."""

    def __init__(self, model, targets, quant, device, dtype, calibrated=None, importance=None) -> None:
        self.model, self.targets, self.quant = model, targets, quant
        self.device, self.dtype = torch.device(device), dtype
        self.biases: dict[str, torch.Tensor] = {}
        self.calibrated: dict[str, QuantizedWeight] = calibrated or {}  # calibrate.py's, by module name
        self.importance: dict[str, torch.Tensor] = importance or {}  # scale search's input moments, by module name

    def place(self, key: str, reader: TensorReader, ckpt_key: str) -> None:
        module_name, _, attr = key.rpartition(".")
        if module_name in self.targets and attr == "weight":
            self._place_quantized(module_name, reader, ckpt_key)
        elif module_name in self.targets and attr == "bias":
            self._set_bias(module_name, self._cast(reader.read(ckpt_key)))
        else:
            self._place_plain(module_name, attr, reader.read(ckpt_key), ckpt_key, reader)

    def _place_quantized(self, name: str, reader: TensorReader, ckpt_key: str) -> None:
        target = self.targets[name]
        aux = [k for k in reader.infos if k.startswith(ckpt_key + ".")]
        if aux:
            cut = len(ckpt_key) - len("weight")
            qw = QuantizedWeight.from_state_dict({k[cut:]: reader.read(k) for k in [ckpt_key, *aux]})
            qw = qw.to(self.device)
        elif name in self.calibrated:
            qw = self.calibrated.pop(name).to(self.device)
        else:
            w = reader.read(ckpt_key).to(self.device)
            w = w.t() if target.transposed else w
            qw = QuantizedWeight.quantize(w.to(self.dtype) if w.dtype == torch.float64 else w, self.quant,
                                          self.importance.pop(name, None))
        self._check_shape(name + ".weight", tuple(qw.shape), self._meta_shape(name, target), reader, ckpt_key)
        parent, child = _parent(self.model, name)
        layer = QLinear(qw, self.biases.pop(name, None), compute_dtype=self.dtype)
        setattr(parent, child, layer)

    def _meta_shape(self, name: str, target: Target) -> tuple[int, ...]:
        mod = self.model.get_submodule(name)
        if isinstance(mod, QLinear):
            return (mod.out_features, mod.in_features)
        shape = tuple(mod.weight.shape)
        return shape[::-1] if target.transposed else shape

    def _set_bias(self, name: str, bias: torch.Tensor) -> None:
        mod = self.model.get_submodule(name)
        if isinstance(mod, QLinear):
            mod.bias = nn.Parameter(bias, requires_grad=False)
        else:
            self.biases[name] = bias

    def _place_plain(self, module_name: str, attr: str, t: torch.Tensor, ckpt_key, reader) -> None:
        module = self.model.get_submodule(module_name)
        old = getattr(module, attr)
        self._check_shape(f"{module_name}.{attr}", tuple(t.shape), tuple(old.shape), reader, ckpt_key)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(self._cast(t), requires_grad=False)
        else:
            module._buffers[attr] = t.to(self.device)

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, self.dtype if t.is_floating_point() else None)

    @staticmethod
    def _check_shape(key, got, want, reader, ckpt_key) -> None:
        if got != want:
            raise CheckpointError(
                f"{reader.infos[ckpt_key].file}: tensor {ckpt_key!r} has shape {list(got)} but config.json "
                f"implies {list(want)}; the weights and config.json disagree"
            )


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _finish(model: nn.Module, config: PretrainedConfig, targets: dict[str, Target], model_dir: Path) -> None:
    """Tie what the config ties, then refuse to return a model with holes in it."""
    if getattr(config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [n for n in targets if not isinstance(model.get_submodule(n), QLinear)]
    missing += [n + ".bias" for n, t in targets.items() if t.has_bias and model.get_submodule(n).bias is None]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{model_dir}: checkpoint lacks tensors the architecture needs: {shown}")


def load_quantized(
    path: str | Path,
    *,
    quant: QuantConfig = QuantConfig(),
    lora: LoraConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    trust_remote_code: bool = False,
    adapter_name: str = "default",
) -> nn.Module:
    """Load an HF checkpoint directory with its linear layers frozen in 4 bits and, if `lora` is given, LoRA
    adapters on the targeted ones. `dtype` is the compute dtype and the dtype of the unquantized parameters.
    `quant.calibration` first runs the unquantized model over the calibration text (calibrate.py), and
    `quant.scale_search` without it over random token ids (calibrate.probe_importance); either holds the model in
    fp32 memory for that while. Scale search then applies as each weight is quantized."""
    model_dir = Path(path)
    config = read_config(model_dir, trust_remote_code)
    infos = tensor_index(model_dir)
    saved_quant = checkpoint_quant_config(config)
    if saved_quant is not None:
        quant = saved_quant
        del config.quantization_config
    model = build_empty(config, dtype, trust_remote_code)
    targets = quant_targets(model)
    keys = _key_map(model, infos)
    unused = [k for k in infos if k not in keys]
    if unused:
        log.warning("%s: %d checkpoint tensors are not used by %s (e.g. %s)", model_dir, len(unused),
                    type(model).__name__, unused[0])
    calibrated = importance = None
    if quant.calibration is not None and saved_quant is None:
        from qlora_kit.calibrate import calibrate_checkpoint

        calibrated = calibrate_checkpoint(model_dir, quant, trust_remote_code)
    elif quant.scale_search and saved_quant is None:
        from qlora_kit.calibrate import probe_importance

        importance = probe_importance(model_dir, trust_remote_code)
    streamer = _Streamer(model, targets, quant, device, dtype, calibrated, importance)
    with TensorReader(infos) as reader:
        for ckpt_key in iter_by_file(infos):
            key = keys.get(ckpt_key)
            if key is not None and ".weight." not in key:  # quant-state entries travel with their weight
                streamer.place(key, reader, ckpt_key)
    _finish(model, config, targets, model_dir)
    if (model_dir / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    model.requires_grad_(False)
    model.eval()
    use_decode_head(model)
    use_native_rms_norm(model)
    if lora is not None:
        add_lora(model, lora, adapter_name)
    model.qlora_quant = quant
    model.qlora_targets = targets  # what save_adapter records beside the adapter (targets.py)
    return model


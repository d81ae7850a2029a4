"""`qlora-kit quantize`: a bf16/fp16/fp32 HF checkpoint -> the same checkpoint in the bitsandbytes 4-bit layout.

Streams tensor by tensor like the loader (peak memory: one shard of quantized output plus one input tensor),
chooses the quantized layers exactly as transformers would, and writes config.json with a bitsandbytes
`quantization_config`, so `AutoModelForCausalLM.from_pretrained(out_dir)` loads `Linear4bit` layers with no
extra arguments. The output directory appears only when complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import BitsAndBytesConfig

from qlora_kit.atomic import AtomicDir
from qlora_kit.safetensors_io import (
    SIDE_FILES, ShardWriter, TensorReader, copy_side_files, iter_by_file, read_config_json, tensor_index,
    write_config_json,
)
from qlora_kit.errors import CheckpointError
from qlora_kit.loader import build_empty, checkpoint_quant_config, quant_targets, read_config, skip_patterns
from qlora_kit.quant import QuantConfig, QuantizedWeight



@dataclass
class QuantizeReport:
    """What a conversion did, for the CLI's summary line and for tests."""

    out_dir: Path
    quantized: int
    kept: int
    params_quantized: int
    bytes_in: int
    bytes_out: int
    shards: int


def bnb_quantization_config(quant: QuantConfig, compute_dtype: torch.dtype, skip: list[str]) -> dict:
    """The config.json entry transformers reads to rebuild `Linear4bit` layers."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip,
    ).to_dict()


def quantize_checkpoint(
    model_dir: Path,
    out_dir: Path,
    quant: QuantConfig = QuantConfig(),
    max_shard_bytes: int = 5 * 1024**3,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> QuantizeReport:
    config = read_config(model_dir, trust_remote_code)
    if checkpoint_quant_config(config) is not None:
        raise CheckpointError(f"{model_dir}: already quantized (config.json has a quantization_config)")
    infos = tensor_index(model_dir)
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else torch.bfloat16
    model = build_empty(config, dtype, trust_remote_code)
    targets = {f"{name}.weight": t for name, t in quant_targets(model).items()}
    calibrated, importance = {}, {}
    if quant.calibration is not None:
        from qlora_kit.calibrate import calibrate_checkpoint

        by_module = calibrate_checkpoint(model_dir, quant, trust_remote_code)
        calibrated = {f"{name}.weight": qw for name, qw in by_module.items()}
    elif quant.scale_search:
        from qlora_kit.calibrate import probe_importance

        by_module = probe_importance(model_dir, trust_remote_code)
        importance = {f"{name}.weight": m for name, m in by_module.items()}
    report = QuantizeReport(out_dir, 0, 0, 0, sum(i.nbytes for i in infos.values()), 0, 0)
    with AtomicDir(out_dir) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        with TensorReader(infos) as reader:
            for key in tqdm(list(iter_by_file(infos)), desc="quantize", unit="tensor", disable=not progress):
                tensor = reader.read(key)
                target = targets.get(key)
                if target is None:
                    writer.add(key, tensor)
                    report.kept += 1
                    continue
                weight = tensor.t() if target.transposed else tensor
                qw = calibrated.pop(key, None) or QuantizedWeight.quantize(weight, quant, importance.pop(key, None))
                for k, v in qw.state_dict(key).items():
                    writer.add(k, v)
                report.quantized += 1
                report.params_quantized += tensor.numel()
        if report.quantized == 0:
            raise CheckpointError(f"{model_dir}: no linear layer found to quantize")
        report.shards = len(writer.finish())
        report.bytes_out = writer.total_bytes
        cfg = read_config_json(model_dir)
        cfg["quantization_config"] = bnb_quantization_config(quant, dtype, skip_patterns(model))
        write_config_json(tmp, cfg)
        copy_side_files(model_dir, tmp)
        copy_side_files(model_dir, tmp, SIDE_FILES)
    return report


"""Calibrated 4-bit rounding: GPTQ's error feedback onto bitsandbytes' NF4/FP4 grid, the format unchanged.

Rounding every weight to its nearest level minimises the weight error, but what matters is each layer's output
error on real inputs, ||X Wᵀ − X Qᵀ||. GPTQ (Frantar et al., 2023) rounds one input column at a time and pushes
each column's rounding error onto the columns not yet rounded, weighted by the inverse Hessian H = XᵀX of the
layer's inputs, so later roundings cancel earlier ones. Here the block scales are fixed before any rounding --
bitsandbytes' absmax, or scale search's when `QuantConfig.scale_search` is on -- and only the 4-bit codes are
chosen, so the result is an ordinary bitsandbytes checkpoint: same levels, same scales layout, same 4.127 bits.
Because the scales are fixed, columns may be rounded in any order: we take the most active inputs first
(GPTQ's act-order), which helps most, and the order leaves no trace in the file.

The Hessians come from one forward pass of the unquantized model over a few thousand calibration tokens, with a
hook on every layer to be quantized. That holds the whole model in fp32 memory: fine for the models one calibrates
on a CPU, not for 70B (GPTQ's layer-by-layer pass would be needed there).

Scale search without a calibration file uses the same pass over seeded random token ids instead of text (no data):
`probe_importance` keeps only each input channel's second moment, which scale search weights its error by
(quant_search.py). Random tokens are enough for that because what it must find is which input channels carry the
large activations (the residual stream's few outlier channels), and those are large whatever the text; on
SmolLM2-135M the log second moments from random ids correlate at 0.87 with those from English (q_proj inputs).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer

from qlora_kit import _native
from qlora_kit.errors import DataError
from qlora_kit.quant import QuantConfig, QuantizedWeight

log = logging.getLogger(__name__)

CALIBRATION_TOKENS = 1024
"""Tokens read from the calibration file (its start). A few hundred already beat plain rounding; more make the
Hessians of wide layers better conditioned, at the price of a longer forward pass through the fp32 model."""
SEQ_LEN = 256
"""Tokens per calibration row."""
DAMPING = 0.01
"""Added to H's diagonal, as a fraction of its mean: keeps H invertible when inputs are few or correlated."""
PROBE_TOKENS = 1024
"""Random token ids (rows of SEQ_LEN) `probe_importance` runs through the model; as many as calibration reads."""
PROBE_SEED = 0
"""Seed of the probe's token ids, fixed so that scale search quantizes a checkpoint to the same bits every time."""
COLUMN_BLOCK = 128
"""Columns rounded per lazy batch: updates inside the batch are rank-1, the rest of the matrix waits for one
matrix product per batch (GPTQ's lazy batch updates)."""


def read_calibration_text(path: Path) -> str:
    """A .txt file as it is, or a .jsonl / .json file's `text` fields joined by newlines."""
    if not path.is_file():
        raise DataError(f"calibration file not found: {path}")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix not in (".jsonl", ".json"):
        text = raw
    else:
        texts = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{lineno}: calibration rows need a string field 'text'")
            texts.append(row["text"])
        text = "\n".join(texts)
    if not text.strip():
        raise DataError(f"{path}: calibration file has no text")
    return text


def calibration_batch(tokenizer, text: str, tokens: int = CALIBRATION_TOKENS, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """[rows, seq_len] token ids from the start of `text` (the last row may be shorter, then it is dropped)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    rows = len(ids) // seq_len
    if rows == 0:
        seq_len, rows = len(ids), 1
    if seq_len < 2:
        raise DataError(f"calibration text gives only {len(ids)} tokens; give at least a few hundred")
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)


def probe_batch(vocab_size: int, tokens: int = PROBE_TOKENS, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """[rows, seq_len] token ids drawn uniformly from the vocabulary with PROBE_SEED: the probe's input."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(0, vocab_size, (max(tokens // seq_len, 1), seq_len), generator=generator)


def collect_hessians(model: nn.Module, layers: dict[str, nn.Module], batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """H = XᵀX / rows, in fp32, of every named layer's input, from one forward pass over `batch`."""
    return _input_means(model, layers, batch, lambda x, h: x.t() @ x if h is None else h.addmm_(x.t(), x))


def collect_moments(model: nn.Module, layers: dict[str, nn.Module], batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """diag(XᵀX) / rows -- each input channel's second moment -- of every named layer, from one pass over `batch`."""
    return _input_means(model, layers, batch, lambda x, m: x.pow(2).sum(0) if m is None else m.add_(x.pow(2).sum(0)))


def _input_means(model, layers, batch, accumulate) -> dict[str, torch.Tensor]:
    """accumulate(x [rows, in] in fp32, running sum or None) over every named layer's inputs, divided by rows."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = accumulate(x, sums.get(name))
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in layers.items()]
    try:
        with torch.no_grad():
            for row in batch:  # one row at a time: activations stay small, the sums are the same
                model(input_ids=row.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return {name: h / counts[name] for name, h in sums.items()}


def _nearest_codes(w: torch.Tensor, scale: torch.Tensor, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, decoded values) of the nearest levels: bitsandbytes' rounding of w / scale."""
    bounds, order, code = _native._tables(quant_type)
    q = order[torch.bucketize(w * (1.0 / scale), bounds)]
    return q, code[q] * scale


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig) -> QuantizedWeight:
    """`weight` [out, in] in `config`'s format with GPTQ-chosen codes for inputs whose second moment is `hessian`.

    The scales (and their double quantization) are what plain quantization with `config` stores -- with scale
    search, searched under the Hessian's diagonal, the real inputs' second moments -- and only the codes change,
    so the result is as readable as any bitsandbytes weight."""
    config = replace(config, calibration=None)
    base = QuantizedWeight.quantize(weight, config, hessian.diagonal() if config.scale_search else None)
    if weight.dim() != 2 or weight.shape[1] != hessian.shape[0]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match a Hessian of {tuple(hessian.shape)}")
    rows, cols = weight.shape
    scale = base.absmax_fp32().repeat_interleave(config.blocksize)[: rows * cols].view(rows, cols)
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(H.diagonal(), descending=True)  # act-order: free, since the scales are fixed
    W, H, scale = W[:, perm], H[perm][:, perm], scale[:, perm]
    H.diagonal().add_(DAMPING * H.diagonal().mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.empty(rows, cols, dtype=torch.long)
    for i1 in range(0, cols, COLUMN_BLOCK):
        i2 = min(i1 + COLUMN_BLOCK, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            q, value = _nearest_codes(W1[:, i], scale[:, i1 + i], config.type)
            codes[:, i1 + i] = q
            err = (W1[:, i] - value) / Hinv1[i, i]
            W1[:, i:].sub_(err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0))
            err1[:, i] = err
        W[:, i2:].sub_(err1 @ Hinv[i1:i2, i2:])
    codes = codes[:, torch.argsort(perm)].reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, _native._tables(config.type)[1][7:8].to(torch.uint8)])  # bnb pads with a 0.0
    base.packed = ((codes[::2] << 4) | codes[1::2]).to(base.device)
    return base


def calibrated_weights(
    model: nn.Module, targets: dict, tokenizer, calibration: Path, quant: QuantConfig, dtype: torch.dtype
) -> dict[str, QuantizedWeight]:
    """Module name -> GPTQ-rounded weight for every target linear of the unquantized `model`; `dtype` is the
    dtype the weights dequantize to (the checkpoint's)."""
    batch = calibration_batch(tokenizer, read_calibration_text(calibration))
    log.info("calibrating on %d tokens from %s", batch.numel(), calibration)
    layers = {name: model.get_submodule(name) for name in targets}
    hessians = collect_hessians(model, layers, batch)
    out = {}
    for name, target in targets.items():
        w = layers[name].weight.detach()
        w = w.t() if target.transposed else w
        out[name] = gptq_quantize(w.to(torch.float32), hessians[name], quant)
        out[name].dtype = dtype
    return out


def calibrate_checkpoint(model_dir: Path, quant: QuantConfig, trust_remote_code: bool = False
                         ) -> dict[str, QuantizedWeight]:
    """Module name -> calibrated weight for every linear the loader would quantize in `model_dir` (a bf16 / fp16 /
    fp32 checkpoint), from `quant.calibration`'s text run through the unquantized model in fp32."""
    from qlora_kit.loader import quant_targets

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise DataError(f"{model_dir}: calibration needs the model's tokenizer, which did not load ({e})") from None
    model, config = _unquantized(model_dir, trust_remote_code)
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else torch.bfloat16
    return calibrated_weights(model, quant_targets(model), tokenizer, Path(quant.calibration), quant, dtype)


def probe_importance(model_dir: Path, trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
    """Module name -> second moment of each input channel, for every linear the loader would quantize in
    `model_dir`, from PROBE_TOKENS random token ids run through the unquantized model in fp32: what scale search
    weights each block's error by when no calibration text is given."""
    from qlora_kit.loader import quant_targets

    model, config = _unquantized(model_dir, trust_remote_code)
    targets = quant_targets(model)
    batch = probe_batch(model.get_input_embeddings().num_embeddings)
    log.info("probing input channels with %d random tokens", batch.numel())
    moments = collect_moments(model, {name: model.get_submodule(name) for name in targets}, batch)
    return moments


def _unquantized(model_dir: Path, trust_remote_code: bool):
    """(the checkpoint's model in fp32, eval mode; its config); safetensors only: a pytorch_model.bin (pickle) is
    never read."""
    from qlora_kit.loader import model_class, read_config

    config = read_config(model_dir, trust_remote_code)
    model = model_class(config).from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True,
                                                trust_remote_code=trust_remote_code)
    return model.eval(), config

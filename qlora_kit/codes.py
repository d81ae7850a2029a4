"""The code tables of the bitsandbytes layout: the 16 NF4/FP4 levels and the 256-level signed dynamic map.

Why not ask bitsandbytes for them: importing it costs ~3 s (it pulls in torch._dynamo), more than a CPU export
or plan spends on its work, and CPU paths need nothing else from it. These are built the way bitsandbytes 0.50
builds them, and tests/test_quant.py checks them against bitsandbytes' own tables bit for bit, so a change on
either side fails the suite instead of drifting.
"""

from __future__ import annotations

from functools import cache

import torch

# Levels in code order, before normalisation; bitsandbytes.functional.get_4bit_type holds the same lists.
_FOUR_BIT = {
    "nf4": [  # quantiles of N(0, 1) with equal probability mass per bin (QLoRA, Appendix E)
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    "fp4": [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],  # 1-2-1 bits
}


@cache
def _four_bit_cpu(quant_type: str) -> torch.Tensor:
    data = torch.tensor(_FOUR_BIT[quant_type])
    return data.div_(data.abs().max())


def four_bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 fp32 levels a 4-bit code indexes, in code order, scaled to [-1, 1]."""
    if quant_type not in _FOUR_BIT:
        raise ValueError(f"unknown 4-bit type {quant_type!r}; expected one of {sorted(_FOUR_BIT)}")
    return _four_bit_cpu(quant_type).to(device, copy=True)


@cache
def _dynamic_map_cpu() -> torch.Tensor:
    """bitsandbytes' create_dynamic_map(signed=True): per decade 10^-6..10^0 a sign and a shrinking fraction."""
    max_exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exponent_bits):
        boundaries = torch.linspace(0.1, 1, 2 ** (i + non_sign_bits - max_exponent_bits) + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0, 1.0]  # 2**(non_sign_bits - max_exponent_bits) - 1 == 0 extra items, and the gap is empty
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_map() -> torch.Tensor:
    """The 256 levels of the nested 8-bit stage of double quantization (a fresh copy: callers own theirs)."""
    return _dynamic_map_cpu().clone()

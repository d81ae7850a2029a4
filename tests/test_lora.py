"""QLinear and LoRA: equal to peft + bitsandbytes on the same weights, and frugal with memory."""

import math

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from qlora_kit.errors import ConfigError
from qlora_kit.loader import load_quantized
from qlora_kit.lora import (
    QUANT_STATE, LoraConfig, QLinear, add_lora, bucketed_linear, lora_parameters, merge_delta, route_rows, row_bucket,
)
from qlora_kit.quant import QuantConfig, QuantizedWeight

from conftest import VOCAB


def _peer(path, lora: LoraConfig):
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.bfloat16)
    cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules="all-linear",
                         use_rslora=lora.use_rslora)
    # Train mode: in eval, bitsandbytes' CPU path repacks weights for an AVX-512 kernel (and fails on
    # in_features that are not a multiple of the blocksize); training is what we compare anyway.
    return get_peft_model(base, cfg).train()


def _randomize_b(model):
    torch.manual_seed(1)
    for name, p in lora_parameters(model).items():
        if ".lora_B." in name:
            torch.nn.init.normal_(p, std=0.2)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gpt2"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_outputs_and_grads_match_peft_bitsandbytes(checkpoints, arch, use_rslora):
    lora = LoraConfig(r=4, alpha=8, use_rslora=use_rslora)
    ours = load_quantized(checkpoints[arch], lora=lora)
    _randomize_b(ours)
    peer = _peer(checkpoints[arch], lora)
    peer_params = dict(peer.named_parameters())
    for name, p in lora_parameters(ours).items():
        module, ab, _, _ = name.rsplit(".", 3)
        with torch.no_grad():
            peer_params[f"base_model.model.{module}.{ab}.default.weight"].copy_(p)
    # The 4-bit weights themselves must be the very same bits.
    for name, mod in ours.named_modules():
        if isinstance(mod, QLinear):
            peer_w = peer.get_submodule(f"base_model.model.{name}.base_layer").weight
            assert torch.equal(mod.qweight.packed, peer_w.data.reshape(-1))
    x = torch.randint(0, VOCAB, (2, 12))
    out_ours = ours.train()(x).logits.float()
    out_peer = peer(x).logits.float()
    torch.testing.assert_close(out_ours, out_peer, atol=1e-3 * out_peer.abs().max().item(), rtol=1e-3)
    out_ours.square().mean().backward()
    out_peer.square().mean().backward()
    for name, p in lora_parameters(ours).items():
        module, ab, _, _ = name.rsplit(".", 3)
        g_peer = peer_params[f"base_model.model.{module}.{ab}.default.weight"].grad
        torch.testing.assert_close(p.grad, g_peer, atol=1e-3 * g_peer.abs().max().item(), rtol=1e-2)


def _qlinear(out_f=48, in_f=80, bias=True) -> QLinear:
    torch.manual_seed(0)
    qw = QuantizedWeight.quantize(torch.randn(out_f, in_f, dtype=torch.bfloat16))
    return QLinear(qw, torch.randn(out_f, dtype=torch.bfloat16) if bias else None)


def test_init_scale_and_trainable_dtypes():
    layer = _qlinear()
    layer.add_adapter("default", LoraConfig(r=8, alpha=16))
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.dtype == b.dtype == torch.float32
    assert torch.count_nonzero(b) == 0 and a.abs().max() <= 1 / math.sqrt(80) + 1e-6  # kaiming_uniform(a=√5)
    assert layer.scaling["default"] == 2.0
    assert LoraConfig(r=16, alpha=8, use_rslora=True).scale == 2.0
    x = torch.randn(3, 80, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.qweight.dequantize(), layer.bias))


def test_backward_never_saves_the_dequantized_weight():
    layer = _qlinear(256, 512)
    layer.add_adapter("default", LoraConfig(r=4, alpha=8))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = torch.randn(4, 512, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert saved and max(saved) < 256 * 512
    y.float().sum().backward()
    expected = torch.ones(4, 256, dtype=torch.bfloat16) @ layer.qweight.dequantize()
    lora_part = (torch.ones(4, 256) @ layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * 2
    torch.testing.assert_close(x.grad.float(), expected.float() + lora_part, atol=0.1, rtol=0.02)


class _NewTensorsShaped(TorchDispatchMode):
    """Counts the tensors of one shape that ops allocate (in-place ops write into their input: not counted)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape, self.count = torch.Size(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.shape == self.shape and not func._schema.is_mutable:
            self.count += 1
        return out


def test_per_row_adapters_add_into_the_one_output():
    """Rows routed to four adapters on the unfused path (gradients on) get each delta added into the forward's one
    output, which was copied once per adapter before; values and gradients are each row's alone."""
    layer = _qlinear()
    names = ["a", "b", "c", "d"]
    for name in names:
        layer.add_adapter(name, LoraConfig(r=4, alpha=8))
        torch.nn.init.normal_(layer.lora_B[name].weight, std=0.3)
    x = torch.randn(8, 80, dtype=torch.bfloat16, requires_grad=True)
    groups = {n: torch.tensor([i, i + 4]) for i, n in enumerate(names)}
    with route_rows([layer], groups), _NewTensorsShaped((8, 48)) as outputs:
        y = layer(x)
    assert outputs.count == 1
    y.float().sum().backward()
    for name, rows in groups.items():
        layer.active_adapter = name
        alone = x.detach()[rows].requires_grad_()
        y_alone = layer(alone)
        y_alone.float().sum().backward()
        torch.testing.assert_close(y[rows], y_alone, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(x.grad[rows], alone.grad, atol=1e-2, rtol=1e-2)


class _Bf16MatmulRows(TorchDispatchMode):
    """The row counts of the bf16 matrix products run inside the block (oneDNN's, on the CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and args[-2].dtype == torch.bfloat16:
            self.rows.add(args[-2].shape[0])
        return func(*args, **(kwargs or {}))


def test_inference_matmuls_meet_few_row_counts_and_the_same_bits():
    """Prefills of 17..300 rows run their bf16 matmul in under 20 row counts (not 284), so the CPU kernel caches
    keyed by shape stay small; each row's output is bit for bit the unpadded product's."""
    layer = _qlinear(64, 96)
    layer.add_adapter("default", LoraConfig(r=4, alpha=8))
    w = layer.qweight.dequantize()
    with torch.no_grad():
        for rows in (17, 33, 50, 129, 300):
            x = torch.randn(rows, 96, dtype=torch.bfloat16)
            assert torch.equal(bucketed_linear(x, w, layer.bias), torch.nn.functional.linear(x, w, layer.bias))
    with torch.no_grad(), _Bf16MatmulRows() as seen:
        for rows in range(17, 301):
            layer(torch.randn(1, rows, 96, dtype=torch.bfloat16))
    assert seen.rows <= {row_bucket(r) for r in range(17, 301)} and len(seen.rows) < 20
    assert all(r <= row_bucket(r) <= 1.25 * r for r in range(1, 5000))


@pytest.mark.parametrize("double_quant", [True, False])
def test_the_4bit_weight_is_frozen_module_state_that_casts_never_touch(double_quant):
    torch.manual_seed(0)
    qw = QuantizedWeight.quantize(torch.randn(48, 80, dtype=torch.bfloat16), QuantConfig(double_quant=double_quant))
    layer = QLinear(qw, torch.randn(48, dtype=torch.bfloat16))
    layer.add_adapter("default", LoraConfig(r=4, alpha=8))
    params = dict(layer.named_parameters())
    state = {n: p for n, p in params.items() if n in QUANT_STATE}
    assert set(state) == (set(QUANT_STATE) if double_quant else {"codes", "absmax"})
    assert all(not p.requires_grad and not p.is_floating_point() for p in state.values())
    x = torch.randn(3, 80, dtype=torch.bfloat16)
    before, codes_ptr = layer(x), layer.codes.data_ptr()
    layer.to(torch.float16).to(torch.float32).half().float()  # casts: adapters and bias change, the base never
    assert layer.codes.data_ptr() == codes_ptr and layer.bias.dtype == torch.float32
    assert torch.equal(layer.qweight.dequantize(), qw.dequantize())
    assert torch.equal(layer.qweight.absmax_fp32(), qw.absmax_fp32())
    torch.testing.assert_close(layer(x.float()).bfloat16(), before, atol=0.05, rtol=0.02)

    sd = layer.state_dict()  # bitsandbytes' layout, as before the parameters existed
    assert set(sd) >= {"weight", "weight.absmax", "weight.quant_map", f"weight.quant_state.bitsandbytes__nf4"}
    assert not set(sd) & set(QUANT_STATE) and sd["weight"].shape == (48 * 80 // 2, 1)
    other = QuantConfig("fp4", double_quant=not double_quant, blocksize=128)
    fresh = QLinear(QuantizedWeight.quantize(torch.randn(48, 80), other), torch.zeros(48))
    fresh.add_adapter("default", LoraConfig(r=4, alpha=8))
    fresh.load_state_dict(sd)  # strict: every key lands, the old quantization is replaced
    assert fresh.qweight.config == qw.config and torch.equal(fresh.qweight.dequantize(), qw.dequantize())
    assert fresh.codes.requires_grad is False


def test_dropout_only_in_training():
    layer = _qlinear()
    layer.add_adapter("default", LoraConfig(r=4, alpha=8, dropout=0.5))
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(8, 80, dtype=torch.bfloat16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_merge_and_unmerge_swap_adapters():
    layer = _qlinear()
    for name in ("a", "b"):
        layer.add_adapter(name, LoraConfig(r=4, alpha=8))
        torch.nn.init.normal_(layer.lora_B[name].weight, std=0.3)
    x = torch.randn(5, 80, dtype=torch.bfloat16)
    for name in ("a", "b"):
        layer.active_adapter = name
        unmerged = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged, atol=0.05, rtol=0.02)
        layer.unmerge()
        assert torch.equal(layer(x), unmerged)


def test_merge_refuses_non_finite():
    w = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="non-finite"):
        merge_delta(w, torch.full((2, 4), float("inf")), torch.ones(4, 2), 1.0)


def test_target_modules_by_name_and_all_linear(checkpoints):
    model = load_quantized(checkpoints["llama"])
    chosen = add_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert chosen and all(n.endswith(("q_proj", "v_proj")) for n in chosen)
    assert all(p.requires_grad for p in lora_parameters(model).values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_parameters(model))
    assert "lm_head" not in " ".join(add_lora(model, LoraConfig(r=2), name="all")), "the head is never a target"
    with pytest.raises(ConfigError, match="matched no linear layer.*q_proj"):
        add_lora(model, LoraConfig(r=2, target_modules=["query"]), name="x")


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"r": -3}, {"alpha": 0}, {"dropout": 1.0}, {"target_modules": []}])
def test_bad_lora_config(kwargs):
    with pytest.raises(ConfigError):
        LoraConfig(**kwargs)

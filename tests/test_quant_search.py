"""Scale search: never worse than bitsandbytes' raw absmax on any block under the error it minimises (squared,
weighted per input column by its importance when given), same format, read by bitsandbytes."""

import pytest
import torch
from bitsandbytes import functional as bnbf
from transformers import AutoModelForCausalLM

from qlora_kit import _native, calibrate, codes, quant_search
from qlora_kit.cli import main
from qlora_kit.config import load_recipe
from qlora_kit.errors import ConfigError
from qlora_kit.loader import load_quantized
from qlora_kit.quant import QuantConfig, QuantizedWeight

SHAPES = [(64, 64), (96, 33), (3, 7), (300, 129), (1024, 70)]


def heavy_tailed(shape, dtype=torch.bfloat16, seed=0):
    """Student-t(4) values, as real LLM weights are: a few large entries per block decide its raw absmax."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    chi = torch.randn((4, *shape), generator=g).pow(2).sum(0) / 4
    return (0.02 * z / chi.sqrt()).to(dtype)


def outlier_importance(cols: int, seed: int = 0) -> torch.Tensor:
    """Per-column second moments as an LLM's inputs have them: most near 1, a few channels hundreds of times more."""
    g = torch.Generator().manual_seed(seed)
    imp = torch.rand(cols, generator=g) + 0.5
    imp[torch.randperm(cols, generator=g)[: max(cols // 50, 1)]] *= 300
    return imp


def block_errors(qw: QuantizedWeight, w: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """(Weighted) squared reconstruction error of each block, in double, from the values a reader decodes."""
    d = (qw.dequantize(torch.float32).double() - w.double())
    if importance is not None:
        d = d * importance.double().sqrt()
    d = d.reshape(-1)
    nblocks = -(-d.numel() // qw.blocksize)
    return torch.nn.functional.pad(d, (0, nblocks * qw.blocksize - d.numel())).view(nblocks, -1).pow(2).sum(1)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 256])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_never_worse_than_the_raw_absmax_on_any_block(shape, blocksize, quant_type, double_quant, weighted):
    w = heavy_tailed(shape, seed=hash((shape, blocksize)) % 1000)
    imp = outlier_importance(shape[1]) if weighted else None
    plain = QuantizedWeight.quantize(w, QuantConfig(quant_type, double_quant, blocksize))
    searched = QuantizedWeight.quantize(w, QuantConfig(quant_type, double_quant, blocksize, scale_search=True), imp)
    e_plain, e_search = block_errors(plain, w, imp), block_errors(searched, w, imp)
    # the kernel compares candidates by float-lane sums: a tie within float rounding may go either way
    assert (e_search <= e_plain * (1 + 1e-5) + 1e-30).all()
    if w.numel() >= 4096:
        assert e_search.sum() < 0.98 * e_plain.sum()


@pytest.mark.parametrize("double_quant", [True, False])
def test_format_unchanged(double_quant):
    w = heavy_tailed((128, 192))
    plain = QuantizedWeight.quantize(w, QuantConfig(double_quant=double_quant))
    searched = QuantizedWeight.quantize(w, QuantConfig(double_quant=double_quant, scale_search=True))
    assert searched.bits_per_param() == plain.bits_per_param()
    assert {k: (v.shape, v.dtype) for k, v in searched.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in plain.state_dict().items()}
    if double_quant:  # the nested state stays bitsandbytes': only the 8-bit level of each block moves
        assert torch.equal(searched.nested_absmax, plain.nested_absmax) and torch.equal(searched.offset, plain.offset)
        assert (searched.absmax_fp32() <= plain.absmax_fp32() * 1.05).all()
    else:
        assert (searched.absmax <= plain.absmax).all() and (searched.absmax < plain.absmax).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_result_is_the_first_candidate(dtype, quant_type):
    """With no grid and no Lloyd step the kernel returns bitsandbytes' bits: this pins its rounding helpers."""
    w = heavy_tailed((300, 129), dtype)
    absmax = quant_search.block_absmax(w, 64)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    assert torch.equal(absmax, _native.quantize_4bit(w, 64, quant_type)[1])
    code8 = codes.dynamic_map()
    qabs, nabs = _native.quantize_blockwise(absmax - absmax.mean(), code8, 256)
    levels = quant_search.nested_levels(nabs, code8, absmax.mean())
    got, _, index = quant_search.search(w, 64, quant_type, absmax, levels, qabs, grid=torch.empty(0), steps=0)
    assert torch.equal(got, packed.reshape(-1)) and torch.equal(index, state.absmax)
    got, scale, _ = quant_search.search(w, 64, quant_type, absmax, grid=torch.empty(0), steps=0)
    assert torch.equal(got, _native.quantize_4bit(w, 64, quant_type)[0]) and torch.equal(scale, absmax)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codes_at_the_edges_of_every_bucket(quant_type):
    """Values on, just above and just below every bound between two levels and every cell edge of the kernel's
    bucket lookup (NF4: cells of 1/16 over [-1, 1]; FP4 bisects), with the block's absmax 1 so that they reach the
    lookup unscaled: the codes are bitsandbytes' bit for bit."""
    bounds, _, _ = _native._tables(quant_type)
    edges = torch.cat([bounds.float(), torch.linspace(-1, 1, 33), torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    values = torch.cat([edges, torch.nextafter(edges, torch.tensor(2.0)), torch.nextafter(edges, torch.tensor(-2.0))])
    values = values.clamp(-1, 1)
    rows = -(-values.numel() // 63)
    body = torch.cat([values, torch.full((rows * 63 - values.numel(),), 0.5)]).view(rows, 63)
    w = torch.cat([torch.ones(rows, 1), body], 1).reshape(-1, 128 if rows % 2 == 0 else 64)
    absmax = quant_search.block_absmax(w, 64)
    got, _, _ = quant_search.search(w, 64, quant_type, absmax, grid=torch.empty(0), steps=0)
    assert torch.equal(got, _native.quantize_4bit(w, 64, quant_type)[0])
    assert torch.equal(got, bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type)[0].reshape(-1))


@pytest.mark.skipif(not quant_search.HAVE_NATIVE, reason="native scale-search kernel not built")
@pytest.mark.parametrize("dtype, quant_type, double_quant", [
    (torch.bfloat16, "nf4", True), (torch.bfloat16, "fp4", False), (torch.float32, "nf4", False),
    (torch.float16, "fp4", True),
])
@pytest.mark.parametrize("weighted", [False, True])
def test_native_equals_torch_fallback(dtype, quant_type, double_quant, weighted, monkeypatch):
    w = heavy_tailed((129, 80), dtype, seed=3)  # a tail block, an odd element count, blocks across rows
    imp = outlier_importance(80) if weighted else None
    cfg = QuantConfig(quant_type, double_quant, 64, scale_search=True)
    native = QuantizedWeight.quantize(w, cfg, imp)
    monkeypatch.setattr(quant_search, "_LIB", None)
    torch_path = QuantizedWeight.quantize(w, cfg, imp)
    assert torch.equal(native.packed, torch_path.packed) and torch.equal(native.absmax, torch_path.absmax)


@pytest.mark.skipif(not quant_search.HAVE_NATIVE, reason="native scale-search kernel not built")
@pytest.mark.parametrize("double_quant", [True, False])
def test_native_equals_torch_fallback_with_a_grid(double_quant, monkeypatch):
    """The grid and several Lloyd steps, off by default, choose the same bits on both paths too."""
    w = heavy_tailed((129, 80), seed=4)
    absmax, weights = quant_search.block_absmax(w, 64), quant_search.column_weights(w, outlier_importance(80))
    code8 = codes.dynamic_map()
    qabs, nabs = _native.quantize_blockwise(absmax - absmax.mean(), code8, 256)
    levels = quant_search.nested_levels(nabs, code8, absmax.mean()) if double_quant else None
    index = qabs if double_quant else None
    grid = torch.linspace(1.0, 0.6, 8)
    native = quant_search.search(w, 64, "nf4", absmax, levels, index, grid, 3, weights)
    monkeypatch.setattr(quant_search, "_LIB", None)
    fallback = quant_search.search(w, 64, "nf4", absmax, levels, index, grid, 3, weights)
    for a, b in zip(native, fallback):
        assert (a is None and b is None) or torch.equal(a, b)
    default = quant_search.search(w, 64, "nf4", absmax, levels, index, weights=weights)
    assert not torch.equal(native[0], default[0])  # the grid finds other scales than one Lloyd step


@pytest.mark.parametrize("double_quant", [True, False])
def test_importance_moves_the_error_off_the_important_inputs(double_quant):
    """Weighted search lowers the weighted error below what the unweighted search reaches: it is what that search
    minimises, and the unweighted one clips the outlier inputs' weights that the weighting protects."""
    w = heavy_tailed((256, 512), seed=5)
    imp = outlier_importance(512, seed=1)
    cfg = QuantConfig(double_quant=double_quant, scale_search=True)
    weighted, unweighted = QuantizedWeight.quantize(w, cfg, imp), QuantizedWeight.quantize(w, cfg)
    assert block_errors(weighted, w, imp).sum() < 0.97 * block_errors(unweighted, w, imp).sum()
    uniform = QuantizedWeight.quantize(w, cfg, torch.full((512,), 7.0))  # only relative importance counts
    assert torch.equal(uniform.packed, unweighted.packed) and torch.equal(uniform.absmax, unweighted.absmax)


def test_importance_must_be_one_finite_value_per_column():
    w = heavy_tailed((8, 64))
    cfg = QuantConfig(scale_search=True)
    for bad in (torch.ones(63), torch.full((64,), float("nan")), -torch.ones(64)):
        with pytest.raises(ValueError, match="importance"):
            QuantizedWeight.quantize(w, cfg, bad)
    zero = QuantizedWeight.quantize(w, cfg, torch.zeros(64))  # no information: the unweighted search
    assert torch.equal(zero.packed, QuantizedWeight.quantize(w, cfg).packed)


def test_probe_importance_is_data_free_and_deterministic(llama_dir):
    first, second = calibrate.probe_importance(llama_dir), calibrate.probe_importance(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert set(first) <= set(linears) and "model.layers.0.self_attn.q_proj" in first
    for name, m in first.items():
        assert m.shape == (linears[name].in_features,) and (m >= 0).all() and m.sum() > 0
        assert torch.equal(m, second[name])


def test_config():
    assert QuantConfig("nf4", True, 64) == QuantConfig()  # positional construction still works
    assert not QuantConfig().scale_search
    with pytest.raises(ConfigError, match="scale_search"):
        QuantConfig(scale_search="yes")
    with pytest.raises(ConfigError, match="calibration"):
        QuantConfig(calibration="")


def test_recipe_and_loader(tmp_path, llama_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {llama_dir}\ndataset: {{path: d.jsonl}}\nquant: {{scale_search: true, "
                      "calibration: calib.txt}\n")
    quant = load_recipe(recipe).quant
    assert quant.scale_search and quant.calibration == str(tmp_path / "calib.txt")
    w = AutoModelForCausalLM.from_pretrained(llama_dir).model.layers[0].mlp.up_proj.weight.detach()
    layer = load_quantized(llama_dir, quant=QuantConfig(scale_search=True)).model.layers[0].mlp.up_proj
    imp = calibrate.probe_importance(llama_dir)["model.layers.0.mlp.up_proj"]
    expected = QuantizedWeight.quantize(w, QuantConfig(scale_search=True), imp)
    assert torch.equal(layer.qweight.packed, expected.packed) and torch.equal(layer.qweight.absmax, expected.absmax)


def test_quantize_scale_search_checkpoint_bitsandbytes_reads_unchanged(tmp_path, llama_dir):
    out = tmp_path / "q"
    assert main(["quantize", str(llama_dir), str(out), "--scale-search"]) == 0
    ours = load_quantized(out)
    peer = AutoModelForCausalLM.from_pretrained(out)
    plain = load_quantized(llama_dir)
    layers = {n: m for n, m in peer.named_modules() if type(m).__name__ == "Linear4bit"}
    assert "model.layers.0.self_attn.q_proj" in layers and "model.layers.1.mlp.down_proj" in layers
    moved = 0
    for name, layer in layers.items():  # every layer decodes to the same weights on both sides
        theirs = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        mine = ours.get_submodule(name).qweight.dequantize()
        assert torch.equal(theirs, mine)
        moved += not torch.equal(mine, plain.get_submodule(name).qweight.dequantize())
    assert moved == len(layers)
    x = torch.randint(0, 128, (1, 6))
    with torch.no_grad():  # train(): as tests/test_cli.py, bitsandbytes' CPU inference kernels stay out of it
        # same weights, two bf16 matmul paths: logits near 10 may differ by one bf16 step (0.0625) there
        torch.testing.assert_close(peer.train()(x).logits, ours.train()(x).logits, atol=0.07, rtol=1e-2)

"""`qlora-kit inspect`: spectra against a dense SVD, φ's fixed points, and adapters written by peft and by the kit."""

import json

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit.adapters import save_adapter
from qlora_kit.cli import main
from qlora_kit.errors import CheckpointError
from qlora_kit.inspect_adapter import (
    Factors, delta_svd, effective_rank, energy_rank, inspect_adapter, layer_type, phi, right_singular,
)
from qlora_kit.loader import load_quantized
from qlora_kit.lora import LoraConfig
from qlora_kit.quant import QuantConfig, QuantizedWeight


def _factors(out_f, in_f, r, seed, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return Factors(torch.randn(r, in_f, generator=g, dtype=torch.float64),
                   torch.randn(out_f, r, generator=g, dtype=torch.float64), scale)


@pytest.mark.parametrize("shape", [(48, 40, 6), (16, 96, 8), (30, 30, 30)])
def test_spectrum_from_the_r_by_r_problem_equals_a_dense_svd(shape):
    f = _factors(*shape, seed=sum(shape))
    dense = f.scale * f.b @ f.a
    u, sigma, v = delta_svd(f)
    torch.testing.assert_close(sigma, torch.linalg.svdvals(dense)[: f.r], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u @ torch.diag(sigma) @ v.T, dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u.T @ u, torch.eye(f.r, dtype=u.dtype), atol=1e-10, rtol=0)
    torch.testing.assert_close(v.T @ v, torch.eye(f.r, dtype=v.dtype), atol=1e-10, rtol=0)
    _, s_a, vh_a = torch.linalg.svd(f.a, full_matrices=False)  # A's own right-singular directions, up to sign
    torch.testing.assert_close((right_singular(f.a).T @ vh_a.T).abs(), torch.eye(f.r, dtype=v.dtype), atol=1e-8,
                               rtol=0)


def test_ranks():
    assert effective_rank(torch.ones(4)) == pytest.approx(4) and effective_rank(torch.tensor([1.0, 0, 0])) == 1
    assert effective_rank(torch.zeros(3)) == 0
    sigma = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert energy_rank(sigma, 0.9) == 2 and energy_rank(sigma, 0.99) == 3 and energy_rank(sigma, 9 / 14) == 1
    assert layer_type("model.layers.11.self_attn.q_proj") == ("self_attn.q_proj", 11)
    assert layer_type("transformer.h.0.attn.c_attn") == ("attn.c_attn", 0)
    assert layer_type("lm_head") == ("lm_head", None)


def test_phi_is_one_against_itself_and_random_for_unrelated_factors():
    a = _factors(8, 64, 8, seed=1).a
    torch.testing.assert_close(phi(right_singular(a), right_singular(a)), torch.ones(8, 8, dtype=a.dtype))
    d, r1, r2, draws = 256, 8, 16, 16
    pairs = [(_factors(4, d, r1, 2 * k).a, _factors(4, d, r2, 2 * k + 1).a) for k in range(draws)]
    grids = torch.stack([phi(right_singular(a1), right_singular(a2)) for a1, a2 in pairs]).mean(0)
    i, j = torch.meshgrid(torch.arange(1, r1 + 1), torch.arange(1, r2 + 1), indexing="ij")
    expected = torch.maximum(i, j).double() / d  # E‖U_iᵀU_j‖² = ij/d for independent random subspaces
    assert (grids - expected).abs().max() < 0.3 * expected.min() + 0.01
    assert float(grids[-1, -1]) == pytest.approx(r2 / d, rel=0.15)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, checkpoints):
    """One adapter peft wrote (rsLoRA, q/v only) and one the kit wrote (all linear), both random, on the llama."""
    from peft import LoraConfig as PeftConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("inspect")
    base = checkpoints["llama"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, PeftConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False, use_rslora=True))
    peft_model.save_pretrained(root / "peft")
    deltas = {n.removeprefix("base_model.model."): m.get_delta_weight("default").detach().double()
              for n, m in peft_model.named_modules() if hasattr(m, "get_delta_weight") and "default" in m.lora_A}
    kit = load_quantized(base, lora=LoraConfig(r=8, alpha=16))
    with torch.no_grad():
        for p in kit.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    save_adapter(kit, root / "kit", LoraConfig(r=8, alpha=16), str(base))
    return {"base": base, "peft": root / "peft", "kit": root / "kit", "deltas": deltas}


def test_a_peft_adapter_against_peft_and_the_dequantized_base(adapters):
    report = inspect_adapter(adapters["peft"], base=adapters["base"])
    layers = {e["name"]: e for e in report["layers"]}
    assert set(layers) == set(adapters["deltas"]) and len(layers) == 4
    weights = load_file(adapters["base"] / "model.safetensors")
    for name, delta in adapters["deltas"].items():
        e = layers[name]
        assert e["r"] == 4 and e["scale"] == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)
        torch.testing.assert_close(torch.tensor(e["sigma"], dtype=torch.float64), torch.linalg.svdvals(delta)[:4],
                                   rtol=1e-5, atol=1e-6)
        w = QuantizedWeight.quantize(weights[name + ".weight"], QuantConfig()).dequantize(torch.float32).double()
        assert e["ratio"] == pytest.approx(float(delta.norm() / w.norm()), rel=1e-5)
        u, _, vh = torch.linalg.svd(delta)
        proj = (u[:, :4].T @ w @ vh[:4].T).norm()
        assert e["amplification"] == pytest.approx(float(delta.norm() / proj), rel=1e-4)
        assert e["proj_top"] == pytest.approx(float(torch.linalg.svdvals(w)[:4].norm()), rel=1e-5)
        assert e["proj_top"] >= e["proj_delta"] and e["proj_top"] >= e["proj_random"]


def test_compare_per_layer_type(adapters):
    report = inspect_adapter(adapters["kit"], compare=[adapters["kit"], adapters["peft"]])
    itself, other = report["compare"]
    assert itself["layers"] == len(report["layers"]) == 14 and other["layers"] == 4
    for t in itself["types"].values():
        torch.testing.assert_close(torch.tensor(t["phi"], dtype=torch.float64), torch.ones(8, 8, dtype=torch.float64))
    assert set(other["types"]) == {"self_attn.q_proj", "self_attn.v_proj"}
    for t in other["types"].values():
        assert torch.tensor(t["phi"]).shape == (8, 4) and t["random_full"] == 8 / 64
        assert 0 < t["phi_full"] < 0.5  # unrelated random factors: near the baseline, far from 1


def test_cli_end_to_end(adapters, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["inspect", str(adapters["kit"]), "--base", str(adapters["base"]), "--compare", str(adapters["peft"]),
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split()[:2] == ["layer", "r"] and "model.layers.1.mlp.down_proj" in text
    assert "subspace similarity phi vs" in text
    report = json.loads((out / "inspect.json").read_text())
    assert report["base"] == str(adapters["base"]) and all("amplification" in e for e in report["layers"])
    assert sorted(p.name for p in out.iterdir()) == ["inspect.json", "phi-1-peft.png", "spectra.png"]


@pytest.mark.parametrize("case", ["missing", "no-shared-layers", "wrong-base"])
def test_bad_input_is_one_line(adapters, tmp_path, checkpoints, case, capsys):
    if case == "no-shared-layers":
        cfg = json.loads((adapters["peft"] / "adapter_config.json").read_text())
        (tmp_path / "k").mkdir()
        (tmp_path / "k" / "adapter_config.json").write_text(json.dumps(cfg))
        tensors = load_file(adapters["peft"] / "adapter_model.safetensors")
        from safetensors.torch import save_file

        save_file({k.replace("layers.0.", "layers.7."): v for k, v in tensors.items() if "layers.0." in k},
                  tmp_path / "k" / "adapter_model.safetensors")
    args = {
        "missing": [str(tmp_path / "nope")],
        "no-shared-layers": [str(adapters["kit"]), "--compare", str(tmp_path / "k")],
        "wrong-base": [str(adapters["kit"]), "--base", str(checkpoints["gpt2"])],
    }[case]
    assert main(["inspect", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qlora-kit: error:"), err


def test_an_adapter_without_lora_layers_is_refused(tmp_path, adapters):
    (tmp_path / "adapter_config.json").write_text((adapters["peft"] / "adapter_config.json").read_text())
    from safetensors.torch import save_file

    save_file({}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="no LoRA layers"):
        inspect_adapter(tmp_path)

"""Calibrated rounding (GPTQ onto the NF4 grid): lower output error than plain rounding, same format."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_kit import calibrate
from qlora_kit.cli import main
from qlora_kit.errors import DataError
from qlora_kit.loader import load_quantized, quant_targets
from qlora_kit.quant import QuantConfig, QuantizedWeight

from conftest import make_tokenizer

TEXT = ("Below is an instruction that describes a task. Write a response that completes the request. "
        "the user asks and the assistant answers. ") * 40


@pytest.fixture(scope="module")
def calib_model(tmp_path_factory, llama_dir):
    root = tmp_path_factory.mktemp("calib")
    shutil.copytree(llama_dir, root / "m")
    make_tokenizer().save_pretrained(root / "m")
    (root / "calib.txt").write_text(TEXT)
    return root / "m", root / "calib.txt"


def output_error(x: torch.Tensor, w: torch.Tensor, qw: QuantizedWeight) -> float:
    return (x @ (qw.dequantize(torch.float32) - w).t()).pow(2).sum().item()


@pytest.mark.parametrize("scale_search", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_gptq_lowers_output_error_keeps_scales(quant_type, scale_search):
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(96, 96, generator=g) * torch.logspace(0, -2, 96)  # correlated inputs of uneven size
    x = torch.randn(512, 96, generator=g) @ mix
    w = torch.randn(40, 96, generator=g) * 0.05
    cfg = QuantConfig(quant_type, True, 64, scale_search)
    hessian = x.t() @ x / x.shape[0]
    plain = QuantizedWeight.quantize(w, cfg, hessian.diagonal() if scale_search else None)  # searched on its moments
    calibrated = calibrate.gptq_quantize(w, hessian, cfg)
    assert output_error(x, w, calibrated) < 0.8 * output_error(x, w, plain)
    assert torch.equal(calibrated.absmax, plain.absmax) and torch.equal(calibrated.nested_absmax, plain.nested_absmax)
    assert calibrated.packed.shape == plain.packed.shape and not torch.equal(calibrated.packed, plain.packed)


@pytest.fixture(autouse=True)
def few_tokens(monkeypatch):
    monkeypatch.setattr(calibrate, "CALIBRATION_TOKENS", 512)


def test_loaded_calibrated_layers_beat_plain_rounding_on_the_calibration_inputs(calib_model):
    model_dir, text = calib_model
    loaded = load_quantized(model_dir, quant=QuantConfig(calibration=str(text)))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    targets = quant_targets(model)
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, a, n=n: inputs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))) for n in targets]
    batch = calibrate.calibration_batch(make_tokenizer(), TEXT, calibrate.CALIBRATION_TOKENS)
    with torch.no_grad():
        model(input_ids=batch)
    for h in hooks:
        h.remove()
    for name in targets:
        x, w = torch.cat(inputs[name]), model.get_submodule(name).weight.detach()
        plain = QuantizedWeight.quantize(w.bfloat16(), QuantConfig())
        calibrated = loaded.get_submodule(name).qweight
        assert output_error(x, w, calibrated) < output_error(x, w, plain), name
        assert calibrated.dtype == torch.bfloat16


def test_quantize_calibrate_end_to_end(calib_model, tmp_path):
    model_dir, text = calib_model
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), str(out), "--calibrate", str(text), "--scale-search"]) == 0
    peer = AutoModelForCausalLM.from_pretrained(out)
    ours = load_quantized(out)
    name = "model.layers.1.self_attn.o_proj"
    assert type(peer.get_submodule(name)).__name__ == "Linear4bit"
    # the scales are scale search's under the calibration inputs' second moments; GPTQ then moves only the codes
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch = calibrate.calibration_batch(AutoTokenizer.from_pretrained(model_dir), calibrate.read_calibration_text(text))
    layer = dense.get_submodule(name)
    hessian = calibrate.collect_hessians(dense, {name: layer}, batch)[name]
    searched = QuantizedWeight.quantize(layer.weight.detach(), QuantConfig(scale_search=True), hessian.diagonal())
    ours_w = ours.get_submodule(name).qweight
    assert torch.equal(ours_w.absmax, searched.absmax) and not torch.equal(ours_w.packed, searched.packed)
    x = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(peer.train()(x).logits, ours.train()(x).logits, atol=2e-2, rtol=1e-2)


def test_calibration_file_errors(tmp_path, calib_model, capsys):
    model_dir, _ = calib_model
    assert main(["quantize", str(model_dir), str(tmp_path / "o"), "--calibrate", str(tmp_path / "nope.txt")]) == 2
    assert "calibration file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "no text"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*'text'"):
        calibrate.read_calibration_text(bad)
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert calibrate.read_calibration_text(good) == "one\ntwo"
    assert not (tmp_path / "o").exists()

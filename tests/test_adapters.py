"""PEFT interop both ways, several adapters on one base, per-row adapter batches, and generation."""

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from qlora_kit.adapters import (
    adapter_names, load_adapter, merge_adapter, per_row_adapters, save_adapter, set_active_adapter,
    unmerge_adapters,
)
from qlora_kit.errors import CheckpointError
from qlora_kit.generate import Request, generate, render
from qlora_kit.loader import load_quantized
from qlora_kit.lora import LoraConfig, lora_parameters

from conftest import VOCAB, make_tokenizer


def _randomize(model, seed):
    torch.manual_seed(seed)
    for name, p in lora_parameters(model).items():
        torch.nn.init.normal_(p, std=0.3 if ".lora_B." in name else 0.1)


def _peft_adapter(base_dir, out, *, rslora=False, targets=("q_proj", "v_proj"), name="default", seed=0):
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = PeftLoraConfig(r=4, lora_alpha=16, target_modules=list(targets), use_rslora=rslora, lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg, adapter_name=name)
    torch.manual_seed(seed)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    peft_model.save_pretrained(out)
    return out / name if name != "default" else out


@pytest.mark.parametrize("rslora", [False, True])
def test_reads_what_peft_wrote(tmp_path, llama_dir, rslora):
    adir = _peft_adapter(llama_dir, tmp_path / "a", rslora=rslora)
    model = load_quantized(llama_dir)
    lora = load_adapter(model, adir)
    assert lora.use_rslora == rslora and lora.r == 4
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == (16 / 2 if rslora else 16 / 4)
    assert "default" not in model.model.layers[0].mlp.up_proj.lora_A  # only the subset peft adapted
    peft_sd = json.loads((adir / "adapter_config.json").read_text())
    assert peft_sd["r"] == 4


def test_reads_keys_that_carry_an_adapter_name(tmp_path, llama_dir):
    from safetensors.torch import load_file, save_file

    adir = _peft_adapter(llama_dir, tmp_path / "a")
    f = adir / "adapter_model.safetensors"
    sd = {k.replace(".weight", ".default.weight"): v for k, v in load_file(f).items()}
    save_file(sd, f)
    model = load_quantized(llama_dir)
    load_adapter(model, adir)
    assert torch.equal(model.model.layers[1].self_attn.v_proj.lora_B["default"].weight,
                       sd["base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"])


def test_round_trip_through_peft_gives_same_outputs(tmp_path, llama_dir):
    ours = load_quantized(llama_dir, lora=LoraConfig(r=4, alpha=8))
    _randomize(ours, 0)
    save_adapter(ours, tmp_path / "ours", LoraConfig(r=4, alpha=8), str(llama_dir))
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "ours")
    peft_model.save_pretrained(tmp_path / "back")
    again = load_quantized(llama_dir)
    load_adapter(again, tmp_path / "back")
    x = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        assert torch.equal(ours(x).logits, again(x).logits)


def test_adapter_for_another_model_is_refused(tmp_path, checkpoints):
    adir = _peft_adapter(checkpoints["llama"], tmp_path / "a")
    model = load_quantized(checkpoints["gpt2"])
    with pytest.raises(CheckpointError, match="match no quantized linear layer"):
        load_adapter(model, adir)


def _two_adapters(llama_dir, dtype=torch.bfloat16):
    model = load_quantized(llama_dir, lora=LoraConfig(r=4, alpha=8), adapter_name="a", dtype=dtype)
    from qlora_kit.lora import add_lora

    add_lora(model, LoraConfig(r=2, alpha=8, target_modules=["q_proj", "down_proj"]), name="b")
    _randomize(model, 1)
    return model


def test_adapter_trained_on_another_quantization_loads_with_a_warning(tmp_path, llama_dir, caplog):
    """The record beside the adapter says what base it was trained against; another one still loads, but says so."""
    from qlora_kit.quant import QuantConfig

    trained = load_quantized(llama_dir, quant=QuantConfig("fp4", False, 128), lora=LoraConfig(r=4, alpha=8))
    save_adapter(trained, tmp_path / "fp4", LoraConfig(r=4, alpha=8), str(llama_dir))
    with caplog.at_level("WARNING", logger="qlora_kit.adapters"):
        load_adapter(load_quantized(llama_dir, quant=QuantConfig("fp4", False, 128)), tmp_path / "fp4")
    assert not caplog.records
    with caplog.at_level("WARNING", logger="qlora_kit.adapters"):
        load_adapter(load_quantized(llama_dir), tmp_path / "fp4")
    assert [r.getMessage() for r in caplog.records if "fp4/128 base; this model holds nf4+dq/64" in
            r.getMessage()], caplog.text


def test_switch_disable_merge_unmerge_without_reloading(llama_dir):
    model = _two_adapters(llama_dir, torch.float32)  # fp32 compute: merged == unmerged up to float rounding
    x = torch.randint(0, VOCAB, (2, 8))
    logits = {}
    with torch.no_grad():
        for name in ("a", "b", None):
            set_active_adapter(model, name)
            logits[name] = model(x).logits
        assert not torch.equal(logits["a"], logits["b"]) and not torch.equal(logits["a"], logits[None])
        for name in ("a", "b"):
            merge_adapter(model, name)
            torch.testing.assert_close(model(x).logits, logits[name], atol=1e-3, rtol=1e-4)
            unmerge_adapters(model)
            assert torch.equal(model(x).logits, logits[name])
    assert adapter_names(model) == ["a", "b"]
    with pytest.raises(CheckpointError, match="no adapter named 'c'"):
        set_active_adapter(model, "c")


def test_per_row_batch_equals_each_row_alone(llama_dir):
    model = _two_adapters(llama_dir)
    x = torch.randint(0, VOCAB, (4, 8))
    names = ["a", "b", None, "a"]
    with torch.no_grad():
        with per_row_adapters(model, names):
            batched = model(x).logits
        for i, name in enumerate(names):
            set_active_adapter(model, name)
            alone = model(x[i : i + 1]).logits
            torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-2, rtol=1e-2)


def test_per_row_routing_is_reentrant_and_leaves_no_module_state(llama_dir):
    model = _two_adapters(llama_dir)
    x = torch.randint(0, VOCAB, (1, 8)).repeat(2, 1)  # equal rows: swapping the routing swaps the outputs
    with torch.no_grad():
        set_active_adapter(model, None)
        base = model(x).logits
        with per_row_adapters(model, ["a", "b"]):
            outer = model(x).logits
            with per_row_adapters(model, ["b", "a"]):
                inner = model(x).logits
            assert torch.equal(model(x).logits, outer)  # the outer routing is back once the inner block exits
        assert torch.equal(model(x).logits, base)  # and none at all after the outer one
    torch.testing.assert_close(inner, outer.flip(0), atol=1e-2, rtol=1e-2)
    assert not torch.equal(inner, outer)
    assert not any(hasattr(m, "row_groups") for m in model.modules())


def test_per_row_routing_is_per_thread(llama_dir):
    """Two threads run one model under different routings at the same time; each gets its own rows' adapters."""
    import threading

    model = _two_adapters(llama_dir)
    x = torch.randint(0, VOCAB, (2, 8))
    routings = (["a", "b"], ["b", None])
    with torch.no_grad():
        expected = []
        for names in routings:
            with per_row_adapters(model, names):
                expected.append(model(x).logits)
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    both_inside = threading.Barrier(2, timeout=30)

    def worker(i: int) -> None:
        with torch.no_grad(), per_row_adapters(model, routings[i]):
            both_inside.wait()  # both routings are live before either thread runs a forward
            for _ in range(3):
                results[i].append(model(x).logits)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    for i in range(2):
        assert len(results[i]) == 3 and all(torch.equal(r, expected[i]) for r in results[i])
    assert not torch.equal(expected[0], expected[1])


def test_generate_batches_adapters_and_matches_single_runs(tmp_path, llama_dir):
    model = _two_adapters(llama_dir).eval()
    tok = make_tokenizer()
    prompt, chat = render(tok, {"prompt": "the user asks"})
    assert chat and prompt.endswith("assistant\n")
    assert render(tok, {"instruction": "Repeat.", "input": "x"})[0].endswith("### Response:\n")
    reqs = [Request(prompt, "a", chat), Request(prompt, "b", chat), Request(prompt, None, chat)]
    batched = generate(model, tok, reqs, max_new_tokens=6)
    alone = [generate(model, tok, [r], max_new_tokens=6)[0] for r in reqs]
    assert batched == alone
    assert len(set(batched)) > 1

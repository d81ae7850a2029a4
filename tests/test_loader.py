"""The streaming loader: same bits as transformers + bitsandbytes for every architecture, sharded and
pre-quantized checkpoints, tied embeddings, and one clear error per bad input."""

import json
import shutil

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from transformers import AutoModel, AutoModelForCausalLM, BitsAndBytesConfig

from qlora_kit.safetensors_io import tensor_index
from qlora_kit.convert import quantize_checkpoint
from qlora_kit.errors import CheckpointError
from qlora_kit.loader import load_quantized
from qlora_kit.lora import QLinear, quant_state_parameters

from conftest import ARCHS, CAUSAL, VOCAB, make_model, save_model

BNB = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.bfloat16)


def _qlinears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}


def _logits(model, x):
    with torch.no_grad():
        out = model.train()(x)  # train(): keeps bitsandbytes off its CPU inference repacking path
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_same_bits_and_outputs_as_transformers_bitsandbytes(checkpoints, arch):
    cls = AutoModelForCausalLM if arch in CAUSAL else AutoModel
    peer = cls.from_pretrained(checkpoints[arch], quantization_config=BNB, dtype=torch.bfloat16)
    ours = load_quantized(checkpoints[arch])
    layers = _qlinears(ours)
    peer_4bit = {n for n, m in peer.named_modules() if type(m).__name__ == "Linear4bit"}
    assert set(layers) == peer_4bit and layers
    for name, layer in layers.items():
        w = peer.get_submodule(name).weight
        assert torch.equal(layer.qweight.packed, w.data.reshape(-1)), name
        assert torch.equal(layer.qweight.dequantize(), dequantize_4bit(w.data, w.quant_state))
    x = torch.randint(0, VOCAB, (2, 9))
    torch.testing.assert_close(_logits(ours, x), _logits(peer, x), atol=2e-2, rtol=1e-2)
    assert all(not p.requires_grad for p in ours.parameters())
    quant_state = quant_state_parameters(ours)
    assert {p.dtype for n, p in ours.named_parameters() if n not in quant_state} == {torch.bfloat16}


def test_tied_embeddings_stay_tied(checkpoints):
    model = load_quantized(checkpoints["llama-tied"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not isinstance(model.lm_head, QLinear)


def test_sharded_checkpoint_with_index(tmp_path, checkpoints):
    path = save_model(make_model("llama"), tmp_path / "sharded", max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").exists()
    sharded, single = load_quantized(path), load_quantized(checkpoints["llama"])
    for name, layer in _qlinears(single).items():
        assert torch.equal(_qlinears(sharded)[name].qweight.packed, layer.qweight.packed)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_prequantized_checkpoints_load_as_they_are(tmp_path, checkpoints, arch):
    direct = load_quantized(checkpoints[arch])
    ours_q = tmp_path / "ours"
    quantize_checkpoint(checkpoints[arch], ours_q, progress=False)
    peer_q = tmp_path / "peer"
    AutoModelForCausalLM.from_pretrained(checkpoints[arch], quantization_config=BNB).save_pretrained(peer_q)
    x = torch.randint(0, VOCAB, (1, 7))
    for path in (ours_q, peer_q):
        model = load_quantized(path)
        for name, layer in _qlinears(direct).items():
            assert torch.equal(_qlinears(model)[name].qweight.dequantize(), layer.qweight.dequantize())
        assert torch.equal(_logits(model, x), _logits(direct, x))


def test_unused_tensors_are_reported_not_fatal(tmp_path, checkpoints, caplog):
    path = tmp_path / "extra"
    shutil.copytree(checkpoints["llama"], path)
    from safetensors.torch import load_file, save_file

    sd = load_file(path / "model.safetensors")
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    load_quantized(path)
    assert "not used" in caplog.text


# --- bad inputs: one clear CheckpointError naming the culprit -------------------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such model directory"):
        load_quantized(tmp_path / "nope")


def test_missing_config(tmp_path, llama_dir):
    path = _copy(llama_dir, tmp_path / "m")
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_quantized(path)


def test_truncated_safetensors(tmp_path, llama_dir):
    path = _copy(llama_dir, tmp_path / "m")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated"):
        load_quantized(path)


def test_corrupt_header(tmp_path, llama_dir):
    path = _copy(llama_dir, tmp_path / "m")
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:20] = b"\xff" * 10
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors: .*corrupt"):
        load_quantized(path)


def test_not_a_safetensors_file(tmp_path, llama_dir):
    path = _copy(llama_dir, tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"<html>rate limited</html>")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_quantized(path)


def test_index_naming_missing_shard(tmp_path):
    path = save_model(make_model("llama"), tmp_path / "m", max_shard_size="60KB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names missing shard.*{shard.name}"):
        load_quantized(path)


def test_unsupported_architecture(tmp_path, llama_dir):
    path = _copy(llama_dir, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "frobnicator"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported architecture.*frobnicator"):
        load_quantized(path)


def test_shapes_disagree_with_config(tmp_path, llama_dir):
    path = _copy(llama_dir, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 160
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has shape .* config.json implies"):
        load_quantized(path)


def test_missing_tensor(tmp_path, llama_dir):
    from safetensors.torch import load_file, save_file

    path = _copy(llama_dir, tmp_path / "m")
    sd = load_file(path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks tensors.*layers.1.mlp.up_proj"):
        load_quantized(path)


def test_pickle_only_is_refused(tmp_path, llama_dir):
    path = _copy(llama_dir, tmp_path / "m")
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickle weights"):
        tensor_index(path)

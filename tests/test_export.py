"""`qlora-kit export`: the merged checkpoint is the quantized base + adapter the kit trained, loads in plain
transformers, shards exactly, and every bad input is one clear error with nothing left behind."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from qlora_kit.adapters import WEIGHTS_NAME, adapted_modules, save_adapter
from qlora_kit.safetensors_io import tensor_index
from qlora_kit.cli import main
from qlora_kit.convert import quantize_checkpoint
from qlora_kit.errors import CheckpointError, ConfigError
from qlora_kit.export import export_merged
from qlora_kit.loader import load_quantized
from qlora_kit.lora import LoraConfig, QLinear, merge_delta
from qlora_kit.quant import QuantConfig, QuantizedWeight
from qlora_kit.targets import RECORD_NAME

from conftest import VOCAB, make_tokenizer

LORA = LoraConfig(r=4, alpha=8)


def _trained(base_dir, adapter_dir, lora=LORA):
    """The kit's quantized base with adapters whose B is random (as after training), saved in PEFT format."""
    model = load_quantized(base_dir, lora=lora)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapted_modules(model).values():
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.5)
    save_adapter(model, adapter_dir, lora, str(base_dir))
    return model


def _qlinears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x).logits.float()


def _export(adapter_dir, out, **kwargs):
    return export_merged(adapter_dir, out, progress=False, **kwargs)


def _oriented(weight, arch):
    return weight.t() if arch == "gpt2" else weight  # GPT-2's Conv1D stores (in, out)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "llama-tied"])
def test_merged_checkpoint_is_the_quantized_base_plus_adapter(tmp_path, checkpoints, arch):
    base = checkpoints[arch]
    ours = _trained(base, tmp_path / "adapter")
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with_adapter = _logits(ours, x)
    base_only = _logits(load_quantized(base), x)

    report = _export(tmp_path / "adapter", tmp_path / "out")
    assert report.merged == len(_qlinears(ours)) and report.dequantized == 0
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.dtype == torch.bfloat16
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())

    # Bit for bit the kit's own merge (QLinear.merge: dequantized weight + B·A, through merge_delta) ...
    written, original = load_file(tmp_path / "out" / "model.safetensors"), load_file(base / "model.safetensors")
    for name, layer in _qlinears(ours).items():
        layer.merge()
        assert torch.equal(_oriented(written[name + ".weight"], arch), layer.merged.weight), name
    assert set(written) == set(original)  # tied models keep their single embedding
    for key in set(original) - {n + ".weight" for n in _qlinears(ours)}:
        assert torch.equal(written[key], original[key]), key
    # ... so transformers computes what the kit computes with the merged weights,
    torch.testing.assert_close(_logits(hf, x), _logits(ours, x), rtol=1e-2, atol=1e-2)
    # and the unmerged adapter forward up to bf16 rounding of the merged weights, which these random 2-layer models
    # (weights N(0, 0.5)) amplify to a few percent of the logits: a tenth of what the adapter itself changes.
    err = (_logits(hf, x) - with_adapter).norm() / with_adapter.norm()
    effect = (with_adapter - base_only).norm() / with_adapter.norm()
    assert err < 0.1 and err < effect / 10, (err, effect)
    if arch == "llama-tied":
        assert hf.lm_head.weight is hf.model.embed_tokens.weight


def _without_record(adapter, dst):
    """The same adapter as peft would have written it: no qlora_kit.json beside it."""
    shutil.copytree(adapter, dst, ignore=shutil.ignore_patterns(RECORD_NAME))
    return dst


def _bert_with_prefix(bert_dir, dst):
    """A BERT checkpoint whose keys carry the base-model prefix (`bert.`), as task-head models save it."""
    dst.mkdir()
    tensors = load_file(bert_dir / "model.safetensors")
    save_file({f"bert.{k}": t for k, t in tensors.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(bert_dir / "config.json", dst / "config.json")
    return dst


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "bert-prefixed"])
def test_layer_record_gives_the_same_checkpoint_as_the_architecture(tmp_path, checkpoints, arch):
    """The kit's adapters record the layers training quantized, so export never builds the architecture; an
    adapter without the record (peft's) is exported by building it. Same bytes either way."""
    base = _bert_with_prefix(checkpoints["bert"], tmp_path / "bert") if arch == "bert-prefixed" else checkpoints[arch]
    _trained(base, tmp_path / "adapter")
    record = json.loads((tmp_path / "adapter" / RECORD_NAME).read_text())
    assert record["quantization"] == {"type": "nf4", "double_quant": True, "blocksize": 64, "scale_search": False,
                                      "calibration": None}
    assert len(record["layers"]) == len(_qlinears(load_quantized(base)))
    fast = _export(tmp_path / "adapter", tmp_path / "fast")
    slow = _export(_without_record(tmp_path / "adapter", tmp_path / "peft"), tmp_path / "slow")
    assert (fast.layers_from, slow.layers_from) == ("the adapter's record", "the architecture")
    assert (fast.merged, fast.dequantized, fast.kept) == (slow.merged, slow.dequantized, slow.kept)
    files = sorted(p.name for p in (tmp_path / "fast").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "slow").iterdir())
    for name in files:
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "slow" / name).read_bytes(), name


def test_export_with_a_record_imports_no_transformers(tmp_path, llama_dir):
    """The point of the record: exporting runs no model code (nor remote code) and skips seconds of imports."""
    _trained(llama_dir, tmp_path / "adapter")
    code = ("import sys\nfrom qlora_kit.cli import main\n"
            f"assert main(['export', {str(tmp_path / 'adapter')!r}, '--out', {str(tmp_path / 'out')!r}, "
            "'--no-progress']) == 0\nprint(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('transformers', 'bitsandbytes', 'accelerate', 'peft')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_record_carries_the_training_quantization(tmp_path, llama_dir):
    """An adapter trained on FP4 without double quant is merged into *that* dequantized base, no flags needed;
    flags given explicitly still win."""
    quant = QuantConfig("fp4", False, 128)
    model = load_quantized(llama_dir, quant=quant, lora=LORA)
    save_adapter(model, tmp_path / "adapter", LORA, str(llama_dir))
    report = _export(tmp_path / "adapter", tmp_path / "out")
    assert report.quant == quant
    written = load_file(tmp_path / "out" / "model.safetensors")
    for name, layer in _qlinears(model).items():
        layer.merge()
        assert torch.equal(written[name + ".weight"], layer.merged.weight), name
    assert _export(tmp_path / "adapter", tmp_path / "nf4", quant=QuantConfig()).quant == QuantConfig()
    assert not torch.equal(load_file(tmp_path / "nf4" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"],
                           written["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("damage", ["json", "version", "shape"])
def test_damaged_or_mismatched_record_is_one_clear_error(tmp_path, llama_dir, damage):
    _trained(llama_dir, tmp_path / "adapter")
    path = tmp_path / "adapter" / RECORD_NAME
    record = json.loads(path.read_text())
    if damage == "json":
        path.write_text(path.read_text()[:-20])
    elif damage == "version":
        path.write_text(json.dumps({**record, "version": 99}))
    else:  # a record (and adapter) for a wider model than this base
        record["layers"]["model.layers.0.mlp.up_proj"]["shape"][1] *= 2
        path.write_text(json.dumps(record))
    match = {"json": "qlora_kit.json: unreadable", "version": "version 99",
             "shape": "up_proj.weight.* has shape .* but the model needs"}[damage]
    with pytest.raises(CheckpointError, match=match):
        _export(tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_does_not_depend_on_the_number_of_threads(tmp_path, llama_dir):
    """Tensors are computed by concurrent workers and written at their offsets in any order: the bytes must not
    depend on how many there are."""
    _trained(llama_dir, tmp_path / "adapter")
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            outs.append(_export(tmp_path / "adapter", tmp_path / f"t{threads}", max_shard_bytes=40_000).out_dir)
            assert torch.get_num_threads() == threads  # restored after the export
    finally:
        torch.set_num_threads(before)
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir()) and len(files) > 3
    assert all((outs[0] / f).read_bytes() == (outs[1] / f).read_bytes() for f in files)


def test_copied_tensors_survive_file_systems_without_copy_file_range(tmp_path, llama_dir, monkeypatch):
    """Tensors copied as stored go file to file in the kernel; where that is refused (EXDEV across file systems
    on some kernels, ENOSYS elsewhere) they go through a small buffer, with the same bytes."""
    import errno

    _trained(llama_dir, tmp_path / "adapter")
    _export(tmp_path / "adapter", tmp_path / "kernel")

    def refused(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refused)
    monkeypatch.setattr("qlora_kit.safetensors_io._COPY_CHUNK", 1000)  # several chunks per tensor
    _export(tmp_path / "adapter", tmp_path / "buffered")
    assert (tmp_path / "kernel" / "model.safetensors").read_bytes() == (
        tmp_path / "buffered" / "model.safetensors").read_bytes()


def test_linears_without_adapter_are_written_dequantized(tmp_path, llama_dir):
    ours = _trained(llama_dir, tmp_path / "adapter", LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    report = _export(tmp_path / "adapter", tmp_path / "out")
    assert (report.merged, report.dequantized) == (4, 10)
    written, original = load_file(tmp_path / "out" / "model.safetensors"), load_file(llama_dir / "model.safetensors")
    for name, layer in _qlinears(ours).items():
        key = name + ".weight"
        if "default" not in layer.lora_A:
            assert torch.equal(written[key], QuantizedWeight.quantize(original[key]).dequantize()), key
    assert torch.equal(written["lm_head.weight"], original["lm_head.weight"])  # the head was never quantized


def test_sharded_output_has_an_exact_index(tmp_path, llama_dir):
    _trained(llama_dir, tmp_path / "adapter")
    single = load_file(_export(tmp_path / "adapter", tmp_path / "one").out_dir / "model.safetensors")
    report = _export(tmp_path / "adapter", tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert report.shards == len(files) > 2
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert set(index["weight_map"]) == set(single) and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())
    for name in files:
        shard = load_file(tmp_path / "out" / name)
        assert {k for k, f in index["weight_map"].items() if f == name} == set(shard)
        assert all(torch.equal(t, single[k]) for k, t in shard.items())
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_merge_into_original_is_base_plus_delta(tmp_path, llama_dir):
    _trained(llama_dir, tmp_path / "adapter")
    _export(tmp_path / "adapter", tmp_path / "deq")
    _export(tmp_path / "adapter", tmp_path / "orig", merge_into="original")
    deq, orig = (load_file(tmp_path / d / "model.safetensors") for d in ("deq", "orig"))
    base = load_file(llama_dir / "model.safetensors")
    factors = load_file(tmp_path / "adapter" / WEIGHTS_NAME)
    linears = [k.removeprefix("base_model.model.").replace(".lora_A.", ".") for k in factors if ".lora_A." in k]
    assert len(linears) == 14
    for key in linears:
        a, b = (factors["base_model.model." + key.replace(".weight", f".lora_{ab}.weight")] for ab in "AB")
        assert torch.equal(orig[key], merge_delta(base[key], a, b, LORA.scale)), key
        assert not torch.equal(orig[key], deq[key]), key
    assert torch.equal(orig["model.norm.weight"], base["model.norm.weight"])


@pytest.mark.parametrize("quantizer", ["qlora-kit", "transformers"])
def test_prequantized_base_is_dequantized_as_stored(tmp_path, llama_dir, quantizer):
    if quantizer == "qlora-kit":
        quantize_checkpoint(llama_dir, tmp_path / "q", progress=False)
    else:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
        AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=bnb).save_pretrained(tmp_path / "q")
    _trained(tmp_path / "q", tmp_path / "adapter")
    _export(tmp_path / "adapter", tmp_path / "from_q")
    _export(tmp_path / "adapter", tmp_path / "from_bf16", base=llama_dir)
    from_q, from_bf16 = (load_file(tmp_path / d / "model.safetensors") for d in ("from_q", "from_bf16"))
    assert from_q.keys() == from_bf16.keys()  # no absmax / quant_map / quant_state left over
    assert all(torch.equal(from_q[k], from_bf16[k]) for k in from_q)  # same 4-bit weights, same merge
    cfg = json.loads((tmp_path / "from_q" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    with pytest.raises(ConfigError, match="original weights are gone"):
        _export(tmp_path / "adapter", tmp_path / "o", merge_into="original")


def test_tokenizer_comes_from_the_adapter_when_it_has_one(tmp_path, llama_dir):
    base = shutil.copytree(llama_dir, tmp_path / "base")
    make_tokenizer().save_pretrained(base)
    _trained(base, tmp_path / "adapter")
    make_tokenizer(chat_template="{{ messages[0]['content'] }}").save_pretrained(tmp_path / "adapter")
    _export(tmp_path / "adapter", tmp_path / "out")
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "adapter" / name).read_bytes(), name


# --- bad inputs: one clear error, and no output directory -----------------------------------------------


def test_non_finite_adapter_is_refused_and_nothing_is_written(tmp_path, llama_dir):
    _trained(llama_dir, tmp_path / "adapter")
    path = tmp_path / "adapter" / WEIGHTS_NAME
    factors = load_file(path)
    factors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"][3, 1] = float("inf")
    save_file(factors, path)
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj.*non-finite"):
        _export(tmp_path / "adapter", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_missing_base_is_one_clear_error(tmp_path, llama_dir):
    base = shutil.copytree(llama_dir, tmp_path / "base")
    _trained(base, tmp_path / "adapter")
    shutil.rmtree(base)
    with pytest.raises(CheckpointError, match=r"base model .*base'.* is not a local directory.*--base"):
        _export(tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_base_is_refused(tmp_path, checkpoints):
    _trained(checkpoints["llama"], tmp_path / "adapter")
    with pytest.raises(CheckpointError, match=r"modules model\.layers\.0\.mlp.* not quantized linear layers of .*gpt2"):
        _export(tmp_path / "adapter", tmp_path / "out", base=checkpoints["gpt2"])
    assert not (tmp_path / "out").exists()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "qlora_kit.cli", *args], capture_output=True, text=True, env=env)


def test_cli_export_end_to_end(tmp_path, llama_dir):
    base = shutil.copytree(llama_dir, tmp_path / "base")
    make_tokenizer().save_pretrained(base)
    _trained(base, tmp_path / "adapter")
    out = tmp_path / "out"
    proc = run_cli("export", str(tmp_path / "adapter"), "--out", str(out), "--max-shard-gb", "0.00005",
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "merged into 14 linear layers" in proc.stdout
    for name in ("model.safetensors.index.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert len(tensor_index(out)) == len(tensor_index(base))



@pytest.mark.parametrize("case", ["no-base", "not-a-model", "shard-size"])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, llama_dir, capsys, case):
    # In process (an interpreter start costs seconds); test_cli.py runs the error path through a subprocess.
    _trained(llama_dir, tmp_path / "adapter")
    extra = {"no-base": ["--base", str(tmp_path / "no")], "not-a-model": ["--base", str(tmp_path / "adapter")],
             "shard-size": ["--max-shard-gb", "0"]}[case]
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qlora-kit: error:") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_streaming_shard_writer_matches_safetensors(tmp_path):
    """Header-first shards read back by safetensors itself, split and indexed as ShardWriter splits them."""
    from safetensors import safe_open

    from qlora_kit.safetensors_io import INDEX_NAME, ShardWriter, StreamingShardWriter

    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(33, 7, generator=g).bfloat16(), "b.bias": torch.randn(5, generator=g),
               "c.empty": torch.zeros(0, 3, dtype=torch.float16), "d.ids": torch.arange(9, dtype=torch.int64),
               "e.weight": torch.randn(40, 16, generator=g).to(torch.float16)}
    layout = [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]
    streamed, buffered = tmp_path / "s", tmp_path / "b"
    streamed.mkdir(), buffered.mkdir()
    w = StreamingShardWriter(streamed, layout, max_shard_bytes=800)
    ref = ShardWriter(buffered, max_shard_bytes=800)
    for k, t in tensors.items():
        w.add(k, t)
        ref.add(k, t)
    assert [p.name for p in w.finish()] == [p.name for p in ref.finish()] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert json.loads((streamed / INDEX_NAME).read_text()) == json.loads((buffered / INDEX_NAME).read_text())
    for shard in sorted(streamed.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for k in f.keys():
                assert torch.equal(f.get_tensor(k), tensors[k]) and f.get_tensor(k).dtype == tensors[k].dtype


def test_streaming_shard_writer_refuses_what_was_not_planned(tmp_path):
    from qlora_kit.safetensors_io import StreamingShardWriter

    w = StreamingShardWriter(tmp_path, [("x", (2, 3), torch.bfloat16), ("y", (4,), torch.float32)])
    with pytest.raises(CheckpointError, match=r"x: planned as \[2, 3\] torch.bfloat16, got \[3, 2\]"):
        w.add("x", torch.zeros(3, 2, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match="1 planned tensors were never written, e.g. y"):
        w.finish()


@pytest.mark.parametrize("setting, flag", [({"scale_search": True}, "--scale-search"),
                                           ({"calibration": "calib.txt"}, "--calibrate")])
def test_a_base_chosen_from_a_whole_model_pass_is_not_redone_per_tensor(tmp_path, llama_dir, setting, flag):
    """Scale search (its random-token probe) and calibration pick each weight's values from one pass of the whole
    model; export, which quantizes tensor by tensor, would merge into other weights than training used. It
    refuses, names the way that works, and writes nothing; merging into the original weights needs no redo."""
    _trained(llama_dir, tmp_path / "adapter")
    path = tmp_path / "adapter" / RECORD_NAME
    record = json.loads(path.read_text())
    record["quantization"].update(setting)
    path.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=f"export cannot redo tensor by tensor.*qlora-kit quantize {flag}"):
        _export(tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert _export(tmp_path / "adapter", tmp_path / "orig", merge_into="original").merged > 0

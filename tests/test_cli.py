"""End to end through the console entry point: `qlora-kit quantize` and its failure modes."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora_kit import safetensors_io as ckpt
from qlora_kit.cli import main
from qlora_kit.convert import quantize_checkpoint
from qlora_kit.loader import load_quantized

from conftest import VOCAB, make_tokenizer


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "qlora_kit.cli", *args], capture_output=True, text=True, env=env)


def test_quantize_writes_a_checkpoint_transformers_loads(tmp_path, llama_dir):
    src = tmp_path / "src"
    import shutil

    shutil.copytree(llama_dir, src)
    make_tokenizer().save_pretrained(src)
    out = tmp_path / "q"
    proc = run_cli("quantize", str(src), str(out), "--max-shard-gb", "0.00005")
    assert proc.returncode == 0, proc.stderr
    assert "4.127 bits/param" in proc.stdout
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors.index.json").exists()
    qc = AutoModelForCausalLM.from_pretrained(out).config.quantization_config
    assert qc.bnb_4bit_quant_type == "nf4" and qc.bnb_4bit_use_double_quant
    model = AutoModelForCausalLM.from_pretrained(out).train()
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and layer.weight.quant_state.blocksize == 64
    x = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, load_quantized(out).train()(x).logits, atol=2e-2, rtol=1e-2)
    keys = {k for k in ckpt.tensor_index(out)}
    prefix = "model.layers.0.self_attn.q_proj.weight"
    assert {f"{prefix}.{s}" for s in ("absmax", "quant_map", "nested_absmax", "nested_quant_map",
                                      "quant_state.bitsandbytes__nf4")} <= keys


def test_quantize_options(tmp_path, llama_dir):
    out = tmp_path / "fp4"
    assert main(["quantize", str(llama_dir), str(out), "--quant-type", "fp4", "--no-double-quant",
                 "--blocksize", "128"]) == 0
    layer = load_quantized(out).model.layers[0].mlp.down_proj
    assert layer.qweight.quant_type == "fp4" and layer.qweight.blocksize == 128
    assert layer.qweight.nested_absmax is None


@pytest.mark.parametrize("case", ["missing", "exists", "blocksize"])
def test_bad_input_is_one_line_and_nonzero(tmp_path, llama_dir, case, capsys):
    args = {
        "missing": ["quantize", str(tmp_path / "nope"), str(tmp_path / "o")],
        "exists": ["quantize", str(llama_dir), str(llama_dir)],
        "blocksize": ["quantize", str(llama_dir), str(tmp_path / "o"), "--blocksize", "48"],
    }[case]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("qlora-kit: error:")] == err.strip().splitlines()
    assert not (tmp_path / "o").exists()


def test_bad_input_in_a_fresh_process_prints_no_traceback(tmp_path):
    proc = run_cli("quantize", str(tmp_path / "nope"), str(tmp_path / "o"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("qlora-kit: error:")


@pytest.mark.parametrize("preset", [None, "true"])
def test_main_sets_tokenizers_parallelism_as_the_console_script_runs_it(tmp_path, monkeypatch, preset):
    """The installed `qlora-kit` script calls main() itself, never the module's __main__ block."""
    if preset is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", preset)
    assert main(["quantize", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert os.environ["TOKENIZERS_PARALLELISM"] == (preset or "false")  # a user's own setting is kept


def test_debug_keeps_the_traceback(tmp_path):
    proc = run_cli("--debug", "quantize", str(tmp_path / "nope"), str(tmp_path / "o"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_interrupted_quantize_leaves_nothing_that_looks_finished(tmp_path, llama_dir, monkeypatch):
    def boom(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.ShardWriter, "finish", boom)
    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(llama_dir, out, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_sigkill_mid_quantize_leaves_only_a_hidden_temp_dir(tmp_path, llama_dir):
    """A killed process cannot clean up; what it leaves is a dot-named temp dir, never OUT_DIR."""
    out = tmp_path / "q"
    code = (
        "import os, signal, qlora_kit.safetensors_io as c\n"
        "orig = c.ShardWriter._flush\n"
        "def flush(self):\n    orig(self); os.kill(os.getpid(), signal.SIGKILL)\n"
        "c.ShardWriter._flush = flush\n"
        f"from qlora_kit.cli import main; main(['quantize', {str(llama_dir)!r}, {str(out)!r}])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -9
    assert not out.exists()
    assert all(p.name.startswith(".q.tmp-") for p in tmp_path.iterdir())

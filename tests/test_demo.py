"""The shipped demo, end to end through the CLI the way `make demo` runs it, shortened to a few steps."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from qlora_kit.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo"
MAX_DEMO_BYTES = 25 * 1024 * 1024


def test_demo_assets_are_small_and_complete():
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size <= MAX_DEMO_BYTES, f"demo/ is {size / 2**20:.1f} MiB; the training issue allows 25 MB"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (DEMO / "model" / name).is_file()
    train = [json.loads(line) for line in (DEMO / "data" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (DEMO / "data" / "eval.jsonl").read_text().splitlines()]
    assert {r["output"] for r in train} == {"noun", "verb", "adjective", "adverb"}
    assert not {r["input"] for r in train} & {r["input"] for r in held}, "an eval word leaks into training"
    with safe_open(DEMO / "model" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_demo_pipeline_trains_exports_and_generates(tmp_path, capsys):
    out = tmp_path / "run"
    overrides = [f"output_dir={out}", "max_steps=4", "eval_steps=4", "save_steps=4", "logging_steps=2",
                 "batch_size=4"]
    assert main(["train", str(REPO / "recipes" / "tiny-cpu.yaml"), "--no-progress", *overrides]) == 0
    said = capsys.readouterr().out
    assert "eval loss" in said and (out / "adapter" / "adapter_model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]

    check_teacher_forced_exact_match(out / "adapter")

    merged = tmp_path / "merged"
    assert main(["export", str(out / "adapter"), "--out", str(merged)]) == 0
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.dtype == torch.bfloat16 and not hasattr(model.config, "quantization_config")

    capsys.readouterr()
    assert main(["generate", str(merged), "--file", str(DEMO / "prompts.jsonl"), "--max-new-tokens", "3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == len((DEMO / "prompts.jsonl").read_text().splitlines())


def check_teacher_forced_exact_match(adapter: Path) -> None:
    """demo_eval's one-pass exact match must agree with what greedy generation actually answers, per row and arm."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_eval", REPO / "tools" / "demo_eval.py")
    demo_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_eval)
    from qlora_kit.generate import Request, generate, load_model, render

    model, tok = load_model(DEMO / "model", {"tuned": adapter})
    rows = demo_eval.read_jsonl(DEMO / "data" / "eval.jsonl")[:6]
    scores = demo_eval.score(model, tok, rows, batch=3)
    reqs = [Request(text, arm, chat) for text, chat in (render(tok, r) for r in rows) for arm in demo_eval.ARMS]
    said = generate(model, tok, reqs, max_new_tokens=6)
    for i, row in enumerate(rows):
        for j, arm in enumerate(demo_eval.ARMS):
            assert scores[arm]["hits"][i] == (said[2 * i + j].strip() == row["output"]), (row, arm, said[2 * i + j])


@pytest.mark.slow
def test_demo_full_recipe_beats_chance(tmp_path):
    """The whole `make demo` training (minutes): held-out exact match must clear the 25% of always one class."""
    import subprocess
    import sys

    out = tmp_path / "run"
    assert main(["train", str(REPO / "recipes" / "tiny-cpu.yaml"), "--no-progress", f"output_dir={out}"]) == 0
    done = subprocess.run([sys.executable, str(REPO / "tools" / "demo_eval.py"), str(DEMO / "model"),
                           str(out / "adapter"), str(DEMO / "data" / "eval.jsonl")], capture_output=True, text=True)
    tuned = float(done.stdout.rsplit("with adapter", 1)[1].strip().rstrip("%"))
    assert tuned > 40.0, done.stdout

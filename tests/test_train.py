"""The trainer end to end on a tiny model: learning, PEFT-format output, exact resume, signals, faults."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit import train as train_mod
from qlora_kit.config import load_recipe
from qlora_kit.metrics import read_metrics
from qlora_kit.train import TrainingError, train

from conftest import make_model, make_tokenizer, save_model

WORDS = ["apple", "tree", "stone", "river", "house", "cloud", "bird", "fish", "rain", "salt", "wind", "gold"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    base = save_model(make_model("llama"), root / "base")
    make_tokenizer().save_pretrained(base)
    rows = [{"instruction": "Repeat.", "input": w, "output": w} for w in WORDS * 4]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    recipe = """# tiny test recipe
model: base
dataset:
  path: train.jsonl
  format: alpaca
  eval_path: eval.jsonl
output_dir: out
max_steps: 12
batch_size: 4
max_seq_len: 160
learning_rate: 0.01
lr_scheduler: cosine
warmup_ratio: 0.1
optimizer: adamw
logging_steps: 2
save_steps: 4
eval_steps: 6
lora: {r: 4, alpha: 8, dropout: 0.1, target_modules: all-linear}
"""
    (root / "tiny.yaml").write_text(recipe)
    return root


def _recipe(ws, out, *overrides):
    return load_recipe(ws / "tiny.yaml", [f"output_dir={out}", *overrides])


def _adapter(path):
    return load_file(path / "adapter" / "adapter_model.safetensors")


def test_cli_trains_and_writes_everything(workspace, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "qlora_kit.cli", "train", str(workspace / "tiny.yaml"),
                           f"output_dir={out}", "--no-progress"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "eval loss" in proc.stdout
    before, after = [float(x) for x in proc.stdout.split("eval loss ")[1].split(" (")[0].split(" -> ")]
    assert after < before - 1.0
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "recipe.yaml", "loss.png",
                 "metrics.jsonl", "checkpoints/step-12/optimizer.pt"):
        assert (out / name).exists(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-12", "step-4", "step-8"]
    logged = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 8, 10, 12]
    assert all({"step", "loss", "lr", "tokens_seen", "elapsed_s"} <= set(r) for r in logged)
    assert logged[-1]["tokens_seen"] > logged[0]["tokens_seen"] > 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == str((workspace / "base").resolve())


def test_peft_loads_the_adapter_with_every_tensor_matched(workspace, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(_recipe(workspace, tmp_path / "run"), progress=False)
    base = AutoModelForCausalLM.from_pretrained(workspace / "base")
    peft_model = PeftModel.from_pretrained(base, result.output_dir / "adapter")
    ours = _adapter(result.output_dir)
    theirs = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_same_seed_same_adapter_and_exact_resume(workspace, tmp_path, monkeypatch):
    full = train(_recipe(workspace, tmp_path / "a"), progress=False)
    again = train(_recipe(workspace, tmp_path / "b"), progress=False)
    assert all(torch.equal(v, _adapter(again.output_dir)[k]) for k, v in _adapter(full.output_dir).items())

    real_step = train_mod.Trainer._step

    def dies_at_step_7(self, it):
        if self.counters.step == 6:
            raise SystemExit("killed")
        return real_step(self, it)

    monkeypatch.setattr(train_mod.Trainer, "_step", dies_at_step_7)
    with pytest.raises(SystemExit):
        train(_recipe(workspace, tmp_path / "c"), progress=False)
    monkeypatch.setattr(train_mod.Trainer, "_step", real_step)
    resumed = train(_recipe(workspace, tmp_path / "c"), progress=False)
    assert resumed.resumed_from == 4
    assert all(torch.equal(v, _adapter(resumed.output_dir)[k]) for k, v in _adapter(full.output_dir).items())
    steps = [r["step"] for r in read_metrics(resumed.output_dir) if "loss" in r]
    assert steps == [2, 4, 6, 8, 10, 12]
    assert [r for r in read_metrics(resumed.output_dir) if "loss" in r] != []


def test_accumulation_equals_one_big_batch(workspace, tmp_path):
    big = train(_recipe(workspace, tmp_path / "big", "max_steps=1", "lora.dropout=0.0"), progress=False)
    acc = train(_recipe(workspace, tmp_path / "acc", "max_steps=1", "lora.dropout=0.0", "batch_size=2",
                        "gradient_accumulation_steps=2"), progress=False)
    loss = lambda run: next(r["loss"] for r in read_metrics(run.output_dir) if "loss" in r)  # noqa: E731
    assert loss(acc) == pytest.approx(loss(big), rel=2e-3)


def test_packing_trains_and_counts_real_tokens(workspace, tmp_path):
    result = train(_recipe(workspace, tmp_path / "p", "packing=true", "max_seq_len=400", "batch_size=1"),
                   progress=False)
    assert result.eval_loss_after < result.eval_loss_before
    assert all(r["tokens_seen"] > 0 for r in read_metrics(result.output_dir) if "loss" in r)


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_non_finite_loss(workspace, tmp_path, monkeypatch, mode):
    real = train_mod.token_loss_sum

    def poisoned(model, batch):
        loss, n = real(model, batch)
        return (loss * float("nan"), n) if model.training and poisoned.calls == 5 else (loss, n)

    def counting(model, batch):
        poisoned.calls += model.training
        return poisoned(model, batch)

    poisoned.calls = 0
    monkeypatch.setattr(train_mod, "token_loss_sum", counting)
    recipe = _recipe(workspace, tmp_path / mode, f"on_nonfinite={mode}", "max_steps=8")
    if mode == "stop":
        with pytest.raises(TrainingError, match="step 5: non-finite loss"):
            train(recipe, progress=False)
        assert (tmp_path / mode / "checkpoints" / "step-4").exists()
    else:
        result = train(recipe, progress=False)
        assert result.steps == 8


def test_sigint_saves_and_exits_then_resumes(workspace, tmp_path):
    out = tmp_path / "int"
    cmd = [sys.executable, "-m", "qlora_kit.cli", "train", str(workspace / "tiny.yaml"), f"output_dir={out}",
           "max_steps=400", "save_steps=0", "eval_steps=0", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    deadline = time.time() + 120
    while time.time() < deadline and not [r for r in read_metrics(out) if "loss" in r]:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out_text, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and "Traceback" not in err
    assert "run the same command again to resume" in out_text + err


def test_messages_training_saves_its_chat_template_and_inference_uses_it(workspace, tmp_path, monkeypatch):
    """A tokenizer without a chat template: training renders with the fallback one, saves it with the adapter
    (and its checkpoints), and generation from the adapter or from the exported model renders with it."""
    import shutil

    from qlora_kit import generate as generate_mod
    from qlora_kit.data import FALLBACK_CHAT_TEMPLATE
    from qlora_kit.export import export_merged

    base = tmp_path / "base"
    shutil.copytree(workspace / "base", base)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (base / f).unlink(missing_ok=True)
    make_tokenizer(chat_template=None).save_pretrained(base)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    result = train(_recipe(workspace, tmp_path / "run", f"model={base}", f"dataset.path={tmp_path / 'chat.jsonl'}",
                           "dataset.format=messages", "dataset.eval_path=null", "max_steps=2", "save_steps=2"),
                   progress=False)
    adapter = result.output_dir / "adapter"
    assert (adapter / "chat_template.jinja").read_text() == FALLBACK_CHAT_TEMPLATE
    assert (result.output_dir / "checkpoints" / "step-2" / "chat_template.jinja").is_file()

    seen = []
    real = generate_mod.generate
    monkeypatch.setattr(generate_mod, "generate", lambda m, t, reqs, **kw: seen.extend(reqs) or real(m, t, reqs, **kw))
    rows = [{"messages": chat[:1]}]
    generate_mod.run(str(base), {"tuned": adapter}, rows, max_new_tokens=2, stream=open(os.devnull, "w"))
    assert seen[0].chat and seen[0].prompt.endswith("<|user|>\nhi</s><|assistant|>\n")

    merged = export_merged(adapter, tmp_path / "merged", progress=False).out_dir
    assert (merged / "chat_template.jinja").read_text() == FALLBACK_CHAT_TEMPLATE
    assert (merged / "tokenizer.json").is_file()  # the base's tokenizer, not just the adapter's template
    seen.clear()
    generate_mod.run(str(merged), {}, rows, max_new_tokens=2, stream=open(os.devnull, "w"))
    assert seen[0].prompt.endswith("<|user|>\nhi</s><|assistant|>\n")


@pytest.fixture(scope="module")
def resumable_run(workspace, tmp_path_factory):
    """A finished 2-step run with checkpoints, trained once for the tests that resume it."""
    out = tmp_path_factory.mktemp("resumable") / "run"
    train(_recipe(workspace, out, "max_steps=2", "save_steps=1", "eval_steps=0"), progress=False)
    return out


@pytest.mark.parametrize("change, message", [
    ("lora.r=8", "was saved with lora.r=4, this recipe has lora.r=8"),
    ("lora.alpha=4", "was saved with lora.alpha=8.0, this recipe has lora.alpha=4.0"),
    ("lora.target_modules=[q_proj,v_proj]", "the saved adapter and this model adapt different layers "
     "(lora.target_modules changed?): only in the saved one: model.layers.0.mlp.down_proj, "),
])
def test_resuming_with_another_adapter_is_refused_naming_the_difference(workspace, resumable_run, tmp_path, change,
                                                                         message):
    import shutil

    from qlora_kit.errors import CheckpointError

    out = shutil.copytree(resumable_run, tmp_path / "run")
    with pytest.raises(CheckpointError, match="step-2: " + re.escape(message)) as err:
        train(_recipe(workspace, out, "max_steps=2", "save_steps=1", "eval_steps=0", change), progress=False)
    assert "Error" not in str(err.value)


def test_trainer_state_dict_round_trips(workspace, tmp_path):
    """load_state_dict(state_dict()) into a fresh trainer reproduces every piece of the state."""
    first = train_mod.Trainer(_recipe(workspace, tmp_path / "a", "max_steps=3"), progress=False)
    first._step(iter(first.batches))
    first.counters.step = 1
    state = first.state_dict()
    second = train_mod.Trainer(_recipe(workspace, tmp_path / "b", "max_steps=3"), progress=False)
    second.load_state_dict(state)
    again = second.state_dict()
    assert again["counters"] == state["counters"] and again["data"] == state["data"]
    assert again["scheduler"] == state["scheduler"] and torch.equal(again["rng"]["torch_cpu"], state["rng"]["torch_cpu"])
    assert all(torch.equal(again["adapter"].tensors[k], v) for k, v in state["adapter"].tensors.items())
    assert set(again["optimizer"]["state"]) == set(state["optimizer"]["state"]) != set()


def test_float16_trains_with_dynamic_loss_scaling(workspace, tmp_path, capsys):
    recipe = _recipe(workspace, tmp_path / "fp16", "compute_dtype=float16", "max_steps=4", "eval_steps=0",
                     "save_steps=0")
    trainer = train_mod.Trainer(recipe, progress=False)
    assert "dynamic loss scaling" in capsys.readouterr().err
    # a scale that overflows fp16: the step is skipped and the scale drops (far, so the test stays short)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-20)
    result = trainer.run()
    records = [r for r in read_metrics(tmp_path / "fp16") if "loss" in r]
    assert result.steps == 4 and 1 <= trainer.counters.skipped_steps < 4
    assert records and all(r["loss_scale"] < 2.0**40 for r in records)
    assert all(bool(t.isfinite().all()) for t in _adapter(tmp_path / "fp16").values())
    state = json.loads((tmp_path / "fp16" / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["scaler"]["scale"] == trainer.scaler.get_scale()



def test_batches_are_padding_free_by_default_and_padded_on_request(workspace, tmp_path):
    """Default: each batch one row of its examples (per-example attention, the same real tokens as the padded
    batch); `padding_free=false` pads as before; both train the same first-step loss."""
    free = train_mod.Trainer(_recipe(workspace, tmp_path / "free", "max_steps=1"), progress=False)
    padded = train_mod.Trainer(_recipe(workspace, tmp_path / "pad", "max_steps=1", "padding_free=false"),
                               progress=False)
    a, b = next(iter(free.batches)), next(iter(padded.batches))
    assert a["input_ids"].shape[0] == 1 and "seq_ids" in a and "attention_mask" in b
    assert train_mod.real_tokens(a) == train_mod.real_tokens(b) == a["input_ids"].shape[1]
    loss_a, loss_b = free._step(iter([a])), padded._step(iter([b]))
    assert loss_a[0] == pytest.approx(loss_b[0], rel=1e-2)  # bf16 compute: equal to its rounding


def test_a_cpu_trainer_keeps_freed_memory_for_reuse(monkeypatch):
    """glibc's mallopt is called with the kit's limits (mmap threshold, then trim threshold at twice it), unless
    the user set glibc's own variables."""
    import ctypes

    from qlora_kit import device

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert device.keep_freed_memory()
    assert calls == [(-3, device.MALLOC_KEEP_BYTES), (-1, 2 * device.MALLOC_KEEP_BYTES)]
    monkeypatch.setattr(ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError("no libc")))
    assert not device.keep_freed_memory()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # the user's own setting wins
    assert not device.keep_freed_memory() and len(calls) == 2

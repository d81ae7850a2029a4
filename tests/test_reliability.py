"""Reliability: bad inputs, interruptions, numerical faults and safe loading, all through the real CLI.

Every bad input must end with a non-zero exit, exactly one `qlora-kit: error:` line naming the culprit and what
to do, no traceback (a traceback with --debug), and nothing half-written that looks complete. RELIABILITY.md
is the catalogue of these cases with the messages users see.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from qlora_kit.cli import main
from qlora_kit.targets import RECORD_NAME

from conftest import make_model, make_tokenizer, save_model

WORDS = ["apple", "tree", "stone", "river", "house", "cloud", "bird", "fish", "rain", "salt", "wind", "gold"]
RECIPE = """# reliability test recipe: tiny llama, a few steps
model: base
dataset: {path: train.jsonl, format: alpaca}
output_dir: out
max_steps: 2
batch_size: 4
max_seq_len: 160
learning_rate: 0.01
optimizer: adamw
logging_steps: 1
gradient_checkpointing: false
lora: {r: 4, alpha: 8, target_modules: all-linear}
"""


@dataclass(frozen=True)
class Workspace:
    root: Path
    base: Path
    recipe: Path
    data: Path
    adapter: Path


def _rows(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine their spinning costs a lot."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    from qlora_kit.adapters import save_adapter
    from qlora_kit.loader import load_quantized
    from qlora_kit.lora import LoraConfig

    root = tmp_path_factory.mktemp("reliability")
    base = save_model(make_model("llama"), root / "base")
    make_tokenizer().save_pretrained(base)
    data = root / "train.jsonl"
    data.write_text(_rows({"instruction": "Repeat.", "input": w, "output": w} for w in WORDS * 2))
    recipe = root / "tiny.yaml"
    recipe.write_text(RECIPE)
    lora = LoraConfig(r=4, alpha=8)
    adapter = root / "adapter"
    save_adapter(load_quantized(base, lora=lora), adapter, lora, str(base))
    return Workspace(root, base, recipe, data, adapter)


# --- building bad inputs -------------------------------------------------------------------------------------


def _model_copy(ws: Workspace, tmp: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(ws.base, tmp / name))


def _model_without(*names: str):
    def build(ws, tmp):
        path = _model_copy(ws, tmp)
        for name in names:
            (path / name).unlink()
        return path

    return build


def _model_with_config(**changes):
    """A copy whose config.json has `changes` (a callable gets the old value)."""

    def build(ws, tmp):
        path = _model_copy(ws, tmp)
        cfg = json.loads((path / "config.json").read_text())
        cfg.update({k: v(cfg.get(k)) if callable(v) else v for k, v in changes.items()})
        (path / "config.json").write_text(json.dumps(cfg))
        return path

    return build


def _model_with_text(name: str, text: str):
    def build(ws, tmp):
        path = _model_copy(ws, tmp)
        (path / name).write_text(text)
        return path

    return build


def _model_config_edit(edit):
    def build(ws, tmp):
        path = _model_copy(ws, tmp)
        cfg = json.loads((path / "config.json").read_text())
        edit(cfg)
        (path / "config.json").write_text(json.dumps(cfg))
        return path

    return build


def _model_edit_weights(edit):
    def build(ws, tmp):
        path = _model_copy(ws, tmp)
        f = path / "model.safetensors"
        f.write_bytes(edit(f.read_bytes()))
        return path

    return build


def _corrupt_header(raw: bytes) -> bytes:
    data = bytearray(raw)
    data[10:20] = b"\xff" * 10
    return bytes(data)


def _pickle_only(ws, tmp):
    path = _model_without("model.safetensors")(ws, tmp)
    (path / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")  # a pickle: never opened
    return path


def _sharded_missing_shard(ws, tmp):
    path = save_model(make_model("llama"), tmp / "model", max_shard_size="60KB")
    make_tokenizer().save_pretrained(path)
    sorted(path.glob("model-*.safetensors"))[-1].unlink()
    return path


def _tokenizer_without(pad: bool, eos: bool):
    def build(ws, tmp):
        path = _model_copy(ws, tmp)
        for f in path.glob("*token*"):
            f.unlink()
        make_tokenizer(pad=pad, eos=eos).save_pretrained(path)
        return path

    return build


def _adapter_edit(edit):
    def build(ws, tmp):
        path = Path(shutil.copytree(ws.adapter, tmp / "adapter"))
        edit(path)
        return path

    return build


def _truncate(path: Path, keep: int = -100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _file(name: str, text: str):
    def build(ws, tmp):
        (tmp / name).write_text(text)
        return tmp / name

    return build


def _empty_dir(ws, tmp):
    (tmp / "out").mkdir()
    return tmp / "out"


def _quantized(ws, tmp):
    from qlora_kit.convert import quantize_checkpoint

    quantize_checkpoint(ws.base, tmp / "q", progress=False)
    return tmp / "q"


def _out(ws, tmp):
    return tmp / "out"


def _train(*overrides, model=None, data=None, recipe=None, out=_out):
    """argv for `train`; `model` / `data` / `recipe` / `out` build a bad model dir, dataset, recipe or output."""

    def argv(ws, tmp):
        extra = [f"model={model(ws, tmp)}"] if model else []
        extra += [f"dataset.path={data(ws, tmp)}"] if data else []
        path = recipe(ws, tmp) if recipe else ws.recipe
        return ["train", str(path), f"output_dir={out(ws, tmp)}", *extra, *overrides, "--no-progress"]

    return argv


def _quantize(model=None, *flags, out=_out):
    def argv(ws, tmp):
        return ["quantize", str(model(ws, tmp) if model else ws.base), str(out(ws, tmp)), *flags]

    return argv


def _export(adapter=None, *flags, out=_out):
    def argv(ws, tmp):
        return ["export", str(adapter(ws, tmp) if adapter else ws.adapter), "--out", str(out(ws, tmp)),
                "--no-progress", *flags]

    return argv


def _generate(*args, model=None, adapter=None, prompts=None):
    def argv(ws, tmp):
        extra = ["--adapter", f"a={adapter(ws, tmp)}"] if adapter else []
        extra += ["--file", str(prompts(ws, tmp))] if prompts else ["--prompt", "hi"]
        return ["generate", str(model(ws, tmp) if model else ws.base), *extra, "--max-new-tokens", "2", *args]

    return argv


_ALPACA_ROW = {"instruction": "Repeat.", "input": "x", "output": "x"}
# id -> (argv builder, substrings the error line must contain: the culprit and what to do)
BAD_INPUTS = {
    # recipe keys, types, ranges, overrides
    "misspelled-key": (_train("learning_rat=0.1"), ["'learning_rat'", "did you mean 'learning_rate'"]),
    "misspelled-nested-key": (_train("lora.alpah=8"), ["'lora.alpah'", "did you mean 'lora.alpha'"]),
    "misspelled-key-in-file": (
        _train(recipe=_file("bad.yaml", RECIPE.replace("batch_size", "batchsize"))),
        ["'batchsize'", "did you mean 'batch_size'"]),
    "unknown-key-no-match": (_train("zzz=1"), ["'zzz'", "valid keys"]),
    "wrong-type-int": (_train("batch_size=four"), ["batch_size must be an integer", "'four'"]),
    "wrong-type-bool": (_train("packing=3"), ["packing must be true or false"]),
    "wrong-type-section": (_train("lora=8"), ["lora must be a mapping"]),
    "wrong-type-list": (_train("lora.target_modules={a: 1}"), ["lora.target_modules must be a list of strings"]),
    "lora-r-zero": (_train("lora.r=0"), ["lora.r must be a positive integer", "0"]),
    "lora-r-negative": (_train("lora.r=-4"), ["lora.r must be a positive integer", "-4"]),
    "lora-dropout-one": (_train("lora.dropout=1.0"), ["lora.dropout must be in [0, 1)"]),
    "blocksize-not-power-of-two": (_train("quant.blocksize=48"), ["quant.blocksize must be a power of two", "48"]),
    "blocksize-out-of-range": (_train("quant.blocksize=8192"), ["quant.blocksize", "32..4096", "8192"]),
    "quant-type": (_train("quant.type=int4"), ["quant.type must be one of", "'int4'"]),
    "learning-rate-negative": (_train("learning_rate=-1e-4"), ["learning_rate must be > 0", "-0.0001"]),
    "warmup-ratio-one": (_train("warmup_ratio=1.0"), ["warmup_ratio must be in [0, 1)", "1.0"]),
    "batch-size-zero": (_train("batch_size=0"), ["batch_size must be >= 1", "0"]),
    "max-seq-len-zero": (_train("max_seq_len=0"), ["max_seq_len must be >= 1"]),
    "no-length": (_train("max_steps=0", "epochs=0"), ["max_steps and epochs are both 0"]),
    "compute-dtype": (_train("compute_dtype=fp8"), ["compute_dtype must be one of", "'fp8'"]),
    "optimizer": (_train("optimizer=sgd"), ["optimizer must be one of", "'sgd'"]),
    "on-nonfinite": (_train("on_nonfinite=ignore"), ["on_nonfinite must be one of", "stop, skip"]),
    "override-no-equals": (_train("lora.r"), ["override 'lora.r' is not of the form key=value"]),
    "override-empty-part": (_train("lora..r=4"), ["override 'lora..r=4' is not of the form key=value"]),
    "override-bad-yaml": (_train("lora.target_modules=[q_proj"), ["override 'lora.target_modules=[q_proj'",
                                                                  "not valid YAML"]),
    "override-conflict": (_train("lora=8", "lora.r=4"), ["'lora'", "already set"]),
    "recipe-missing": (_train(recipe=lambda ws, tmp: tmp / "nope.yaml"), ["recipe not found", "nope.yaml"]),
    "recipe-not-yaml": (_train(recipe=_file("bad.yaml", "model: [unclosed\n")), ["bad.yaml is not valid YAML"]),
    "recipe-not-mapping": (_train(recipe=_file("bad.yaml", "- a\n- b\n")), ["bad.yaml must be a mapping"]),
    "recipe-no-model": (_train(recipe=_file("bad.yaml", "dataset: {path: x.jsonl}\n")),
                        ["missing required key 'model'"]),
    # model directories
    "model-dir-missing": (_train(model=lambda ws, tmp: tmp / "nope"), ["nope: no such model directory"]),
    "no-config-json": (_train(model=_model_without("config.json")), ["config.json: missing"]),
    "config-not-json": (_train(model=_model_with_text("config.json", "{")), ["config.json: not valid JSON"]),
    "no-weights": (_train(model=_model_without("model.safetensors")), ["no model.safetensors"]),
    "pickle-weights-only": (_train(model=_pickle_only), ["only pickle weights", "safetensors only",
                                                         "safe_serialization=True"]),
    "no-tokenizer": (_train(model=_model_without("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")),
                     ["cannot load a tokenizer", "copy tokenizer.json"]),
    "truncated-safetensors": (_train(model=_model_edit_weights(lambda b: b[:-1000])),
                              ["model.safetensors: truncated", "re-download"]),
    "corrupt-safetensors-header": (_train(model=_model_edit_weights(_corrupt_header)),
                                   ["model.safetensors", "corrupt"]),
    "not-safetensors": (_train(model=_model_edit_weights(lambda b: b"<html>rate limited</html>")),
                        ["model.safetensors: not a safetensors file", "re-download"]),
    "index-names-missing-shard": (_train(model=_sharded_missing_shard), ["names missing shard", "download them"]),
    "shapes-disagree": (_train(model=_model_with_config(intermediate_size=lambda n: n + 32)),
                        ["has shape", "config.json implies", "disagree"]),
    "unknown-architecture": (_train(model=_model_with_config(model_type="frobnicator")),
                             ["unsupported architecture", "frobnicator"]),
    "tokenizer-no-pad-no-eos": (_train(model=_tokenizer_without(pad=False, eos=False)),
                                ["model: the tokenizer has neither a pad nor an eos token", "set a pad_token"]),
    # data
    "dataset-missing": (_train(data=lambda ws, tmp: tmp / "nope.jsonl"), ["dataset file not found", "nope.jsonl"]),
    "dataset-empty": (_train(data=_file("empty.jsonl", "\n")), ["empty.jsonl: the dataset is empty"]),
    "malformed-json-line": (_train(data=_file("bad.jsonl", _rows([_ALPACA_ROW] * 2) + "{oops\n")),
                            ["bad.jsonl, line 3: malformed JSON"]),
    "row-missing-field": (_train(data=_file("bad.jsonl", _rows([_ALPACA_ROW, {"instruction": "x"}]))),
                          ["bad.jsonl, line 2: missing field 'output'"]),
    "row-wrong-type": (_train(data=_file("bad.jsonl", _rows([{**_ALPACA_ROW, "output": 3}]))),
                       ["bad.jsonl, line 1: field 'output' must be a string"]),
    "row-not-object": (_train(data=_file("bad.jsonl", "[1, 2]\n")), ["bad.jsonl, line 1: expected an object"]),
    "nothing-left-to-train": (_train("max_seq_len=8"), ["no example has a trainable token left", "max_seq_len"]),
    "target-modules-match-nothing": (_train("lora.target_modules=[nonexistent]"),
                                     ["matched no linear layer", "q_proj", "all-linear"]),
    "output-dir-under-a-file": (_train(out=lambda ws, tmp: _file("f", "")(ws, tmp) / "sub"),
                                ["/f/sub: cannot create the output directory", "set output_dir"]),
    # quantize
    "quantize-pickle-only": (_quantize(_pickle_only), ["only pickle weights"]),
    "quantize-out-exists": (_quantize(None, out=_empty_dir), ["out: already exists", "choose another"]),
    "quantize-already-quantized": (_quantize(_quantized), ["already quantized"]),
    # export
    "export-adapter-missing": (_export(lambda ws, tmp: tmp / "nope"), ["nope: no such adapter directory"]),
    "export-adapter-config-not-json": (_export(_adapter_edit(lambda p: (p / "adapter_config.json").write_text("{"))),
                                       ["adapter_config.json: not valid JSON"]),
    "export-adapter-weights-missing": (_export(_adapter_edit(lambda p: (p / "adapter_model.safetensors").unlink())),
                                       ["adapter_model.safetensors: missing"]),
    "export-adapter-truncated": (_export(_adapter_edit(lambda p: _truncate(p / "adapter_model.safetensors"))),
                                 ["adapter_model.safetensors: cannot read", "corrupt or truncated"]),
    "export-base-gone": (_export(_adapter_edit(lambda p: (p / "adapter_config.json").write_text(json.dumps(
        {**json.loads((p / "adapter_config.json").read_text()), "base_model_name_or_path": "/gone/base"})))),
        ["'/gone/base'", "pass --base"]),
    "export-layer-record-damaged": (_export(_adapter_edit(lambda p: _truncate(p / RECORD_NAME))),
                                    ["qlora_kit.json: unreadable", "restore it", "or delete it"]),
    "export-base-pickle-only": (lambda ws, tmp: [*_export()(ws, tmp), "--base", str(_pickle_only(ws, tmp))],
                                ["only pickle weights", "safetensors only"]),
    "export-out-exists": (_export(None, out=_empty_dir), ["out: already exists", "choose another"]),
    # generate
    "generate-adapter-missing": (_generate(adapter=lambda ws, tmp: tmp / "nope"), ["nope: no such adapter directory"]),
    "generate-adapter-truncated": (_generate(adapter=_adapter_edit(lambda p: _truncate(
        p / "adapter_model.safetensors"))), ["adapter_model.safetensors: cannot read"]),
    "generate-pickle-only": (_generate(model=_pickle_only), ["only pickle weights", "safetensors only"]),
    "generate-no-lm-head": (_generate(model=_model_config_edit(lambda cfg: cfg.pop("architectures"))),
                            ["config.json: names no causal-LM architecture (architectures: none)", "ForCausalLM"]),
    "generate-adapter-spec": (lambda ws, tmp: ["generate", str(ws.base), "--adapter", "nodir", "--prompt", "x"],
                              ["--adapter 'nodir': expected NAME=DIR"]),
    "generate-prompt-bad-line": (_generate(prompts=_file("p.jsonl", '{"prompt": "a"}\n{"prompt": \n')),
                                 ["p.jsonl, line 2: malformed JSON"]),
    "generate-prompt-not-object": (_generate(prompts=_file("p.jsonl", '{"prompt": "a"}\n"b"\n')),
                                   ["p.jsonl, line 2: expected an object"]),
    "generate-prompt-no-field": (_generate(prompts=_file("p.jsonl", '{"prompt": "a"}\n{"text": "b"}\n')),
                                 ["p.jsonl, line 2: each row needs 'prompt'"]),
    "generate-prompt-file-missing": (_generate(prompts=lambda ws, tmp: tmp / "nope.jsonl"), ["nope.jsonl"]),
}


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("qlora-kit: error:")]


def _nothing_finished(out: Path) -> None:
    """No output that looks complete: no final dir for quantize/export, no adapter or step-N for train."""
    assert not (out / "adapter").exists()
    assert not list(out.glob("checkpoints/step-*"))
    assert not (out / "config.json").exists() and not list(out.glob("*.safetensors"))
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(ws, tmp_path, capsys, record_property, case):
    build, expect = BAD_INPUTS[case]
    argv = build(ws, tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert rc == 2 and len(lines) == 1, err
    assert "Traceback" not in err
    for part in expect:
        assert part in lines[0], lines[0]
    record_property("message", lines[0])
    _nothing_finished(tmp_path / "out")


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_with_debug_raises(ws, tmp_path, case):
    """--debug re-raises the same error, so the traceback is there for a bug report."""
    from qlora_kit.errors import QloraKitError

    build, _ = BAD_INPUTS[case]
    with pytest.raises((QloraKitError, OSError)):
        main(["--debug", *build(ws, tmp_path)])


# --- inputs that look bad but must work -----------------------------------------------------------------------


def test_tokenizer_without_pad_pads_with_eos_and_trains(ws, tmp_path, capsys):
    model = _tokenizer_without(pad=False, eos=True)(ws, tmp_path)
    assert main(_train(model=lambda ws, tmp: model)(ws, tmp_path)) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_examples_longer_than_max_seq_len_are_truncated_and_counted(ws, tmp_path, capsys, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="qlora_kit.data")
    long = _file("long.jsonl", _rows([{"text": " ".join(WORDS * 20)}] * 3 + [{"text": "apple tree"}]))
    argv = _train("dataset.format=text", "max_seq_len=24", data=long)(ws, tmp_path)
    assert main(argv) == 0, capsys.readouterr().err
    assert "4 examples, 3 truncated to 24 tokens" in caplog.text
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


# --- a full disk while saving ------------------------------------------------------------------------------------


def _enospc(kind: str) -> Exception:
    """What a full disk looks like from each writer: safetensors and torch.save do not raise OSError."""
    from safetensors import SafetensorError

    return {
        "oserror": OSError(errno.ENOSPC, "No space left on device"),
        "safetensors": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
        "torch.save": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
    }[kind]


DISK_FULL = {
    # id -> (command, the writer that hits the full disk, a piece of the path it fails on, what it raises)
    "train-checkpoint-adapter": ("train", "qlora_kit.adapters.save_file", ".step-1.tmp-", "oserror"),
    "train-checkpoint-adapter-safetensors": ("train", "qlora_kit.adapters.save_file", ".step-1.tmp-", "safetensors"),
    "train-checkpoint-optimizer": ("train", "torch.save", "optimizer.pt", "torch.save"),
    "train-checkpoint-rng": ("train", "qlora_kit.runstate.save_file", "rng.safetensors", "safetensors"),
    "train-checkpoint-state": ("train", "pathlib.Path.write_text", "trainer_state.json", "oserror"),
    "train-final-adapter": ("train", "qlora_kit.adapters.save_file", ".adapter.tmp-", "safetensors"),
    "train-final-adapter-config": ("train", "pathlib.Path.write_text", ".adapter.tmp-", "oserror"),
    "train-metrics": ("train", "pathlib.Path.write_text", "metrics.jsonl", "oserror"),
    "quantize-shard": ("quantize", "qlora_kit.safetensors_io.save_file", ".partial", "oserror"),
    "quantize-shard-safetensors": ("quantize", "qlora_kit.safetensors_io.save_file", ".partial", "safetensors"),
    "quantize-config": ("quantize", "pathlib.Path.write_text", "config.json", "oserror"),
    "export-config": ("export", "pathlib.Path.write_text", "config.json", "oserror"),
}


@pytest.mark.parametrize("case", list(DISK_FULL))
def test_disk_full_while_saving(ws, tmp_path, capsys, monkeypatch, record_property, case):
    """The write fails as it really would; one line says what and where, nothing half-written looks finished,
    and (for train) the same command run again once there is space finishes the job."""
    import importlib

    command, target, where, kind = DISK_FULL[case]
    module_name, attr = target.rsplit(".", 1)
    owner = Path if module_name == "pathlib.Path" else importlib.import_module(module_name)
    real = getattr(owner, attr)

    def full(*args, **kwargs):
        path = args[0] if owner is Path else args[1]
        if where in str(path):
            raise _enospc(kind)
        return real(*args, **kwargs)

    argv = {"train": _train("save_steps=0", "max_steps=1"), "quantize": _quantize(), "export": _export()}[command]
    argv = argv(ws, tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(owner, attr, full)
        rc = main(argv)
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "free some space and run the same command again" in lines[0].lower(), lines[0]
    record_property("message", lines[0])
    out = tmp_path / "out"
    if command != "train":
        assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
        return
    assert not (out / "adapter").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_finished_outputs_read_like_any_new_directory(ws, tmp_path):
    """Built in a private temp dir, an output still ends up with the permissions of a plain mkdir."""
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    assert main(_quantize()(ws, tmp_path)) == 0
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


# --- SIGKILL at random moments, resume, same adapter ------------------------------------------------------------

# Runs in its own interpreter: imports once, then forks one child per attempt (a fresh process, killed for real)
# so a dozen attempts do not pay a dozen interpreter start-ups. A child counts "ticks": before, during and after
# every write the trainer makes (adapter and RNG safetensors, optimizer torch.save, JSON/YAML text, renames,
# deletions, metrics lines) and before each step, and SIGKILLs itself at the planned tick. "During" means the write
# happened and was then cut short as a kill in the middle leaves it: a file cut in half, half a metrics line, one
# file of a directory deleted. A plan entry (scope, n) kills at the n-th tick counted in that scope: "any" (the
# whole attempt), "checkpoint" (inside runstate.save_checkpoint), "finish" (inside the final adapter save), or
# one kind of tick such as "rmtree:during".
KILL_DRIVER = r"""
import json, os, pathlib, shutil, signal, sys

import matplotlib
import torch
from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: F401 (imported once, before the forks)

import qlora_kit.adapters, qlora_kit.metrics, qlora_kit.runstate, qlora_kit.train
from qlora_kit.cli import main

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402,F401

torch.set_num_threads(1)  # a tiny model: threads only add spinning
recipe, out, ref, plan, log_path = sys.argv[1:6]
plan = json.loads(plan)


def arm(scope, kill_at, attempt):
    ticks = {"any": 0, "checkpoint": 0, "finish": 0}
    where = {"checkpoint": False, "finish": False, "step": 0}

    def tick(name, phase, during=None):
        label = f"{name}:{phase}"
        ticks["any"] += 1
        ticks["checkpoint"] += where["checkpoint"]
        ticks["finish"] += where["finish"]
        ticks[label] = ticks.get(label, 0) + 1
        if ticks.get(scope) != kill_at or (scope in where and not where[scope]) or (":" in scope and scope != label):
            return
        if during is not None:
            during()
        with open(log_path, "a") as log:
            log.write(json.dumps({"attempt": attempt, "plan": [scope, kill_at], "at": label, **where}) + "\n")
        os.kill(os.getpid(), signal.SIGKILL)

    def halve(path):
        path = pathlib.Path(path)
        if path.is_file():
            os.truncate(path, path.stat().st_size // 2)

    def writer(owner, attr, path_arg):
        real = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            tick(attr, "before")
            result = real(*args, **kwargs)
            tick(attr, "during", lambda: halve(args[path_arg]))
            tick(attr, "after")
            return result

        setattr(owner, attr, wrapped)

    def plain(owner, attr, during=None, applies=lambda *args: True):
        real = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            tick(attr, "before")
            if during is not None and applies(*args):
                tick(attr, "during", lambda: during(*args))
            result = real(*args, **kwargs)
            tick(attr, "after")
            return result

        setattr(owner, attr, wrapped)

    def flag(owner, attr, key):
        real = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            where[key] = True
            try:
                return real(*args, **kwargs)
            finally:
                where[key] = False

        setattr(owner, attr, wrapped)

    def torn_line(self, record):
        self._file.write(json.dumps(record)[:20])
        self._file.flush()

    def part_of_rmtree(path, *args, **kwargs):
        files = sorted(p for p in pathlib.Path(path).rglob("*") if p.is_file())
        if files:
            files[0].unlink()

    writer(qlora_kit.adapters, "save_file", 1)
    writer(qlora_kit.runstate, "save_file", 1)
    writer(torch, "save", 1)
    writer(pathlib.Path, "write_text", 0)
    plain(os, "replace")
    plain(shutil, "rmtree", part_of_rmtree, lambda path, *args: pathlib.Path(path).exists())
    plain(qlora_kit.metrics.MetricsLog, "write", torn_line)
    flag(qlora_kit.runstate, "save_checkpoint", "checkpoint")
    flag(qlora_kit.train.Trainer, "_finish", "finish")
    real_step = qlora_kit.train.Trainer._step

    def step(self, it):
        where["step"] = self.counters.step + 1
        tick("step", "before")
        return real_step(self, it)

    qlora_kit.train.Trainer._step = step


def check(out_dir):
    # what the last kill left: whatever looks finished (a step-N with its state, adapter/) must be whole
    from safetensors.torch import load_file

    from qlora_kit.runstate import complete_checkpoints

    done = [d for _, d in complete_checkpoints(pathlib.Path(out_dir))]
    if (pathlib.Path(out_dir) / "adapter").exists():
        done.append(pathlib.Path(out_dir) / "adapter")
    for d in done:
        json.loads((d / "adapter_config.json").read_text())
        load_file(d / "adapter_model.safetensors")
        if d.name != "adapter":
            json.loads((d / "trainer_state.json").read_text())
            load_file(d / "rng.safetensors")
            torch.load(d / "optimizer.pt", weights_only=True)


def attempt(out_dir, scope, kill_at, i):
    pid = os.fork()
    if pid == 0:
        check(out_dir)
        arm(scope, kill_at, i)
        os._exit(main(["train", recipe, f"output_dir={out_dir}", "--no-progress"]))
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL, status
        return "killed"
    assert os.WEXITSTATUS(status) == 0, status
    return "finished"


assert attempt(ref, "any", 0, -1) == "finished"  # the uninterrupted run, in a child like the others
results = [attempt(out, scope, n, i) for i, (scope, n) in enumerate(plan)]
if results[-1] == "killed":
    results.append(attempt(out, "any", 0, len(results)))
results.append(attempt(out, "any", 0, len(results)))  # once more after the end: changes nothing
print(json.dumps(results))
"""


def _kill_recipe(ws, tmp_path) -> Path:
    """6 steps with a checkpoint after each (2 kept), a log line every 2 steps and an eval every 3."""
    (tmp_path / "eval.jsonl").write_text(_rows({"instruction": "Repeat.", "input": w, "output": w} for w in WORDS[:4]))
    recipe = tmp_path / "kill.yaml"
    text = RECIPE.replace("model: base", f"model: {ws.base}").replace("max_steps: 2", "max_steps: 6")
    evals = tmp_path / "eval.jsonl"
    text = text.replace("train.jsonl, format: alpaca}", f"{ws.data}, format: alpaca, eval_path: {evals}}}")
    recipe.write_text(text.replace("logging_steps: 1\n", "logging_steps: 2\nsave_steps: 1\nsave_total_limit: 2\n"
                                   "eval_steps: 3\n"))
    return recipe


def _kill_and_resume(ws, tmp_path, plan: list[tuple[str, int]]) -> tuple[list[str], list[dict]]:
    """Train through the kills of `plan`, resuming each time, then once more after the end; check that the
    outcome is the uninterrupted run's. Returns each attempt's result and the kill log."""
    from qlora_kit.metrics import read_metrics
    from qlora_kit.runstate import complete_checkpoints

    driver, log = tmp_path / "driver.py", tmp_path / "kills.jsonl"
    driver.write_text(KILL_DRIVER)
    out, ref = tmp_path / "out", tmp_path / "ref"
    cmd = [sys.executable, str(driver), str(_kill_recipe(ws, tmp_path)), str(out), str(ref), json.dumps(plan),
           str(log)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    killed = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert results.count("killed") == len(killed)

    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / "adapter" / name).read_bytes() == (ref / "adapter" / name).read_bytes(), name
    deterministic = ("step", "loss", "lr", "grad_norm", "tokens_seen", "eval_loss")
    strip = lambda records: [{k: r[k] for k in deterministic if k in r} for r in records]  # noqa: E731
    assert strip(read_metrics(out)) == strip(read_metrics(ref))  # every logged step once, in order, same values
    assert [(r["step"], "loss" in r) for r in read_metrics(ref)] == [
        (0, False), (2, True), (3, False), (4, True), (6, True), (6, False)]
    assert [step for step, _ in complete_checkpoints(out)] == [5, 6]
    visible = lambda d: sorted(  # noqa: E731 (what is not a dot-named temp file or dir)
        str(p.relative_to(d)) for p in d.rglob("*") if not any(n.startswith(".") for n in p.relative_to(d).parts))
    assert visible(out) == visible(ref)
    assert not list(out.rglob(".*.tmp-*"))  # temp dirs of killed saves are gone once a save completes
    return results, killed


def test_sigkill_at_chosen_moments_then_resume_is_exact(ws, tmp_path):
    """Kills placed where they hurt most: halfway through writing optimizer.pt, while deleting the oldest
    checkpoint, halfway through a metrics line, inside the final adapter save, and — the same command run again
    after the end — while the old adapter is being replaced."""
    plan = [("save:during", 2), ("rmtree:during", 2), ("write:during", 2), ("finish", 10), ("any", 0),
            ("rmtree:during", 1)]
    results, killed = _kill_and_resume(ws, tmp_path, plan)
    assert results == ["killed"] * 4 + ["finished", "killed", "finished", "finished"], killed
    assert [k["at"] for k in killed] == ["save:during", "rmtree:during", "write:during", "write_text:during",
                                         "rmtree:during"]
    assert killed[-1]["finish"]


def test_sigkill_at_random_moments_then_resume_is_exact(ws, tmp_path):
    """12 kills at seeded random ticks — 5 inside checkpoint writes, 2 in the final save — each followed by the
    same command again; the adapter is bit-identical to an uninterrupted run and every log line is there once."""
    import random

    rng = random.Random(20240611)
    plan = ([("any", rng.randint(1, 60)) for _ in range(5)] + [("checkpoint", rng.randint(1, 40)) for _ in range(5)])
    rng.shuffle(plan)
    plan += [("finish", rng.randint(1, 17)) for _ in range(2)]  # 18 ticks there
    results, killed = _kill_and_resume(ws, tmp_path, plan)
    assert len(killed) >= 10, results
    assert sum(k["checkpoint"] for k in killed) >= 3 and any(k["finish"] for k in killed), killed


@pytest.mark.parametrize("at", ["header", "data"])
def test_disk_full_while_export_streams_shards(ws, tmp_path, capsys, monkeypatch, at):
    """Export writes each tensor into its shard from worker threads; ENOSPC there still becomes one line."""
    from qlora_kit import safetensors_io as checkpoint

    real = checkpoint._pwrite_all

    def full(fd, data, offset):
        if (offset == 0) == (at == "header"):  # a shard's header goes to offset 0, tensors after it
            raise _enospc("oserror")
        return real(fd, data, offset)

    monkeypatch.setattr(checkpoint, "_pwrite_all", full)
    assert main(_export()(ws, tmp_path)) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "free some space and run the same command again" in lines[0].lower(), lines
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


# --- interrupted export ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["add", "finish"])
def test_ctrl_c_during_export_leaves_nothing_that_looks_finished(ws, tmp_path, capsys, monkeypatch, where):
    from qlora_kit import safetensors_io as checkpoint

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.StreamingShardWriter, where, interrupted)
    assert main(_export(None, "--max-shard-gb", "0.00005")(ws, tmp_path)) == 130
    assert "qlora-kit: interrupted" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_sigkill_mid_export_leaves_only_a_hidden_temp_dir(ws, tmp_path):
    """A killed process cannot clean up; what it leaves is a dot-named temp dir, never OUT_DIR."""
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import os, signal, qlora_kit.safetensors_io as c
        add, seen = c.StreamingShardWriter.add, []
        def dies(self, name, tensor):
            add(self, name, tensor); seen.append(name)
            if len(seen) == 5:
                os.kill(os.getpid(), signal.SIGKILL)
        c.StreamingShardWriter.add = dies
        from qlora_kit.cli import main
        main(["export", {str(ws.adapter)!r}, "--out", {str(out)!r}, "--no-progress", "--max-shard-gb", "0.00005"])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()
    assert [p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()] == [True]


# --- numerical faults --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_non_finite_gradient(ws, tmp_path, capsys, caplog, monkeypatch, record_property, mode):
    """A gradient that turns inf at step 3 (the loss stays finite): stop names the step and keeps step-2; skip
    drops that update and finishes with a finite adapter."""
    import torch
    from safetensors.torch import load_file

    from qlora_kit import train as train_mod

    real = train_mod.lora_parameters

    def poisoned(model):
        params = real(model)
        backwards = []

        def hook(grad):
            backwards.append(1)
            return grad * float("inf") if len(backwards) == 3 else grad

        next(p for name, p in params.items() if "lora_B" in name).register_hook(hook)
        return params

    monkeypatch.setattr(train_mod, "lora_parameters", poisoned)
    out = tmp_path / "out"
    rc = main(_train("max_steps=4", "save_steps=1", f"on_nonfinite={mode}")(ws, tmp_path))
    err = capsys.readouterr().err
    if mode == "stop":
        lines = _error_lines(err)
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert "step 3: non-finite gradient norm; stopped" in lines[0] and "on_nonfinite=skip" in lines[0]
        record_property("message", lines[0])
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
        assert not (out / "adapter").exists()
    else:
        assert rc == 0, err
        assert "step 3: non-finite loss or gradient; step skipped" in caplog.text
        record_property("message", "WARNING: step 3: non-finite loss or gradient; step skipped")
        weights = load_file(out / "adapter" / "adapter_model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())
        state = json.loads((out / "checkpoints" / "step-4" / "trainer_state.json").read_text())
        assert state["counters"]["skipped_steps"] == 1


# --- safe loading ------------------------------------------------------------------------------------------------

PACKAGE = Path(__file__).resolve().parents[1] / "qlora_kit"


def _calls(tree):
    import ast

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            yield owner, name, {k.arg: k.value for k in node.keywords}


def test_source_never_unpickles_nor_trusts_remote_code_by_itself():
    """Over the package source: torch.load only with weights_only=True; no pickle-family imports; models are
    read with from_pretrained only with use_safetensors=True (it would accept pytorch_model.bin otherwise);
    trust_remote_code is never True."""
    import ast

    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 10
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not {"pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"} & {
                    str(n).split(".")[0] for n in names}, f"{path}: {ast.unparse(node)}"
        for owner, name, kwargs in _calls(tree):
            if name == "load" and owner == "torch":
                flag = kwargs.get("weights_only")
                assert isinstance(flag, ast.Constant) and flag.value is True, f"{path}: torch.load without weights_only"
            if name == "from_pretrained":  # a model only from safetensors, never a pickled pytorch_model.bin
                safetensors_only = kwargs.get("use_safetensors")
                assert owner in {"AutoConfig", "AutoTokenizer", "GenerationConfig"} or (
                    isinstance(safetensors_only, ast.Constant) and safetensors_only.value is True
                ), f"{path}: {owner}.from_pretrained"
            flag = kwargs.get("trust_remote_code")
            assert not (isinstance(flag, ast.Constant) and flag.value is True), f"{path}: trust_remote_code=True"


@pytest.fixture(scope="module")
def trained(ws) -> Path:
    """A finished 2-step run with a checkpoint after each step."""
    out = ws.root / "trained"
    assert main(["train", str(ws.recipe), f"output_dir={out}", "save_steps=1", "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("case", ["pickled-code", "truncated"])
def test_unsafe_or_corrupt_optimizer_state_is_refused(ws, trained, tmp_path, capsys, record_property, case):
    """Resuming reads optimizer.pt with weights_only=True: a pickle that would run code is refused, and the code
    does not run; a damaged file is refused the same way, with what to do."""
    import torch

    out = Path(shutil.copytree(trained, tmp_path / "out"))
    state = out / "checkpoints" / "step-2" / "optimizer.pt"
    marker = tmp_path / "code-ran"
    if case == "pickled-code":
        torch.save({"state": _RunsCode(str(marker))}, state)
    else:
        _truncate(state, state.stat().st_size // 2)
    rc = main(["train", str(ws.recipe), f"output_dir={out}", "save_steps=1", "--no-progress"])
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "step-2/optimizer.pt: refused, not plain tensors" in lines[0] and "weights_only" not in lines[0]
    assert f"delete {out / 'checkpoints' / 'step-2'}" in lines[0]
    record_property("message", lines[0])
    assert not marker.exists()


class _RunsCode:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.path}",)


TRUST = {
    # id -> (argv builder, the value every config/tokenizer/model-class call must get)
    "train-default": (_train(), False),
    "train-recipe-sets-it": (_train("trust_remote_code=true"), True),
    "quantize-default": (_quantize(), False),
    "quantize-flag": (_quantize(None, "--trust-remote-code"), True),
    "export-default": (_export(), False),
    "export-flag": (_export(None, "--trust-remote-code"), True),
    "generate": (_generate(), False),
}


@pytest.mark.parametrize("case", list(TRUST))
def test_trust_remote_code_only_when_asked(ws, tmp_path, capsys, monkeypatch, case):
    """Every call that could run a checkpoint's own code gets exactly what the recipe or flag says (default False)."""
    import transformers

    from qlora_kit.errors import QloraKitError

    build, expected = TRUST[case]
    seen = []

    def spy(cls, attr, stop=False):
        real = getattr(cls, attr)

        def wrapped(*args, **kwargs):
            seen.append((f"{cls.__name__}.{attr}", kwargs.get("trust_remote_code", False)))
            if stop:  # far enough: the architecture is being built
                raise QloraKitError("stop here")
            return real(*args, **kwargs)

        monkeypatch.setattr(cls, attr, wrapped)

    spy(transformers.AutoConfig, "from_pretrained")
    spy(transformers.AutoTokenizer, "from_pretrained")
    spy(transformers.AutoModelForCausalLM, "from_config", stop=True)
    spy(transformers.AutoModel, "from_config", stop=True)
    argv = build(ws, tmp_path)
    if case.startswith("export"):  # the kit's adapters record their layers, so export builds nothing: use peft's kind
        peft_style = tmp_path / "peft-adapter"
        shutil.copytree(ws.adapter, peft_style, ignore=shutil.ignore_patterns(RECORD_NAME))
        argv = [str(peft_style) if a == str(ws.adapter) else a for a in argv]
    assert main(argv) == 2
    assert "stop here" in capsys.readouterr().err
    names = {name for name, _ in seen}
    assert {"AutoConfig.from_pretrained", "AutoModelForCausalLM.from_config"} <= names, seen
    assert case.split("-")[0] != "train" or "AutoTokenizer.from_pretrained" in names
    assert {value for _, value in seen} == {expected}, seen


# --- through a real process ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("debug", [False, True])
def test_real_process_one_line_or_traceback_with_debug(ws, tmp_path, debug):
    argv = ["--debug"] * debug + _train("learning_rat=0.1")(ws, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "qlora_kit.cli", *argv], capture_output=True, text=True)
    assert proc.returncode != 0
    if debug:
        assert "Traceback" in proc.stderr and "ConfigError: unknown key 'learning_rat'" in proc.stderr
    else:
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert _error_lines(proc.stderr) == [
            "qlora-kit: error: unknown key 'learning_rat'; did you mean 'learning_rate'?"]

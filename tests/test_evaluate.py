"""`qlora-kit eval` on a tiny model with two adapters the kit's trainer trained on different tasks and formats."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from qlora_kit import scoring
from qlora_kit.cli import main
from qlora_kit.config import load_recipe
from qlora_kit.device import load_tokenizer
from qlora_kit.errors import ConfigError, DataError
from qlora_kit.evaluate import BASE, EvalConfig, read_rows, run_eval
from qlora_kit.generate import render
from qlora_kit.train import train

from conftest import make_model, make_tokenizer, save_model

WORDS = ["apple", "tree", "stone", "river", "house", "cloud", "bird", "fish", "rain", "salt", "wind", "gold"]
# Task A (alpaca): a label per word; task B (ChatML messages): another label set, another split of the words.
TASK_A = [{"instruction": "Classify the word.", "input": w, "output": "AB"[i % 2]} for i, w in enumerate(WORDS)]
TASK_B = [{"messages": [{"role": "user", "content": f"Group of {w}?"},
                        {"role": "assistant", "content": "x" if i < 6 else "y"}]} for i, w in enumerate(WORDS)]
# max_seq_len is long enough that training truncates no row, so its eval loss and `eval`'s cover the same tokens
RECIPE = """model: base
dataset: {{path: {data}, format: {fmt}, eval_path: {data}}}
output_dir: {out}
max_steps: 16
batch_size: 4
max_seq_len: 256
learning_rate: 0.02
lr_scheduler: constant
warmup_steps: 0
optimizer: adamw
logging_steps: 12
save_steps: 0
eval_steps: 0
lora: {{r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear}}
"""


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = save_model(make_model("llama"), root / "base")
    make_tokenizer().save_pretrained(base)
    runs = {}
    for name, fmt, rows in (("a", "alpaca", TASK_A), ("b", "messages", TASK_B)):
        data = _jsonl(root / f"{name}.jsonl", rows)
        (root / f"{name}.yaml").write_text(RECIPE.format(data=data.name, fmt=fmt, out=f"run_{name}"))
        runs[name] = train(load_recipe(root / f"{name}.yaml"), progress=False)
    adapters = {"ta": runs["a"].output_dir / "adapter", "tb": runs["b"].output_dir / "adapter"}
    reports = {name: run_eval(EvalConfig(base, root / f"{name}.jsonl", adapters, max_new_tokens=3, bootstrap=300,
                                         latency_repeats=1, latency_rows=2))
               for name in ("a", "b")}
    return {"root": root, "base": base, "adapters": adapters, "runs": runs, "reports": reports}


def _diff(report, a, b, metric):
    return next(c for c in report["comparisons"] if (c["a"], c["b"], c["metric"]) == (a, b, metric))


@pytest.mark.parametrize("task, own, other", [("a", "ta", "tb"), ("b", "tb", "ta")])
def test_each_adapter_beats_the_base_on_its_own_task(ws, task, own, other):
    report = ws["reports"][task]
    models = report["models"]
    assert list(models) == [BASE, "ta", "tb"] and report["rows"] == report["reference_rows"] == len(WORDS)
    assert models[own]["loss"] < models[BASE]["loss"] - 3 and models[own]["loss"] < models[other]["loss"] - 3
    assert models[own]["exact"] >= 0.4 > models[BASE]["exact"] and models[own]["exact"] > models[other]["exact"]
    loss = _diff(report, BASE, own, "loss")
    assert loss["significant"] and loss["ci"][1] < 0
    assert loss["ci"][0] <= loss["diff"] <= loss["ci"][1]
    exact = _diff(report, BASE, own, "exact")
    assert exact["diff"] == pytest.approx(models[own]["exact"] - models[BASE]["exact"]) and exact["ci"][0] > 0
    assert models[own]["ppl"] == pytest.approx(np.exp(models[own]["loss"]))
    for m in models.values():
        assert m["ms_per_token"] > 0 and m["ttft_ms"] > 0 and m["tokens_per_s"] > 0 and m["peak_mem_bytes"] > 0


def test_eval_loss_is_the_trainers_eval_loss(ws):
    """The same rows, the same encoding and masks: the adapter's loss equals the one training reported."""
    for task, name in (("a", "ta"), ("b", "tb")):
        assert ws["reports"][task]["models"][name]["loss"] == pytest.approx(ws["runs"][task].eval_loss_after, rel=2e-2)


def test_size_and_trainable_parameters_come_from_the_adapter(ws):
    models = ws["reports"]["a"]["models"]
    for name, path in ws["adapters"].items():
        tensors = load_file(path / "adapter_model.safetensors")
        assert models[name]["trainable_params"] == sum(t.numel() for t in tensors.values())
        assert models[name]["size_bytes"] == sum(p.stat().st_size for p in path.iterdir())
    assert models[BASE]["trainable_params"] == 0


def test_generation_prompt_is_the_training_prompt(ws):
    """The prompt cut from training's encoding is what `generate.render` gives, for both formats."""
    tok = load_tokenizer(ws["base"])
    for fmt, rows in (("alpaca", TASK_A), ("messages", TASK_B)):
        path = _jsonl(ws["root"] / f"p-{fmt}.jsonl", rows[:3])
        for row, er in zip(rows, read_rows(path, fmt, tok)):
            shown = {"messages": row["messages"][:-1]} if fmt == "messages" else row
            text, chat = render(tok, shown)
            assert er.prompt_ids == tok(text, add_special_tokens=not chat)["input_ids"]
            assert er.reference == (row["output"] if fmt == "alpaca" else row["messages"][-1]["content"])


def test_text_rows_are_scored_by_loss_only(ws):
    path = _jsonl(ws["root"] / "t.jsonl", [{"text": f"the {w} and the tree"} for w in WORDS[:4]])
    report = run_eval(EvalConfig(ws["base"], path, {"ta": ws["adapters"]["ta"]}, bootstrap=50))
    assert report["format"] == "text" and report["reference_rows"] == 0 and report["metrics"] == []
    tok = load_tokenizer(ws["base"])
    tokens = sum(len(tok(f"the {w} and the tree")["input_ids"]) for w in WORDS[:4])  # bos + text + eos, bos unscored
    assert report["models"][BASE]["response_tokens"] == tokens
    assert [c["metric"] for c in report["comparisons"]] == ["loss"]


def test_a_users_scorer_and_predictions(ws, tmp_path):
    scorer = tmp_path / "my_metric.py"
    scorer.write_text("def starts(prediction, reference, row):\n    return prediction[:1] == reference[:1]\n")
    out = tmp_path / "out"
    code = main(["eval", str(ws["base"]), "--adapter", f"ta={ws['adapters']['ta']}", "--data",
                 str(ws["root"] / "a.jsonl"), "--max-new-tokens", "3", "--metric", "exact", "--scorer",
                 f"{scorer}:starts", "--bootstrap", "100", "--latency-rows", "1", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["metrics"] == ["exact", "starts"] and set(report["models"]) == {BASE, "ta"}
    assert report["models"]["ta"]["starts"] >= report["models"]["ta"]["exact"]
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2 * len(WORDS) and {p["model"] for p in preds} == {BASE, "ta"}
    for p in preds:
        assert p["exact"] == float(p["prediction"] == p["reference"]) and "starts" in p
    assert "| ta |" in (out / "eval.md").read_text() and (out / "eval.png").stat().st_size > 10_000


def test_cli_prints_the_table(ws, capsys):
    assert main(["eval", str(ws["base"]), "--data", str(ws["root"] / "b.jsonl"), "--max-new-tokens", "0",
                 "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["model", "loss", "ppl"] and "\nbase " in out


@pytest.mark.parametrize("case", ["no-data", "adapter-named-base", "bad-spec", "no-assistant", "bad-scorer",
                                  "no-adapter-dir", "bad-device"])
def test_bad_input_is_one_line(ws, tmp_path, case, capsys):
    data = str(ws["root"] / "a.jsonl")
    if case == "no-assistant":
        data = str(_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]))
    args = {
        "no-data": ["--data", str(tmp_path / "nope.jsonl")],
        "adapter-named-base": ["--data", data, "--adapter", f"base={ws['adapters']['ta']}"],
        "bad-spec": ["--data", data, "--adapter", "ta"],
        "no-assistant": ["--data", data],
        "bad-scorer": ["--data", data, "--scorer", "no_such_module_xyz:f"],
        "no-adapter-dir": ["--data", data, "--adapter", f"ta={tmp_path / 'missing'}"],
        "bad-device": ["--data", data, "--device", "tpu9"],
    }[case]
    assert main(["eval", str(ws["base"]), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qlora-kit: error:"), err


def test_answer_metrics_follow_squad():
    assert scoring.normalize("The  Cat, sat!") == "cat sat"
    assert scoring.exact(" Paris ", "Paris") == 1 and scoring.exact("paris", "Paris") == 0
    assert scoring.contains("It is the Eiffel Tower.", "eiffel tower") == 1
    assert scoring.contains("towering", "tower") == 0  # whole words only
    assert scoring.f1("a red big apple", "the red apple") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert scoring.f1("", "") == 1 and scoring.f1("x", "") == 0
    with pytest.raises(ConfigError, match="expected module:function"):
        scoring.load_scorer("nocolon")


def test_paired_bootstrap_is_seeded_and_paired():
    rng = np.random.default_rng(1)
    a = rng.random(200)
    idx = scoring.resample_indices(200, 500, seed=3)
    assert np.array_equal(idx, scoring.resample_indices(200, 500, seed=3))
    same = scoring.mean_stat(a, idx) - scoring.mean_stat(a, idx)
    assert scoring.interval(same) == (0.0, 0.0)
    shifted = scoring.interval(scoring.mean_stat(a + 0.01, idx) - scoring.mean_stat(a, idx))
    assert shifted == pytest.approx((0.01, 0.01))  # paired: a constant shift has no spread at all
    assert scoring.ratio_stat(np.array([2.0, 4.0]), np.array([1.0, 3.0]), np.array([[0, 1], [1, 1]])).tolist() == [
        1.5, 4 / 3]


def test_format_detection(tmp_path):
    from qlora_kit.evaluate import detect_format

    assert detect_format(_jsonl(tmp_path / "a.jsonl", TASK_A[:1])) == "alpaca"
    assert detect_format(_jsonl(tmp_path / "m.jsonl", TASK_B[:1])) == "messages"
    assert detect_format(_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])) == "text"
    with pytest.raises(DataError, match="pass --format"):
        detect_format(_jsonl(tmp_path / "o.jsonl", [{"foo": 1}]))

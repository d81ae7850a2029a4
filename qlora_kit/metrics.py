"""Training metrics: `metrics.jsonl` (one JSON object per logged step), TensorBoard on request, a loss plot.

On resume the log is cut back to the checkpoint's step, so the steps redone after a crash are logged once,
and a line half-written when the process died is dropped rather than breaking every reader after it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qlora_kit.atomic import atomic_write

NAME = "metrics.jsonl"


def read_metrics(out_dir: Path) -> list[dict]:
    """Every complete record (a torn last line from a killed process is skipped)."""
    path = out_dir / NAME
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    """Append-only JSONL log, truncated to `upto_step` when opened (the step the run resumes from).

    `readonly`: the records are read and kept in memory but no file is written (the ranks other than 0 of a
    distributed run, which must see the same records as rank 0 to take the same decisions)."""

    def __init__(self, out_dir: Path, upto_step: int, tensorboard: bool = False, readonly: bool = False) -> None:
        self.path = out_dir / NAME
        self.records = [r for r in read_metrics(out_dir) if r.get("step", 0) <= upto_step]
        self._file = self._tb = None
        if readonly:
            return
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        self._file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=upto_step + 1)

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def first(self, key: str) -> float | None:
        return next((r[key] for r in self.records if key in r), None)

    def flush(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()

    def plot(self, path: Path) -> Path | None:
        """Training and eval loss against step; skipped quietly when matplotlib is not installed."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in self.records if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
        if train:
            ax.plot(*zip(*train), label="train loss")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path

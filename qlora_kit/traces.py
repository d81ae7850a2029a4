"""Per-request traces of the server as JSON lines, and their summary per adapter (a table and a PNG).

One line per request, appended with a single write so a crash never leaves half a record and several servers may
share a file: `time` (UTC, when the request arrived), `id`, `endpoint`, `model`, `adapter` (null: the base),
`prompt_tokens`, `completion_tokens`, `queue_s` (arrival to joining the batch), `ttft_s` (arrival to the first
token), `latency_s` (arrival to the last token), `tokens_per_s` (completion tokens over latency: what the client
saw), `finish_reason` (stop, length, cancelled, error), `choices`. Prompt and completion text only with
`with_text` (`--trace-text`): traces are often kept where prompts may not be.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qlora_kit.errors import DataError

BASE_LABEL = "(base)"
FIELDS = ("adapter", "latency_s", "completion_tokens", "prompt_tokens")  # what a summary needs in every line


class TraceLog:
    """An open JSONL trace file; `write` may be called from any thread."""

    def __init__(self, path: Path, *, with_text: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.with_text = path, with_text
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115  (held for the server's life)
        self._lock = threading.Lock()

    def write(self, record: dict, texts: dict, *, started: float) -> None:
        """`started` is the request's arrival on the perf_counter clock (turned into wall-clock time here)."""
        arrived = time.time() - (time.perf_counter() - started)
        when = datetime.datetime.fromtimestamp(arrived, datetime.timezone.utc).isoformat(timespec="milliseconds")
        line = {"time": when, **{k: _round(v) for k, v in record.items()}, **(texts if self.with_text else {})}
        text = json.dumps(line, ensure_ascii=False) + "\n"
        with self._lock:
            self._file.write(text)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _round(value):
    return round(value, 6) if isinstance(value, float) else value


def read_traces(paths: list[Path]) -> list[dict]:
    """Every record of every file; a line that is not a trace is an error naming file and line."""
    records = []
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: no such trace file (qlora-kit serve --trace FILE.jsonl writes one)")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not set(FIELDS) <= record.keys():
                raise DataError(f"{path}:{n}: not a serve trace (needs {', '.join(FIELDS)})")
            records.append(record)
    if not records:
        raise DataError(f"{', '.join(map(str, paths))}: no trace records")
    return records


@dataclass(frozen=True)
class AdapterSummary:
    adapter: str
    requests: int
    latency_p50_s: float
    latency_p95_s: float
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    tokens_per_s: float
    """Completion tokens over the summed latency of the adapter's requests: its rate as one client sees it."""
    tokens_in: int
    tokens_out: int
    errors: int
    """Requests that did not finish with stop or length (cancelled by their client, or failed)."""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100), the convention of latency reports: always an observed value."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarise(records: list[dict]) -> list[AdapterSummary]:
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["adapter"] or BASE_LABEL, []).append(r)
    out = []
    for name in sorted(groups):
        rows = groups[name]
        latency = [r["latency_s"] for r in rows]
        ttft = [r["ttft_s"] for r in rows if r.get("ttft_s") is not None]
        tokens_out = sum(r["completion_tokens"] for r in rows)
        out.append(AdapterSummary(
            name, len(rows), percentile(latency, 50), percentile(latency, 95),
            percentile(ttft, 50) if ttft else None, percentile(ttft, 95) if ttft else None,
            tokens_out / sum(latency) if sum(latency) > 0 else 0.0, sum(r["prompt_tokens"] for r in rows),
            tokens_out, sum(r.get("finish_reason") not in ("stop", "length") for r in rows),
        ))
    return out


def table(summaries: list[AdapterSummary]) -> str:
    ms = lambda v: "-" if v is None else f"{1000 * v:.0f}"  # noqa: E731
    head = ["adapter", "requests", "latency p50 ms", "p95 ms", "TTFT p50 ms", "p95 ms", "tokens/s", "tokens in",
            "tokens out", "not finished"]
    rows = [[s.adapter, str(s.requests), ms(s.latency_p50_s), ms(s.latency_p95_s), ms(s.ttft_p50_s),
             ms(s.ttft_p95_s), f"{s.tokens_per_s:.1f}", str(s.tokens_in), str(s.tokens_out), str(s.errors)]
            for s in summaries]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:  # the adapter name left-aligned, figures right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def to_json(summaries: list[AdapterSummary]) -> str:
    return json.dumps([asdict(s) for s in summaries], indent=2)


def plot(summaries: list[AdapterSummary], out: Path) -> None:
    """Latency and TTFT (p50 bars, p95 whiskers) and tokens/s per adapter, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.adapter for s in summaries]
    x = range(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(6.0, 1.2 * len(names) + 4), 3.8))
    series = (("latency", [(s.latency_p50_s, s.latency_p95_s) for s in summaries]),
              ("time to first token", [(s.ttft_p50_s or 0.0, s.ttft_p95_s or 0.0) for s in summaries]))
    for offset, (label, pairs) in zip((-0.2, 0.2), series):
        p50 = [a for a, _ in pairs]
        whiskers = [[0.0] * len(pairs), [b - a for a, b in pairs]]
        left.bar([i + offset for i in x], p50, 0.4, yerr=whiskers, capsize=3, label=f"{label} (p50, p95)")
    left.set(xticks=list(x), ylabel="seconds", title="latency per adapter")
    left.set_xticklabels(names, rotation=30, ha="right")
    left.legend(fontsize=8)
    right.bar(list(x), [s.tokens_per_s for s in summaries], 0.6, color="tab:green")
    right.set(xticks=list(x), ylabel="completion tokens / s", title="throughput per request")
    right.set_xticklabels(names, rotation=30, ha="right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)

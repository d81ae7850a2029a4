"""`qlora-kit eval`: the base and each adapter on the same held-out rows — quality, speed and cost side by side.

Rows are encoded by `data.encode_row`, the function training uses, so the response tokens scored are exactly the
ones the adapter was trained on (prompts and user turns masked as training masks them), and the generation prompt
is that same encoding cut where the last response begins: no second renderer to drift from training's. Each pass
runs the base and every adapter on one loaded base in one batch (`per_row_adapters`), each row once per model,
so all models see identical tokens and identical quantized weights. Latency is timed apart, one model at a time
on the same prompts, because in a mixed batch every row pays for every adapter's matmuls.
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.generation.streamers import BaseStreamer

from qlora_kit import scoring
from qlora_kit.adapters import adapted_modules, per_row_adapters, read_adapter_config
from qlora_kit.batching import collate
from qlora_kit.atomic import AtomicDir
from qlora_kit.data import IGNORE_INDEX, Example, encode_row, ensure_pad_token, load_rows
from qlora_kit.device import load_tokenizer
from qlora_kit.errors import ConfigError, DataError
from qlora_kit.generate import load_model
from qlora_kit.lora import QLinear
from qlora_kit.tables import markdown_table, pyplot, text_table

BASE = "base"
FORMATS = ("alpaca", "messages", "text")


@dataclass
class EvalRow:
    """One held-out row as training encodes it, and what generation is scored against."""

    example: Example
    prompt_ids: list[int] | None
    """The tokens before the last response (None: nothing to generate, e.g. a text row)."""
    reference: str | None
    row: dict[str, Any]


@dataclass
class ModelRun:
    """Everything measured for one model (the base, or the base + one adapter)."""

    name: str
    adapter_dir: Path | None
    loss_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))
    predictions: list[str] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    speed: dict[str, float] = field(default_factory=dict)
    size_bytes: int = 0
    trainable_params: int = 0


# ------------------------------------------------------------------------------------------------ the rows


def detect_format(path: Path) -> str:
    """alpaca / messages / text from the first row's keys (JSON and JSON Lines only; else pass --format)."""
    if path.suffix not in (".jsonl", ".json") or not path.is_file():
        raise DataError(f"{path}: cannot tell the format of this file; pass --format alpaca|messages|text")
    try:
        if path.suffix == ".json":
            row = json.loads(path.read_text(encoding="utf-8"))
        else:
            with path.open(encoding="utf-8") as f:
                row = json.loads(next((line for line in f if line.strip()), "{}"))
        row = row[0] if isinstance(row, list) and row else row
    except json.JSONDecodeError:
        raise DataError(f"{path}: the first row is malformed JSON; fix it, or pass --format") from None
    keys = set(row) if isinstance(row, dict) else set()
    for fmt, names in (("messages", {"messages", "conversations"}), ("alpaca", {"instruction"}), ("text", {"text"})):
        if names & keys:
            return fmt
    raise DataError(f"{path}: rows have neither 'instruction' (alpaca), 'messages'/'conversations' nor 'text'; "
                    "pass --format")


def read_rows(path: Path, fmt: str, tokenizer) -> list[EvalRow]:
    """Validated rows (`data.load_rows`), encoded by `data.encode_row` with training's masks."""
    rows = load_rows(str(path), fmt)
    out = []
    for i, row in enumerate(rows, 1):
        example = encode_row(row, fmt, tokenizer)
        trained = [t for t in range(1, len(example)) if example.labels[t] != IGNORE_INDEX]
        if not trained:
            raise DataError(f"{path}, row {i}: no response tokens to score (a conversation needs an assistant turn)")
        starts = [t for t in trained if example.labels[t - 1] == IGNORE_INDEX]
        reference = _reference(row, fmt)
        prompt = example.input_ids[: starts[-1]] if reference is not None and starts else None
        out.append(EvalRow(example, prompt, reference if prompt is not None else None, dict(row)))
    return out


def _reference(row: Mapping[str, Any], fmt: str) -> str | None:
    if fmt == "alpaca":
        return row["output"]
    if fmt == "messages":
        return next((m["content"] for m in reversed(row["messages"]) if m["role"] == "assistant"), None)
    return None


# ------------------------------------------------------------------------------------------------- passes


def _route(names: list[str]) -> list[str | None]:
    return [None if n == BASE else n for n in names]


@torch.no_grad()
def loss_pass(model, rows: list[EvalRow], names: list[str], batch_size: int, pad_id: int, autocast):
    """[models, rows] summed response-token loss and token counts; row i of every model in one batch."""
    sums, counts = np.zeros((len(names), len(rows))), np.zeros((len(names), len(rows)))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = {k: v.to(model.device) for k, v in collate([r.example for r in chunk for _ in names], pad_id).items()}
        with per_row_adapters(model, _route([n for _ in chunk for n in names])), autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        labels = batch["labels"][:, 1:]
        for k in range(labels.shape[0]):  # one row upcast at a time: the whole batch's fp32 logits never exist
            loss = F.cross_entropy(logits[k, :-1].float(), labels[k], ignore_index=IGNORE_INDEX, reduction="sum")
            m, i = k % len(names), start + k // len(names)
            sums[m, i], counts[m, i] = loss.item(), int((labels[k] != IGNORE_INDEX).sum())
    return sums, counts


class _Clock(BaseStreamer):
    """Times each decoding step: generate() hands the streamer the prompt first, then every new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], names: list[str | None], *, max_new_tokens: int, pad_id: int,
                 stop_ids: list[int], autocast, streamer=None, min_new_tokens: int = 0) -> list[list[int]]:
    """Greedy continuations (left-padded batch, per-row adapters), each cut before its first stop token."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    with per_row_adapters(model, names), autocast():
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, eos_token_id=stop_ids,
                             pad_token_id=pad_id, streamer=streamer)
    stops = set(stop_ids)
    return [next((row[:k] for k, t in enumerate(row) if t in stops), row) for row in out[:, width:].tolist()]


def stop_token_ids(model, tokenizer) -> list[int]:
    """End of an answer: the model's eos (generation config) and every special token — none is ever content."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = eos if isinstance(eos, list) else [eos]
    special = [t for t in tokenizer.all_special_ids if t not in (tokenizer.bos_token_id, tokenizer.unk_token_id)]
    return sorted({t for t in [*eos, tokenizer.eos_token_id, *special] if t is not None})


def time_generation(model, prompts: list[list[int]], name: str | None, repeats: int, **kw) -> dict[str, float]:
    """Median over `repeats` runs of this model alone on `prompts`, each forced to max_new_tokens tokens."""
    runs = []
    for _ in range(repeats):
        clock = _Clock()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate_ids(model, prompts, [name] * len(prompts), streamer=clock, min_new_tokens=kw["max_new_tokens"], **kw)
        steps = clock.times[1:]  # the first put is the prompt
        runs.append({
            "ttft_ms": 1000 * (steps[0] - start),
            "ms_per_token": 1000 * (steps[-1] - steps[0]) / max(len(steps) - 1, 1),
            "tokens_per_s": len(prompts) * len(steps) / (steps[-1] - start),
        })
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(bytes, what was measured): CUDA's allocator high-water mark since its last reset, else the process's RSS."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), "cuda max allocated"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale), "process peak RSS"


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class EvalConfig:
    """What `qlora-kit eval` runs; the CLI fills it from its flags."""

    model_dir: Path
    data: Path
    adapters: dict[str, Path] = field(default_factory=dict)
    format: str = "auto"
    max_new_tokens: int = 64
    metrics: tuple[str, ...] = scoring.METRICS
    scorer: str | None = None
    batch_size: int = 8
    bootstrap: int = 1000
    seed: int = 0
    latency_rows: int = 4
    latency_repeats: int = 3
    device: str | None = None

    def __post_init__(self) -> None:
        if BASE in self.adapters:
            raise ConfigError(f"--adapter {BASE}=...: {BASE!r} names the bare base model; call the adapter otherwise")
        unknown = [m for m in self.metrics if m not in scoring.METRICS]
        if unknown:
            raise ConfigError(f"--metric {unknown[0]!r}: expected one of {', '.join(scoring.METRICS)}")
        if self.format not in ("auto", *FORMATS):
            raise ConfigError(f"--format {self.format!r}: expected auto, {', '.join(FORMATS)}")
        for name, value in (("--batch-size", self.batch_size), ("--bootstrap", self.bootstrap),
                            ("--latency-repeats", self.latency_repeats)):
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if self.max_new_tokens < 0 or self.latency_rows < 0:
            raise ConfigError("--max-new-tokens and --latency-rows must not be negative")
        if self.device:
            try:
                kind = torch.device(self.device).type
            except RuntimeError:
                raise ConfigError(f"--device {self.device!r}: not a device name (cpu, cuda, cuda:1, ...)") from None
            if kind == "cuda" and not torch.cuda.is_available():
                raise ConfigError(f"--device {self.device}: no CUDA device is available; leave --device out")


def run_eval(cfg: EvalConfig, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Load once, run every pass, return the report (see `write_report`)."""
    for path in cfg.adapters.values():
        read_adapter_config(path)  # a wrong adapter path, a bad scorer or bad rows fail before the base loads
    scorer = scoring.load_scorer(cfg.scorer) if cfg.scorer else None
    fmt = detect_format(cfg.data) if cfg.format == "auto" else cfg.format
    rows = read_rows(cfg.data, fmt, load_tokenizer(cfg.model_dir))
    model, tokenizer = load_model(cfg.model_dir, cfg.adapters, device=cfg.device)
    pad_id = ensure_pad_token(tokenizer)
    names = [BASE, *cfg.adapters]
    runs = [ModelRun(n, cfg.adapters.get(n)) for n in names]
    dtype = next((m.compute_dtype for m in model.modules() if isinstance(m, QLinear)), torch.float32)
    autocast = lambda: torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731

    progress(f"loss: {len(rows)} rows x {len(names)} models")
    sums, counts = loss_pass(model, rows, names, cfg.batch_size, pad_id, autocast)
    for m, run in enumerate(runs):
        run.loss_sum, run.tokens = sums[m], counts[m]
        if run.adapter_dir is not None:
            run.size_bytes = sum(p.stat().st_size for p in run.adapter_dir.iterdir() if p.is_file())
            run.trainable_params = sum(layer.lora_A[run.name].weight.numel() + layer.lora_B[run.name].weight.numel()
                                       for layer in adapted_modules(model, run.name).values())

    gen_rows = [r for r in rows if r.prompt_ids is not None] if cfg.max_new_tokens > 0 else []
    kw = dict(max_new_tokens=cfg.max_new_tokens, pad_id=pad_id, stop_ids=stop_token_ids(model, tokenizer),
              autocast=autocast)
    mem_kind = None
    if gen_rows:
        progress(f"generation: {len(gen_rows)} rows x {len(names)} models, up to {cfg.max_new_tokens} tokens")
        _score(model, tokenizer, gen_rows, runs, cfg, scorer, kw)
        prompts = [r.prompt_ids for r in gen_rows[: cfg.latency_rows]]
        if prompts:
            progress(f"latency: {len(prompts)} prompts, each model alone, median of {cfg.latency_repeats}")
            mem_kind = _latency(model, runs, prompts, cfg.latency_repeats, kw)
    return build_report(cfg, fmt, rows, gen_rows, runs, model.device, mem_kind)


def _latency(model, runs: list[ModelRun], prompts: list[list[int]], repeats: int, kw: dict) -> str:
    """Each model's speed and peak memory on the same prompts, after one warm-up (first-call costs excluded)."""
    generate_ids(model, prompts, [None] * len(prompts), **{**kw, "max_new_tokens": 2})
    for run in runs:
        if model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(model.device)
        run.speed = time_generation(model, prompts, _route([run.name])[0], repeats, **kw)
        run.speed["peak_mem_bytes"], kind = peak_memory(model.device)
    return kind


def _score(model, tokenizer, gen_rows, runs, cfg, scorer, kw) -> None:
    names = [r.name for r in runs]
    for start in range(0, len(gen_rows), cfg.batch_size):
        chunk = gen_rows[start : start + cfg.batch_size]
        outs = generate_ids(model, [r.prompt_ids for r in chunk for _ in names],
                            _route([n for _ in chunk for n in names]), **kw)
        for k, ids in enumerate(outs):
            run = runs[k % len(names)]
            run.predictions.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
            run.generated.append(len(ids))
    for run in runs:
        pairs = list(zip(run.predictions, gen_rows))
        for metric in cfg.metrics:
            run.scores[metric] = np.array([scoring.BUILTIN[metric](p, r.reference) for p, r in pairs])
        if scorer:
            run.scores[scorer[0]] = np.array([scorer[1](p, r.reference, r.row) for p, r in pairs])


# ------------------------------------------------------------------------------------------------ report


def build_report(cfg, fmt, rows, gen_rows, runs, device, mem_kind) -> dict[str, Any]:
    """Every model's metrics with their bootstrap intervals, and every pairwise difference with its own."""
    loss_idx = scoring.resample_indices(len(rows), cfg.bootstrap, cfg.seed)
    gen_idx = scoring.resample_indices(len(gen_rows), cfg.bootstrap, cfg.seed + 1) if gen_rows else None
    samples: dict[str, dict[str, np.ndarray]] = {}
    models = {}
    for run in runs:
        s = {"loss": scoring.ratio_stat(run.loss_sum, run.tokens, loss_idx)}
        s |= {m: scoring.mean_stat(v, gen_idx) for m, v in run.scores.items()}
        samples[run.name] = s
        loss = float(run.loss_sum.sum() / run.tokens.sum())
        entry: dict[str, Any] = {"adapter": str(run.adapter_dir) if run.adapter_dir else None,
                                 "loss": loss, "loss_ci": scoring.interval(s["loss"]), "ppl": math.exp(loss),
                                 "response_tokens": int(run.tokens.sum())}
        for m, v in run.scores.items():
            entry[m], entry[f"{m}_ci"] = float(v.mean()), scoring.interval(s[m])
        if run.generated:
            entry["mean_generated_tokens"] = float(np.mean(run.generated))
        entry |= run.speed
        entry |= {"size_bytes": run.size_bytes, "trainable_params": run.trainable_params}
        models[run.name] = entry
    comparisons = []
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            for metric in samples[a.name]:
                diff = models[b.name][metric] - models[a.name][metric]
                low, high = scoring.interval(samples[b.name][metric] - samples[a.name][metric])
                comparisons.append({"a": a.name, "b": b.name, "metric": metric, "diff": diff, "ci": [low, high],
                                    "significant": low > 0 or high < 0})
    return {
        "model_dir": str(cfg.model_dir), "data": str(cfg.data), "format": fmt, "rows": len(rows),
        "reference_rows": len(gen_rows), "max_new_tokens": cfg.max_new_tokens, "device": str(device),
        "metrics": [m for m in samples[BASE] if m != "loss"], "peak_memory": mem_kind,
        "latency": {"prompts": min(cfg.latency_rows, len(gen_rows)), "repeats": cfg.latency_repeats,
                    "forced_tokens": cfg.max_new_tokens} if mem_kind else None,
        "bootstrap": {"rounds": cfg.bootstrap, "seed": cfg.seed, "confidence": scoring.CONFIDENCE, "paired": True},
        "models": models, "comparisons": comparisons,
        "_predictions": _predictions(rows, gen_rows, runs),
    }


def _predictions(rows, gen_rows, runs) -> list[dict[str, Any]]:
    at = {id(r): k for k, r in enumerate(gen_rows)}
    out = []
    for i, row in enumerate(rows):
        for run in runs:
            rec = {"row": i, "model": run.name, "loss": run.loss_sum[i] / max(run.tokens[i], 1),
                   "response_tokens": int(run.tokens[i])}
            k = at.get(id(row))
            if k is not None:
                rec |= {"reference": row.reference, "prediction": run.predictions[k],
                        "generated_tokens": run.generated[k]} | {m: float(v[k]) for m, v in run.scores.items()}
            out.append(rec)
    return out


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    power = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024 ** power:.1f} {('KiB', 'MiB', 'GiB')[power - 1]}"


def tables(report: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """(headers, rows) of the models table and of the differences table."""
    metrics = report["metrics"]
    head = ["model", "loss", "ppl", *metrics, "ms/token", "TTFT ms", "tokens/s", "peak mem", "adapter size", "params"]
    body = []
    for name, m in report["models"].items():
        body.append([name, _fmt(m["loss"]), _fmt(m["ppl"], 2), *[_fmt(m.get(k)) for k in metrics],
                     _fmt(m.get("ms_per_token"), 1), _fmt(m.get("ttft_ms"), 1), _fmt(m.get("tokens_per_s"), 1),
                     _bytes(m["peak_mem_bytes"]) if "peak_mem_bytes" in m else "-",
                     _bytes(m["size_bytes"]) if m["adapter"] else "-", f"{m['trainable_params']:,}"])
    diff_head = ["b - a", *["loss", *metrics]]
    diff_body = []
    pairs = dict.fromkeys((c["a"], c["b"]) for c in report["comparisons"])
    for a, b in pairs:
        cells = []
        for metric in ["loss", *metrics]:
            c = next(c for c in report["comparisons"] if (c["a"], c["b"], c["metric"]) == (a, b, metric))
            cells.append(f"{c['diff']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]{'*' if c['significant'] else ''}")
        diff_body.append([f"{b} - {a}", *cells])
    return head, body, diff_head, diff_body


def _caption(report: dict[str, Any]) -> str:
    b = report["bootstrap"]
    lat = report["latency"]
    speed = (f"latency: each model alone on {lat['prompts']} prompts, {lat['forced_tokens']} tokens forced, median "
             f"of {lat['repeats']}; peak memory: {report['peak_memory']}" if lat else "no generation")
    return (f"{report['rows']} rows of {report['data']} ({report['format']}), {report['reference_rows']} with a "
            f"reference answer; loss = mean response-token cross-entropy (nats); {speed}; device {report['device']}. "
            f"Differences: {int(100 * b['confidence'])}% paired bootstrap, {b['rounds']} rounds, seed {b['seed']}; "
            "* = the interval excludes 0.")


def render_text(report: dict[str, Any]) -> str:
    head, body, dhead, dbody = tables(report)
    parts = [text_table(head, body)]
    if dbody:
        parts.append(text_table(dhead, dbody))
    return "\n\n".join(parts) + "\n" + _caption(report)


def render_markdown(report: dict[str, Any]) -> str:
    head, body, dhead, dbody = tables(report)
    parts = ["# Evaluation", _caption(report), markdown_table(head, body)]
    if dbody:
        parts += ["## Differences (b − a), with 95% paired bootstrap intervals", markdown_table(dhead, dbody)]
    return "\n\n".join(parts) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """One panel per quality metric, a bar per model with its bootstrap interval: who wins shows at a glance."""
    plt = pyplot()
    panels = ["loss", *report["metrics"]]
    names = list(report["models"])
    colors = ["#9a9a9a"] + [plt.get_cmap("tab10")(i % 10) for i in range(len(names) - 1)]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 + 2.3 * len(panels), 3.4), dpi=120, squeeze=False)
    for ax, metric in zip(axes[0], panels):
        values = [report["models"][n][metric] for n in names]
        cis = [report["models"][n][f"{metric}_ci"] for n in names]
        err = np.array([[v - lo for v, (lo, _) in zip(values, cis)], [hi - v for v, (_, hi) in zip(values, cis)]])
        ax.bar(range(len(names)), values, color=colors, yerr=np.clip(err, 0, None), capsize=3)
        for x, v in enumerate(values):
            ax.annotate(f"{v:.2f}", (x, v), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                        textcoords="offset points")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{metric} ({'lower' if metric == 'loss' else 'higher'} is better)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if metric != "loss":
            ax.set_ylim(0, max(1.0, *values) * 1.08)
    fig.suptitle(f"{report['rows']} held-out rows, {int(100 * report['bootstrap']['confidence'])}% bootstrap "
                 "intervals", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> Path:
    """eval.json, eval.md, eval.png and predictions.jsonl, all or nothing (an atomic directory)."""
    predictions = report["_predictions"]
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    with AtomicDir(out, overwrite=True) as tmp:
        (tmp / "eval.json").write_text(json.dumps(public, indent=2) + "\n")
        (tmp / "eval.md").write_text(render_markdown(public))
        (tmp / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
        plot(public, tmp / "eval.png")
    return out

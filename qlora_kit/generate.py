"""Generation from a 4-bit base with any number of named adapters, all requests in one batched pass.

Each request names its adapter; the batch runs under `per_row_adapters`, so a base serving several tasks or
customers decodes them together instead of switching adapters between requests. Prompts are rendered the way
the adapter was trained: chat template for messages (or any prompt when the tokenizer has one), the Alpaca
template for instruction/input rows, raw text otherwise.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from transformers import TextStreamer

from qlora_kit.adapters import load_adapter, per_row_adapters
from qlora_kit.data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, ensure_pad_token
from qlora_kit.device import load_tokenizer, resolve_device
from qlora_kit.errors import DataError
from qlora_kit.loader import load_quantized


@dataclass(frozen=True)
class Request:
    """One prompt, already rendered to text, and the adapter (None: the bare base) that answers it."""

    prompt: str
    adapter: str | None
    chat: bool


def render(tokenizer, row: dict) -> tuple[str, bool]:
    """Text for one JSONL row or --prompt: (prompt, rendered_with_chat_template)."""
    if "messages" in row:
        messages = row["messages"]
    elif "instruction" in row:
        template = ALPACA_PROMPT if row.get("input") else ALPACA_PROMPT_NO_INPUT
        return template.format(instruction=row["instruction"], input=row.get("input", "")), False
    elif "prompt" in row:
        if not tokenizer.chat_template:
            return str(row["prompt"]), False
        messages = [{"role": "user", "content": str(row["prompt"])}]
    else:
        raise DataError("each row needs 'prompt', 'instruction' (alpaca) or 'messages'")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True


def read_prompt_file(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object")
        if not {"prompt", "instruction", "messages"} & row.keys():
            raise DataError(f"{path}:{n}: each row needs 'prompt', 'instruction' (alpaca) or 'messages'")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no prompts")
    return rows


def load_model(model_dir: str | Path, adapters: dict[str, Path], device: str | None = None,
               dtype: torch.dtype = torch.bfloat16):
    """The 4-bit base with every named adapter loaded onto it (each one small; the base is loaded once)."""
    model = load_quantized(model_dir, device=resolve_device(device), dtype=dtype)
    for name, adapter_dir in adapters.items():
        load_adapter(model, adapter_dir, name)
    return model.eval(), load_tokenizer(model_dir)


@torch.no_grad()
def generate(
    model, tokenizer, requests: list[Request], *, max_new_tokens: int = 128, temperature: float = 0.0,
    top_p: float = 1.0, stream: TextIO | None = None,
) -> list[str]:
    """Completions for all requests in one batch (left-padded); streamed token by token when there is one."""
    pad_id = ensure_pad_token(tokenizer)
    tokenizer.padding_side = "left"
    # A chat template already wrote the BOS; plain and Alpaca prompts need the tokenizer's. Rows may mix both.
    ids = [tokenizer(r.prompt, add_special_tokens=not r.chat)["input_ids"] for r in requests]
    enc = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream and len(requests) == 1 else None
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    with per_row_adapters(model, [r.adapter for r in requests]):
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad_id, streamer=streamer,
                             **sampling)
    new = out[:, enc["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new]


def run(model_dir: str, adapters: dict[str, Path], rows: list[dict], *, stream: TextIO | None = None,
        **kwargs) -> list[str]:
    """The CLI's job: every prompt with every adapter (or the bare base when none), one batched pass."""
    stream = stream or sys.stdout  # looked up now, not at import: whoever redirected stdout since gets the text
    model, tokenizer = load_model(model_dir, adapters)
    rendered = [render(tokenizer, row) for row in rows]
    names: list[str | None] = list(adapters) or [None]
    requests = [Request(text, name, chat) for text, chat in rendered for name in names]
    texts = generate(model, tokenizer, requests, stream=stream, **kwargs)
    if len(requests) > 1:
        for i, (req, text) in enumerate(zip(requests, texts)):
            label = f"[{i // len(names) + 1}{'/' + req.adapter if req.adapter else ''}]"
            stream.write(f"{label} {text.strip()}\n")
    stream.flush()
    return texts

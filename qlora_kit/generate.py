"""Generation from a 4-bit base with any number of named adapters, all requests in one batched pass.

Each request names its adapter; the batch runs under `per_row_adapters`, so a base serving several tasks or
customers decodes them together instead of switching adapters between requests. Prompts are rendered by
`data.render_prompt`, the renderer training used, with the chat template each adapter was trained with
(`adapters.read_chat_template`): chat template for messages (or any prompt when there is a template), the
Alpaca template for instruction/input rows, raw text otherwise. Prompt files are read by `data.read_jsonl`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from transformers import AutoModelForCausalLM, TextStreamer

from qlora_kit.adapters import load_adapter, per_row_adapters, read_chat_template
from qlora_kit.data import Prompt, ensure_pad_token, read_jsonl, render_prompt
from qlora_kit.device import load_tokenizer, resolve_device
from qlora_kit.errors import CheckpointError, DataError
from qlora_kit.loader import load_quantized, model_class, read_config

render = render_prompt
"""The old name of `data.render_prompt` (`prompt, chat = render(tokenizer, row)` still reads the same)."""


@dataclass(frozen=True)
class Request:
    """One prompt, already rendered to text, and the adapter (None: the bare base) that answers it."""

    prompt: str
    adapter: str | None
    chat: bool


def read_prompt_file(path: Path) -> list[dict]:
    """The rows of a JSONL prompt file, each checked to be one `render_prompt` can render."""
    rows = []
    for where, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with fields, got {type(row).__name__}")
        if not {"prompt", "instruction", "messages", "conversations"} & row.keys():
            raise DataError(f"{where}: each row needs 'prompt', 'instruction' (alpaca) or 'messages'")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no prompts")
    return rows


def load_model(model_dir: str | Path, adapters: dict[str, Path], device: str | None = None,
               dtype: torch.dtype = torch.bfloat16):
    """The 4-bit base with every named adapter loaded onto it (each one small; the base is loaded once)."""
    _check_lm_head(Path(model_dir))
    model = load_quantized(model_dir, device=resolve_device(device), dtype=dtype)
    for name, adapter_dir in adapters.items():
        load_adapter(model, adapter_dir, name)
    return model.eval(), load_tokenizer(model_dir)


def _check_lm_head(model_dir: Path) -> None:
    """Refuse, before any weight is read, a checkpoint the loader builds without an LM head (its config names no
    causal-LM architecture): there is nothing to generate with."""
    config = read_config(model_dir)
    if model_class(config) is not AutoModelForCausalLM:
        archs = ", ".join(config.architectures or []) or "none"
        raise CheckpointError(
            f"{model_dir / 'config.json'}: names no causal-LM architecture (architectures: {archs}), so the model "
            "loads without an LM head and cannot generate; use a *ForCausalLM checkpoint, or add its class "
            '(e.g. "architectures": ["LlamaForCausalLM"]) to config.json if the weights hold the head'
        )


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
    templates = {name: read_chat_template(adapter_dir) for name, adapter_dir in adapters.items()}
    names: list[str | None] = list(adapters) or [None]
    requests = []
    for i, row in enumerate(rows, 1):
        for name in names:  # each adapter's prompt in the template it was trained with
            prompt: Prompt = render_prompt(tokenizer, row, templates.get(name), where=f"prompt {i}")
            requests.append(Request(prompt.text, name, prompt.chat))
    texts = generate(model, tokenizer, requests, stream=stream, **kwargs)
    if len(requests) > 1:
        for i, (req, text) in enumerate(zip(requests, texts)):
            label = f"[{i // len(names) + 1}{'/' + req.adapter if req.adapter else ''}]"
            stream.write(f"{label} {text.strip()}\n")
    stream.flush()
    return texts

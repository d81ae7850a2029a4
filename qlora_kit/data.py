"""Datasets in, tokenized examples out: reading and validating rows, the three formats, label masks, truncation;
and the one prompt renderer that training, evaluation, generation and serving share.

Rows are validated and normalized before anything is tokenized, so a bad row fails with its file, line and
field (`read_jsonl` is the one JSON Lines reader, for training data and prompt files alike). Prompts are
rendered in one place: `alpaca_prompt` and `render_chat` build what `encode_row` trains on, and `render_prompt`
builds the same text for a request at inference, with the chat template training used (`chat_template`: the
one saved with the adapter, else the tokenizer's, else `FALLBACK_CHAT_TEMPLATE`). Labels follow the HF convention (aligned with input_ids, shifted inside the model; -100 is ignored).
Masks are found by tokenizing rendered prefixes, never by searching strings: the prompt, each user and system
turn is -100 and every response is trained, whatever the chat template looks like. Batching and packing the
examples is `batching.py`'s job.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import jinja2

from qlora_kit.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset

    from qlora_kit.config import DatasetConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# Zephyr-style, for tokenizers without a chat template: "<|user|>\nHi</s><|assistant|>\nHello</s>". The eos after
# each turn is what teaches a base model to stop after its answer.
FALLBACK_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_CHUNK = 10_000  # rows per Arrow chunk: raw Python dicts never pile up beyond this


@dataclass
class Example:
    """One tokenized example; `labels[t]` is -100 where position t is not trained."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizedDataset:
    """Examples ready to batch, with what tokenizing them cost: how many were truncated or dropped."""

    examples: list[Example]
    source: str
    truncated: int = 0
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        return [len(e) for e in self.examples]


# ---------------------------------------------------------------------------------------------- reading rows


def load_rows(path: str, fmt: str, split: str = "train", text_field: str = "text") -> Dataset:
    """Validated rows normalized to one schema per format: alpaca {instruction, input, output}, text {text},
    messages {messages: [{role, content}]} (ShareGPT's from/value mapped to OpenAI's role/content)."""
    from datasets import Dataset, concatenate_datasets  # here, not at the top: see _raw_rows

    rows = (_normalize(row, fmt, text_field, where) for where, row in _raw_rows(path, split))
    chunks, chunk = [], []
    for row in rows:
        chunk.append(row)
        if len(chunk) == _CHUNK:
            chunks.append(Dataset.from_list(chunk))
            chunk = []
    if chunk:
        chunks.append(Dataset.from_list(chunk))
    if not chunks:
        raise DataError(f"{path}: the dataset is empty")
    return chunks[0] if len(chunks) == 1 else concatenate_datasets(chunks)


def _raw_rows(path: str, split: str) -> Iterator[tuple[str, Any]]:
    """(where, row) pairs, `where` naming the file and 1-based line or row for error messages.

    `datasets` is imported by the functions that read rows, not by this module: serving and generation only render
    prompts, and importing it (pyarrow, pandas) added 80 MB to the server's resident memory."""
    from datasets import load_dataset

    local = Path(path)
    if local.is_file() and split != "train":
        raise DataError(f"{path} is a single file, which has only the 'train' split (asked for {split!r})")
    if local.is_file() and local.suffix in (".json", ".jsonl"):
        yield from read_jsonl(local)
        return
    if local.is_file():
        builder = {".parquet": "parquet", ".csv": "csv"}.get(local.suffix)
        if builder is None:
            raise DataError(f"{path}: unsupported file type {local.suffix!r} (use .jsonl, .json, .parquet or .csv)")
        dataset = load_dataset(builder, data_files=str(local), split="train")
    elif local.is_dir():
        dataset = load_dataset(str(local), split=split)
    elif local.is_absolute() or local.suffix or path.startswith("."):
        raise DataError(f"dataset file not found: {path}")
    else:
        dataset = _load_hub(path, split)
    yield from ((f"{path}, row {i}", row) for i, row in enumerate(dataset, 1))


def _load_hub(name: str, split: str) -> Dataset:
    from datasets import load_dataset

    try:
        return load_dataset(name, split=split)
    except Exception as e:  # the Hub fails in many ways (offline, 404, gated, no such split); all mean the same here
        raise DataError(
            f"dataset {name!r} is not a local path and could not be loaded from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'}); "
            "download it and point dataset.path at the local files"
        ) from e


def read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row) of each row of a JSON Lines file, parsed line by line (a .json holding an array is read whole),
    `where` being "FILE, line N" for error messages: datasets' own errors name no line. Blank lines are skipped."""
    try:
        f = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    with f:
        first = f.read(1)
        while first.isspace():
            first = f.read(1)
        f.seek(0)
        if first == "[" and path.suffix == ".json":
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {e.lineno}: malformed JSON ({e.msg})") from None
            yield from ((f"{path}, row {i}", row) for i, row in enumerate(rows, 1))
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
            yield f"{path}, line {lineno}", row


def _object(row: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected an object with fields, got {type(row).__name__}")
    return row


def _normalize(row: Any, fmt: str, text_field: str, where: str) -> dict[str, Any]:
    row = _object(row, where)
    if fmt == "alpaca":
        return {
            "instruction": _string(row, "instruction", where),
            "input": _string(row, "input", where, optional=True),
            "output": _string(row, "output", where),
        }
    if fmt == "text":
        return {"text": _string(row, text_field, where)}
    if fmt == "messages":
        return {"messages": _messages(row, where)}
    raise DataError(f"unknown dataset format {fmt!r}")


def _string(row: Mapping[str, Any], key: str, where: str, optional: bool = False, label: str = "") -> str:
    value, label = row.get(key), label or key
    if value is None and optional:
        return ""
    if value is None:
        raise DataError(f"{where}: missing field {label!r}")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {label!r} must be a string, got {type(value).__name__}")
    return value


def _messages(row: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    if "messages" in row:
        key, role_key, text_key, roles = "messages", "role", "content", OPENAI_ROLES
    elif "conversations" in row:
        key, role_key, text_key, roles = "conversations", "from", "value", SHAREGPT_ROLES
    else:
        raise DataError(f"{where}: missing field 'messages' (OpenAI style) or 'conversations' (ShareGPT style)")
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise DataError(f"{where}: field '{key}[{i}]' must be an object, got {type(turn).__name__}")
        role = _string(turn, role_key, where, label=f"{key}[{i}].{role_key}")
        if role not in roles:
            raise DataError(f"{where}: field '{key}[{i}].{role_key}' is {role!r}; expected one of {', '.join(roles)}")
        out.append({"role": roles[role], "content": _string(turn, text_key, where, label=f"{key}[{i}].{text_key}")})
    return out


# ------------------------------------------------------------------------------------- rendering and masks


def ensure_pad_token(tokenizer: Any) -> int:
    """The pad id, borrowing eos when there is none: padding is masked out of attention and loss, so any id works."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        where = getattr(tokenizer, "name_or_path", "") or "tokenizer"
        raise DataError(f"{where}: the tokenizer has neither a pad nor an eos token; set a pad_token in its config")
    log.info("tokenizer has no pad token; padding with eos %r", tokenizer.eos_token)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token_id


class Prompt(NamedTuple):
    """A prompt rendered for generation, and whether a chat template wrote it: a template writes the BOS and
    other special tokens itself, so the tokenizer must not add its own."""

    text: str
    chat: bool


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt, up to and including "### Response:\n"; the response follows it directly."""
    return (ALPACA_PROMPT if input else ALPACA_PROMPT_NO_INPUT).format(instruction=instruction, input=input)


def chat_template(tokenizer: Any, saved: str | None = None) -> str | None:
    """The template conversations are rendered with: `saved` (the one an adapter was trained with), else the
    tokenizer's own, else `FALLBACK_CHAT_TEMPLATE`. None only for a tokenizer holding several named templates,
    which then picks its default itself."""
    if saved:
        return saved
    own = tokenizer.chat_template
    if isinstance(own, Mapping):
        return None
    return own or FALLBACK_CHAT_TEMPLATE


def render_chat(tokenizer: Any, messages: list[dict[str, str]], generation: bool, template: str | None = None) -> str:
    """A conversation as text, with `chat_template(tokenizer, template)`; `generation` appends the assistant's
    opening, as both the untrained prefix of a response and a prompt at inference need."""
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template(tokenizer, template), tokenize=False,
            add_generation_prompt=generation,
        )
    except jinja2.TemplateError as e:
        raise DataError(f"the chat template rejected a conversation ({e}): {messages[:2]!r}...") from None


def render_prompt(tokenizer: Any, row: Mapping[str, Any], template: str | None = None,
                  where: str = "prompt") -> Prompt:
    """A request rendered exactly as training rendered its prompts: `messages` (or ShareGPT `conversations`) and,
    when there is a chat template (`template`, an adapter's, or the tokenizer's), a bare `prompt` as one user
    turn, through the chat template with the assistant's opening; `instruction` (+ `input`) as Alpaca; a bare
    `prompt` without any template as it is."""
    row = _object(row, where)
    if "messages" in row or "conversations" in row:
        return Prompt(render_chat(tokenizer, _messages(row, where), True, template), True)
    if "instruction" in row:
        return Prompt(alpaca_prompt(_string(row, "instruction", where), _string(row, "input", where, True)), False)
    if "prompt" not in row:
        raise DataError(f"{where}: each row needs 'prompt', 'instruction' (alpaca) or 'messages'")
    text = _string(row, "prompt", where)
    if not (template or tokenizer.chat_template):
        return Prompt(text, False)
    return Prompt(render_chat(tokenizer, [{"role": "user", "content": text}], True, template), True)


def encode_row(row: Mapping[str, Any], fmt: str, tokenizer: Any, train_on_prompt: bool = False,
               template: str | None = None) -> Example:
    """One normalized row (see `load_rows`) as ids and labels, untruncated; conversations are rendered with
    `chat_template(tokenizer, template)`."""
    if fmt == "messages":
        renders = _chat_renders(tokenizer, row["messages"], train_on_prompt, template)
        return _encode(tokenizer, renders, special=False)
    if fmt == "alpaca":
        prompt = alpaca_prompt(row["instruction"], row["input"])
        renders = [(prompt, train_on_prompt), (prompt + row["output"], True)]
    else:
        renders = [(row["text"], True)]
    example = _encode(tokenizer, renders, special=True)
    eos = tokenizer.eos_token_id
    if eos is not None and example.input_ids[-1:] != [eos]:  # the eos is trained: it is how the model learns to stop
        example.input_ids.append(eos)
        example.labels.append(eos)
    return example


def _chat_renders(tokenizer: Any, messages: list[dict[str, str]], train_on_prompt: bool,
                  template: str | None) -> list[tuple[str, bool]]:
    """Cumulative renders: before each assistant turn (with the generation prompt) untrained, through it trained."""
    renders = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            before = render_chat(tokenizer, messages[:i], True, template) if i else ""  # templates may reject []
            renders.append((before, train_on_prompt))
            renders.append((render_chat(tokenizer, messages[: i + 1], False, template), True))
    renders.append((render_chat(tokenizer, messages, False, template), train_on_prompt))
    return renders


def _encode(tokenizer: Any, renders: list[tuple[str, bool]], special: bool) -> Example:
    """Ids of the last render; the tokens each render adds to the one before are trained when it is flagged.

    Each boundary is the longest common prefix of the render's tokens and the full sequence's, so a BPE merge
    across a boundary moves it by a token instead of misaligning the rest of the mask.
    """
    cache: dict[str, list[int]] = {}

    def ids_of(text: str) -> list[int]:
        if text not in cache:
            cache[text] = tokenizer(text, add_special_tokens=special)["input_ids"]
        return cache[text]

    ids = ids_of(renders[-1][0])
    labels = [IGNORE_INDEX] * len(ids)
    start = 0
    for text, trainable in renders:
        prefix = ids_of(text)
        end = next((k for k, (a, b) in enumerate(zip(prefix, ids)) if a != b), min(len(prefix), len(ids)))
        if trainable:
            labels[start:end] = ids[start:end]
        start = max(start, end)
    return Example(list(ids), labels)


def tokenize_rows(
    rows: Iterable[Mapping[str, Any]],
    fmt: str,
    tokenizer: Any,
    max_seq_len: int,
    train_on_prompt: bool = False,
    source: str = "dataset",
) -> TokenizedDataset:
    """Encode, truncate to max_seq_len and drop examples left with nothing to learn; both are counted and logged."""
    out = TokenizedDataset([], source)
    for row in rows:
        example = encode_row(row, fmt, tokenizer, train_on_prompt)
        if len(example) > max_seq_len:
            example = Example(example.input_ids[:max_seq_len], example.labels[:max_seq_len])
            out.truncated += 1
        # labels[0] is never predicted (the model shifts labels left), so it does not count as trainable
        if all(label == IGNORE_INDEX for label in example.labels[1:]):
            out.dropped += 1
            continue
        out.examples.append(example)
    log.info(
        "%s: %d examples, %d truncated to %d tokens, %d dropped with no trainable tokens",
        source, len(out), out.truncated, max_seq_len, out.dropped,
    )
    if not out.examples:
        raise DataError(f"{source}: no example has a trainable token left (check the format and max_seq_len)")
    return out


def build_datasets(
    config: DatasetConfig, tokenizer: Any, max_seq_len: int, seed: int
) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """The training set and the evaluation set (from eval_path, eval_split or a seeded hold-out), or None."""
    rows = load_rows(config.path, config.format, config.split, config.text_field)
    eval_rows, eval_source = None, config.eval_path or config.path
    if config.eval_path:
        eval_rows = load_rows(config.eval_path, config.format, config.eval_split or config.split, config.text_field)
    elif config.eval_split:
        eval_rows = load_rows(config.path, config.format, config.eval_split, config.text_field)
    elif config.eval_fraction > 0:
        n_eval = max(1, round(config.eval_fraction * len(rows)))
        if n_eval >= len(rows):
            raise DataError(
                f"{config.path}: {len(rows)} rows are too few to hold out {config.eval_fraction:.0%} for evaluation"
            )
        parts = rows.train_test_split(test_size=n_eval, seed=seed)
        rows, eval_rows, eval_source = parts["train"], parts["test"], f"{config.path} (held out)"

    def tokenize(part: Dataset, source: str) -> TokenizedDataset:
        return tokenize_rows(part, config.format, tokenizer, max_seq_len, config.train_on_prompt, source)

    return tokenize(rows, config.path), (tokenize(eval_rows, eval_source) if eval_rows is not None else None)

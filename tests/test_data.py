"""Data: formats and their label masks, row validation errors, truncation, padding, packing, resumable order."""

from __future__ import annotations

import itertools
import json
import logging

import datasets
import pytest
import torch
from conftest import make_model, make_tokenizer

from qlora_kit.batching import (
    BatchIterator, collate, collate_packed, eval_batches, pack, packed_attention_mask, packing_efficiency,
)
from qlora_kit.config import DatasetConfig
from qlora_kit.data import (
    ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, FALLBACK_CHAT_TEMPLATE, IGNORE_INDEX, Example, Prompt, TokenizedDataset,
    build_datasets, chat_template, encode_row, ensure_pad_token, load_rows, read_jsonl, render_prompt, tokenize_rows,
)
from qlora_kit.errors import DataError

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello there"},
    {"role": "user", "content": "and now?"},
    {"role": "assistant", "content": "the end"},
]
SHAREGPT = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
            for m in CHAT]


def trained_text(tok, example: Example) -> str:
    return tok.decode([t for t in example.labels if t != IGNORE_INDEX])


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("extra, template", [({"input": "a cat"}, ALPACA_PROMPT), ({}, ALPACA_PROMPT_NO_INPUT),
                                             ({"input": ""}, ALPACA_PROMPT_NO_INPUT)])
def test_alpaca_renders_stanford_prompt_and_trains_only_the_response(tiny_tokenizer, tmp_path, extra, template):
    row = load_rows(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Name it.", "output": "a noun", **extra}]),
                    "alpaca")[0]
    ex = encode_row(row, "alpaca", tiny_tokenizer)
    prompt = template.format(instruction="Name it.", input="a cat")
    assert tiny_tokenizer.decode(ex.input_ids) == "<s>" + prompt + "a noun</s>"
    assert trained_text(tiny_tokenizer, ex) == "a noun</s>"


def test_stanford_alpaca_templates_verbatim():
    assert ALPACA_PROMPT.startswith("Below is an instruction that describes a task, paired with an input that provides "
                                    "further context. Write a response that appropriately completes the request.\n\n")
    assert ALPACA_PROMPT_NO_INPUT == ("Below is an instruction that describes a task. Write a response that "
                                      "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                                      "### Response:\n")


def test_train_on_prompt_trains_everything(tiny_tokenizer):
    ex = encode_row({"instruction": "x", "input": "", "output": "y"}, "alpaca", tiny_tokenizer, train_on_prompt=True)
    assert ex.labels == ex.input_ids
    ex = encode_row({"messages": CHAT}, "messages", tiny_tokenizer, train_on_prompt=True)
    assert ex.labels == ex.input_ids


def test_messages_train_every_assistant_turn_and_nothing_else(tiny_tokenizer):
    ex = encode_row({"messages": CHAT}, "messages", tiny_tokenizer)
    assert tiny_tokenizer.decode(ex.input_ids) == tiny_tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert trained_text(tiny_tokenizer, ex) == "hello there<|im_end|>\nthe end<|im_end|>\n"
    # the trained tokens are exactly the two assistant spans, contiguous
    spans = [list(g) for k, g in itertools.groupby(range(len(ex)), lambda i: ex.labels[i] != IGNORE_INDEX) if k]
    assert [tiny_tokenizer.decode([ex.input_ids[i] for i in s]) for s in spans] == [
        "hello there<|im_end|>\n", "the end<|im_end|>\n"]


def test_sharegpt_is_normalized_to_openai(tiny_tokenizer, tmp_path):
    rows = load_rows(write_jsonl(tmp_path / "c.jsonl", [{"conversations": SHAREGPT}, {"messages": CHAT}]), "messages")
    assert rows[0] == rows[1] == {"messages": CHAT}
    a, b = (encode_row(r, "messages", tiny_tokenizer) for r in rows)
    assert a == b


def test_fallback_template_when_the_tokenizer_has_none():
    tok = make_tokenizer(chat_template=None)
    ex = encode_row({"messages": CHAT}, "messages", tok)
    assert tok.decode(ex.input_ids) == ("<s><|system|>\nbe brief</s><|user|>\nhi</s><|assistant|>\nhello there</s>"
                                        "<|user|>\nand now?</s><|assistant|>\nthe end</s>")
    assert trained_text(tok, ex) == "hello there</s>the end</s>"


@pytest.mark.parametrize("template", ["chatml", None])
def test_a_prompt_renders_as_training_rendered_it(template, tiny_tokenizer):
    """The inference prompt of a conversation is exactly the untrained prefix training put before the answer,
    also for a tokenizer without a chat template (the fallback one, in both places)."""
    tok = tiny_tokenizer if template else make_tokenizer(chat_template=None)
    prompt = render_prompt(tok, {"messages": CHAT[:2]})
    assert prompt.chat and isinstance(prompt, Prompt)
    ex = encode_row({"messages": CHAT[:3]}, "messages", tok)
    ids = tok(prompt.text, add_special_tokens=False)["input_ids"]
    assert ex.input_ids[:len(ids)] == ids
    assert set(ex.labels[:len(ids)]) == {IGNORE_INDEX} and tok.decode(ex.labels[len(ids):]).startswith("hello")
    sharegpt = render_prompt(tok, {"conversations": SHAREGPT[:2]})
    assert sharegpt == prompt
    alpaca = {"instruction": "Name it.", "input": "a cat", "output": "cat"}
    text, chat = render_prompt(tok, alpaca)  # still unpacks like the old (text, chat) tuple
    assert not chat and text == ALPACA_PROMPT.format(instruction="Name it.", input="a cat")
    ids = tok(text)["input_ids"]
    assert encode_row(alpaca, "alpaca", tok).input_ids[:len(ids)] == ids


def test_prompt_rendering_takes_the_saved_template_and_names_bad_rows():
    tok = make_tokenizer(chat_template=None)
    assert render_prompt(tok, {"prompt": "hi"}) == Prompt("hi", False)  # no template anywhere: the text as it is
    saved = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    assert render_prompt(tok, {"prompt": "hi"}, saved) == Prompt("[hi]>", True)
    assert render_prompt(tok, {"messages": CHAT[:2]}, saved).text == "[be brief][hi]>"
    assert chat_template(tok) == FALLBACK_CHAT_TEMPLATE and chat_template(tok, saved) == saved
    with pytest.raises(DataError, match="prompt 3: each row needs 'prompt'"):
        render_prompt(tok, {"text": "x"}, where="prompt 3")
    with pytest.raises(DataError, match=r"p: field 'messages\[0\].role' is 'bot'"):
        render_prompt(tok, {"messages": [{"role": "bot", "content": "x"}]}, where="p")
    with pytest.raises(DataError, match="p: field 'prompt' must be a string"):
        render_prompt(tok, {"prompt": 5}, where="p")


def test_one_jsonl_reader_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"a": 1}\n\n[2]\n{"b": \n')
    rows = read_jsonl(path)
    assert next(rows) == (f"{path}, line 1", {"a": 1})
    assert next(rows) == (f"{path}, line 3", [2])
    with pytest.raises(DataError, match=r"p.jsonl, line 4: malformed JSON"):
        next(rows)
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        list(read_jsonl(tmp_path / "nope.jsonl"))


def test_conversation_starting_with_the_assistant(tiny_tokenizer):
    ex = encode_row({"messages": [{"role": "assistant", "content": "welcome"}, *CHAT[1:3]]}, "messages", tiny_tokenizer)
    assert trained_text(tiny_tokenizer, ex) == "<|im_start|>assistant\nwelcome<|im_end|>\nhello there<|im_end|>\n"


def test_text_format_trains_all_tokens(tiny_tokenizer, tmp_path):
    rows = load_rows(write_jsonl(tmp_path / "t.jsonl", [{"body": "the user asks"}]), "text", text_field="body")
    ex = encode_row(rows[0], "text", tiny_tokenizer)
    assert tiny_tokenizer.decode(ex.input_ids) == "<s>the user asks</s>" and ex.labels == ex.input_ids


# ---------------------------------------------------------------------------------------- reading and errors


@pytest.mark.parametrize(
    "fmt, rows, message",
    [("alpaca", [{"instruction": "a", "output": "b"}, "{not json"], r"line 2: malformed JSON"),
     ("alpaca", [{"instruction": "a", "output": "b"}, {"instruction": "a"}], r"line 2: missing field 'output'"),
     ("alpaca", [{"instruction": "a", "output": 3}], r"line 1: field 'output' must be a string, got int"),
     ("alpaca", [[1, 2]], r"line 1: expected an object"),
     ("text", [{"txt": "a"}], r"line 1: missing field 'text'"),
     ("messages", [{"msgs": []}], r"line 1: missing field 'messages' \(OpenAI style\) or 'conversations'"),
     ("messages", [{"messages": []}], r"line 1: field 'messages' must be a non-empty list"),
     ("messages", [{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}],
      r"line 1: field 'messages\[1\].role' is 'bot'"),
     ("messages", [{"messages": [{"role": "user"}]}], r"line 1: missing field 'messages\[0\].content'"),
     ("messages", [{"conversations": [{"from": "human"}]}], r"line 1: missing field 'conversations\[0\].value'")],
)
def test_bad_jsonl_rows_name_file_line_and_field(tmp_path, fmt, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=rf"^{tmp_path}/bad.jsonl, {message}"):
        load_rows(path, fmt)


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n\n{"instruction": "a"}\n')
    with pytest.raises(DataError, match="line 4: missing field 'output'"):
        load_rows(str(path), "alpaca")


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_empty_dataset_names_the_file(tmp_path, content):
    path = tmp_path / ("e.json" if content == "[]" else "e.jsonl")
    path.write_text(content)
    with pytest.raises(DataError, match=f"{path}: the dataset is empty"):
        load_rows(str(path), "alpaca")


def test_json_array_parquet_and_csv(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = [{"instruction": "i", "input": "", "output": "o"}, {"instruction": "j", "input": "k", "output": "p"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "a.parquet")
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "a.csv", index=False)
    for name in ("a.json", "a.parquet", "a.csv"):
        assert load_rows(str(tmp_path / name), "alpaca").to_list() == rows
    (tmp_path / "b.json").write_text('[{"instruction": "i",\n "output": }]')
    with pytest.raises(DataError, match="b.json, line 2: malformed JSON"):
        load_rows(str(tmp_path / "b.json"), "alpaca")


def test_missing_local_file_and_wrong_split(tmp_path):
    with pytest.raises(DataError, match="dataset file not found: .*nope.jsonl"):
        load_rows(str(tmp_path / "nope.jsonl"), "alpaca")
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match="single file, which has only the 'train' split"):
        load_rows(path, "alpaca", split="test")


def test_unreachable_hub_dataset_is_one_clear_error(monkeypatch):
    def offline(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)  # never touch the network from tests
    with pytest.raises(DataError, match="dataset 'someone/some-set' is not a local path and could not be loaded"):
        load_rows("someone/some-set", "messages")


# --------------------------------------------------------------------------------- truncation and pad tokens


def test_truncation_and_dropping_are_counted(tiny_tokenizer):
    rows = [{"instruction": "a", "input": "", "output": "b"},
            {"instruction": "a", "input": "", "output": "the assistant answers " * 20},
            {"instruction": "the user asks " * 20, "input": "", "output": "b"}]
    full = [len(encode_row(r, "alpaca", tiny_tokenizer)) for r in rows]
    max_len = full[0] + 5  # room for the first, and for a slice of the second's response; none of the third's
    ds = tokenize_rows(rows, "alpaca", tiny_tokenizer, max_len, source="demo")
    assert (len(ds), ds.truncated, ds.dropped) == (2, 2, 1)
    assert max(ds.lengths) == max_len
    with pytest.raises(DataError, match="demo: no example has a trainable token left"):
        tokenize_rows(rows[2:], "alpaca", tiny_tokenizer, max_len, source="demo")


def test_conversation_without_assistant_is_dropped(tiny_tokenizer):
    rows = [{"messages": CHAT}, {"messages": CHAT[:2]}]
    assert tokenize_rows(rows, "messages", tiny_tokenizer, 512).dropped == 1
    assert tokenize_rows(rows, "messages", tiny_tokenizer, 512, train_on_prompt=True).dropped == 0


def test_pad_falls_back_to_eos_once(caplog):
    tok = make_tokenizer(pad=False)
    with caplog.at_level(logging.INFO, logger="qlora_kit.data"):
        assert ensure_pad_token(tok) == tok.eos_token_id
        assert ensure_pad_token(tok) == tok.eos_token_id
    assert sum("no pad token" in r.message for r in caplog.records) == 1
    with pytest.raises(DataError, match="neither a pad nor an eos token"):
        ensure_pad_token(make_tokenizer(pad=False, eos=False))


# ------------------------------------------------------------------------------------------------ batching


def examples(*lengths: int) -> list[Example]:
    return [Example([10 + i] * n, [20 + i] * n) for i, n in enumerate(lengths)]


def test_collate_pads_to_longest_and_masks_padding_by_position():
    eos = 3
    batch = collate([Example([5, eos], [5, eos]), Example([6, 7, 8, eos], [-100, 7, 8, eos])], pad_id=eos)
    assert batch["input_ids"].tolist() == [[5, eos, eos, eos], [6, 7, 8, eos]]
    assert batch["labels"].tolist() == [[5, eos, -100, -100], [-100, 7, 8, eos]]  # the real eos stays trained
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_pack_keeps_examples_whole_and_beats_sequential_packing():
    lengths = [7, 3, 5, 2, 6, 4, 1, 8, 2, 2]
    rows = pack(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each example once, never split
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 4 == -(-sum(lengths) // 10)  # 40 tokens in the minimum of 4 rows
    assert packing_efficiency(lengths, rows, 10) == 1.0
    sequential = [[0], [1, 2], [3, 4], [5, 6], [7], [8, 9]]  # fill rows in order, open a new one when full
    assert packing_efficiency(lengths, sequential, 10) == pytest.approx(40 / 60)
    with pytest.raises(ValueError, match="needs 1..10"):
        pack([11], 10)


def test_collate_packed_restarts_positions_and_numbers_examples():
    a, b, c = examples(3, 2, 4)
    batch = collate_packed([[a, b], [c]], pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 10, 10, 11, 11], [12, 12, 12, 12, 0]]
    # each example's first label is dropped: the token before it belongs to another example
    assert batch["labels"].tolist() == [[-100, 20, 20, -100, 21], [-100, 22, 22, 22, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["seq_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]]
    assert "attention_mask" not in batch


def test_packed_attention_mask_is_block_diagonal_causal():
    mask = packed_attention_mask(torch.tensor([[0, 0, 1, 1, 1, -1]]))
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for start, end in [(0, 2), (2, 5), (5, 6)]:
        expected[start:end, start:end] = torch.ones(end - start, end - start).tril().bool()
    assert torch.equal(mask[0, 0], expected)
    additive = packed_attention_mask(torch.tensor([[0, 0, 1, 1, 1, -1]]), torch.bfloat16)
    assert additive.dtype == torch.bfloat16 and torch.equal(additive[0, 0] == 0, expected)
    assert (additive[0, 0][~expected] == torch.finfo(torch.bfloat16).min).all()


@pytest.mark.parametrize("attn, how", [("eager", "additive"), ("sdpa", "bool"), ("sdpa", "positions"),
                                       ("eager", "positions")])
def test_packed_forward_equals_separate_forwards(attn, how):
    """No leakage: each example's logits inside a packed row are its logits alone."""
    model = make_model("llama", dtype=torch.float32)
    model.set_attn_implementation(attn)
    gen = torch.Generator().manual_seed(0)
    exs = [Example(torch.randint(0, 128, (n,), generator=gen).tolist(), [0] * n) for n in (5, 9, 3)]
    batch = collate_packed([exs, exs[1:]], pad_id=0)
    kwargs = {"position_ids": batch["position_ids"], "use_cache": False}
    if how != "positions":
        kwargs["attention_mask"] = packed_attention_mask(batch["seq_ids"], torch.float32 if how == "additive" else None)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], **kwargs).logits
        alone = [model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in exs]
    torch.testing.assert_close(packed[0, :17], torch.cat(alone), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed[1, :12], torch.cat(alone[1:]), atol=1e-4, rtol=1e-4)


def dataset(n: int) -> TokenizedDataset:
    return TokenizedDataset([Example([i] * (1 + i % 7), [i] * (1 + i % 7)) for i in range(n)], "toy")


@pytest.mark.parametrize("packing_len", [0, 16])
def test_iterator_resumes_with_identical_batches(packing_len):
    it = BatchIterator(dataset(23), batch_size=4, pad_id=0, seed=7, packing_len=packing_len)
    stream = iter(it)
    first = [next(stream) for _ in range(len(it) + 1)]  # into the second epoch
    state = it.state_dict()
    rest = [next(stream) for _ in range(len(it) + 1)]
    resumed = BatchIterator(dataset(23), batch_size=4, pad_id=0, seed=999, packing_len=packing_len)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    again = list(itertools.islice(resumed, len(rest)))
    assert len(it) >= 2 and (state["epoch"], state["position"], state["seed"]) == (1, 4, 7)
    for x, y in zip(rest, again, strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(first[0]["input_ids"], first[len(it)]["input_ids"])  # epochs are reshuffled


def test_iterator_covers_each_example_once_per_epoch_and_is_seeded():
    it = BatchIterator(dataset(10), batch_size=3, pad_id=-1, seed=1)
    epoch = list(itertools.islice(it, len(it)))
    assert len(it) == 4 and sorted(i for b in epoch for i in b["input_ids"][:, 0].tolist()) == list(range(10))
    same = list(itertools.islice(BatchIterator(dataset(10), 3, -1, seed=1), 4))
    other = list(itertools.islice(BatchIterator(dataset(10), 3, -1, seed=2), 4))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(epoch, same))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(epoch, other))


def test_iterator_refuses_a_changed_dataset():
    state = BatchIterator(dataset(10), 2, 0, seed=0).state_dict()
    with pytest.raises(DataError, match="training data changed"):
        BatchIterator(dataset(11), 2, 0, seed=0).load_state_dict(state)


def test_eval_batches_are_one_ordered_pass():
    batches = list(eval_batches(dataset(5), 2, pad_id=0))
    assert [b["input_ids"][:, 0].tolist() for b in batches] == [[0, 1], [2, 3], [4]]


# ------------------------------------------------------------------------------------------ whole pipeline


def test_build_datasets_holds_out_a_seeded_fraction(tiny_tokenizer, tmp_path):
    rows = [{"instruction": f"word {i}", "output": f"answer {i}"} for i in range(20)]
    config = DatasetConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), eval_fraction=0.2)
    train, held = build_datasets(config, tiny_tokenizer, 128, seed=3)
    assert (len(train), len(held)) == (16, 4)
    ids = {tuple(e.input_ids) for e in train.examples}
    assert not ids & {tuple(e.input_ids) for e in held.examples}
    train2, held2 = build_datasets(config, tiny_tokenizer, 128, seed=3)
    assert held2.examples == held.examples and train2.examples == train.examples


def test_build_datasets_with_an_eval_file(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": CHAT}] * 3)
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [{"conversations": SHAREGPT}])
    config = DatasetConfig(path=path, format="messages", eval_path=eval_path)
    train, held = build_datasets(config, tiny_tokenizer, 256, 0)
    assert (len(train), len(held)) == (3, 1) and held.examples[0] == train.examples[0]
    assert build_datasets(DatasetConfig(path=path, format="messages"), tiny_tokenizer, 256, 0)[1] is None

"""Tokenized examples in, model-ready batches out: dynamic padding, packing, and a resumable shuffled order.

Packing is best-fit decreasing over whole examples (an example is never split across rows), done once; the
packed rows, like plain examples, are shuffled per epoch from (seed, epoch), so a run resumed from
`BatchIterator.state_dict()` sees exactly the batches it would have seen. Packed rows carry restarting
position_ids and per-example sequence ids, never a 2-D attention mask, so attention stays within each example.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from qlora_kit.data import IGNORE_INDEX, Example, TokenizedDataset
from qlora_kit.errors import DataError

log = logging.getLogger(__name__)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example: input_ids, attention_mask, labels (-100 on padding, found by position, not
    by id, because pad may be eos and a real eos must stay trained)."""
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention_mask = torch.zeros_like(input_ids)
    for i, e in enumerate(examples):
        input_ids[i, : len(e)] = torch.tensor(e.input_ids)
        labels[i, : len(e)] = torch.tensor(e.labels)
        attention_mask[i, : len(e)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Example indices grouped into rows of at most max_len tokens, best-fit decreasing; examples are never split.

    Longest first, each into the row with the least free space that still fits it. That leaves less padding
    than filling rows in dataset order, and the per-epoch shuffle undoes the order. Rows are bucketed by free
    space, with one bit per non-empty bucket, so finding the best fit is a shift and a lowest-bit, not a scan.
    """
    rows: list[list[int]] = []
    by_room: list[list[int]] = [[] for _ in range(max_len + 1)]  # rows with exactly that many free slots
    nonempty = 0  # bit r is set while by_room[r] holds a row
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if not 0 < n <= max_len:
            raise ValueError(f"example {i} has {n} tokens; packing needs 1..{max_len}")
        fits = nonempty >> n
        if fits:
            room = n + (fits & -fits).bit_length() - 1
            row = by_room[room].pop()
            if not by_room[room]:
                nonempty &= ~(1 << room)
            rows[row].append(i)
        else:
            rows.append([i])
            row, room = len(rows) - 1, max_len
        if room > n:
            by_room[room - n].append(row)
            nonempty |= 1 << (room - n)
    return rows


def packing_efficiency(lengths: Sequence[int], rows: Sequence[Sequence[int]], max_len: int) -> float:
    """Real tokens over row slots (len(rows) × max_len): the share of compute spent on data rather than padding."""
    return sum(lengths[i] for row in rows for i in row) / (len(rows) * max_len) if rows else 0.0


def collate_packed(rows: Sequence[Sequence[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows: input_ids, labels, position_ids restarting at 0 per example, and seq_ids (example number in
    its row, -1 on padding) for `packed_attention_mask`.

    There is deliberately no 2-D attention_mask: given one, transformers builds a plain causal mask that lets
    examples see each other. Without one, and with use_cache=False, transformers finds the examples from the
    restarting position_ids (eager, sdpa and flash alike); or pass `packed_attention_mask(seq_ids, dtype)` as
    the attention_mask. seq_ids is not a model input. Trailing padding forms its own segment, so no query row is
    fully masked.
    """
    width = max(sum(len(e) for e in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    position_ids = torch.zeros_like(input_ids)
    seq_ids = torch.full_like(input_ids, -1)
    for b, row in enumerate(rows):
        at = 0
        for k, e in enumerate(row):
            input_ids[b, at : at + len(e)] = torch.tensor(e.input_ids)
            labels[b, at : at + len(e)] = torch.tensor(e.labels)
            labels[b, at] = IGNORE_INDEX  # nothing in this example predicts its first token: no cross-example loss
            position_ids[b, at : at + len(e)] = torch.arange(len(e))
            seq_ids[b, at : at + len(e)] = k
            at += len(e)
        position_ids[b, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "seq_ids": seq_ids}


def packed_attention_mask(seq_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[b, L] seq_ids -> [b, 1, L, L] block-diagonal causal mask: True where a query may attend to a key.

    With `dtype`, the additive form (0 / dtype's min) that eager attention adds to its scores; sdpa takes either.
    """
    length = seq_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=seq_ids.device).tril()
    mask = ((seq_ids[:, :, None] == seq_ids[:, None, :]) & causal)[:, None]
    if dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=seq_ids.device).masked_fill(~mask, torch.finfo(dtype).min)


FILLER = "filler"
"""Key marking a batch that only keeps a rank in step with the others (`BatchIterator._share`); no real tokens."""


class BatchIterator:
    """Endless collated batches, reshuffled each epoch from (seed, epoch), resumable from `state_dict()`.

    With `world_size` > 1, each step's global batch of `batch_size × world_size` rows is drawn exactly as one
    process would draw it, and rank r trains its r-th contiguous share: the same rows in the same steps whatever
    the number of ranks, so the position in the data is one number for the whole job.

    The state is taken between batches: after a batch is yielded, `state_dict()` names the next one, so a run
    that saves it with its checkpoint and loads it on resume continues with exactly the batches it would have
    seen. Packed rows are built once, so every epoch shuffles the same rows.

    `padding_free` (without packing) yields each batch of examples as one packed row, the examples back to back:
    the same examples in the same steps as the padded batch, none of its padding. Only for a model whose attention
    keeps packed examples apart without a row-wide mask (`attention.use_per_example_attention`).
    """

    def __init__(
        self,
        data: TokenizedDataset,
        batch_size: int,
        pad_id: int,
        seed: int,
        packing_len: int = 0,
        rank: int = 0,
        world_size: int = 1,
        padding_free: bool = False,
    ) -> None:
        if not data.examples:
            raise DataError(f"{data.source}: no examples to batch")
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        self.rank, self.world_size = rank, world_size
        self.packed = packing_len > 0
        self.padding_free = padding_free and not self.packed
        if self.packed:
            rows = pack(data.lengths, packing_len)
            efficiency = packing_efficiency(data.lengths, rows, packing_len)
            log.info(
                "%s: packed %d examples into %d rows of %d tokens (%.1f%% of slots are real tokens)",
                data.source, len(data), len(rows), packing_len, 100 * efficiency,
            )
            self._units: list[Any] = [[data.examples[i] for i in row] for row in rows]
        else:
            self._units = data.examples
        self.epoch, self.position = 0, 0
        self._order: tuple[tuple[int, int], np.ndarray] | None = None

    def __len__(self) -> int:
        """Batches per epoch (the last one may be smaller)."""
        return math.ceil(len(self._units) / (self.batch_size * self.world_size))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": len(self._units)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if state["size"] != len(self._units):
            raise DataError(
                f"the training data changed since the checkpoint ({state['size']} rows then, {len(self._units)} now); "
                "resume with the same dataset, max_seq_len and packing"
            )
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]

    def _epoch_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != (self.epoch, self.seed):
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = ((self.epoch, self.seed), rng.permutation(len(self._units)))
        return self._order[1]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            order = self._epoch_order()
            picked = [self._units[i] for i in order[self.position : self.position + self.batch_size * self.world_size]]
            self.position += len(picked)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
            mine, filler = self._share(picked)
            if self.packed:
                batch = collate_packed(mine, self.pad_id)
            elif self.padding_free:
                batch = collate_packed([mine], self.pad_id)  # one row: the batch's examples back to back
            else:
                batch = collate(mine, self.pad_id)
            if filler:
                batch["labels"].fill_(IGNORE_INDEX)
                batch[FILLER] = torch.ones(())
            yield batch

    def _share(self, picked: list) -> tuple[list, bool]:
        """This rank's contiguous share of one global batch, and whether it is filler: a rank left without rows
        (the short last batch of an epoch) runs the first row with every label masked, so it joins the
        collectives the other ranks make while adding nothing to the loss or the gradients."""
        per = -(-len(picked) // self.world_size)
        mine = picked[self.rank * per : (self.rank + 1) * per]
        return (mine, False) if mine else (picked[:1], True)


def eval_batches(data: TokenizedDataset, batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """One pass in dataset order, padded (not packed), so eval loss is comparable across packing settings."""
    for start in range(0, len(data), batch_size):
        yield collate(data.examples[start : start + batch_size], pad_id)

"""Continuous batching across adapters: one thread runs every forward pass of the server.

Requests wait in a FIFO queue. Between decode steps the engine thread admits waiting requests up to
`max_batch`; those admitted together are prefilled in one left-padded forward (a prompt admitted alone gets
exactly the prefill `qlora-kit generate` runs for it) and join the running batch at the next step; a sequence
leaves the batch the step it finishes. Each sequence has its own KV cache: the running ones are the rows of one
left-padded `DynamicCache`, re-laid only when a sequence joins or leaves (TGI's concatenate/filter), so a decode step
is one forward over every running row — each row with its own adapter through `per_row_adapters` — plus the cache
append the model does anyway. Position ids and the attention mask make the padding invisible, so a greedy completion
equals the one decoded alone, up to float rounding between batch shapes.

Adapters are registered by name and path. At most `max_adapters` are held on the model; naming another loads it,
evicting the least recently used one that no running sequence uses (it is reloaded from its path when named
again). Adapter loads and unloads run on the engine thread between steps, so the model is never changed under a
forward pass. Results leave through a per-sequence `sink` callback, called on the engine thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from qlora_kit.adapters import adapter_names, load_adapter, per_row_adapters
from qlora_kit.errors import CheckpointError, ConfigError, QloraKitError
from qlora_kit.lora import QLinear

log = logging.getLogger(__name__)

STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"
# Padded prompt tokens one prefill forward may hold (vLLM's max_num_batched_tokens, for the same reason): prompts
# admitted at once are prefilled in groups this size, so their activations and the allocator's high-water mark stay
# bounded (16 prompts of ~50 tokens in one forward raised the serving RSS by 100 MB); a longer prompt goes alone.
PREFILL_TOKENS = 256
REPLACEMENT = "\ufffd"  # what decode() shows for a token that ends inside a multi-byte character


@dataclass(frozen=True)
class Sampling:
    """What one completion may generate, and how it picks tokens (temperature 0: greedy)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    """Go on past the end-of-sequence token (vLLM's extension; benchmarks use it for fixed-length outputs)."""


@dataclass(frozen=True)
class Delta:
    """New completion text, ready to send (never half a character, never a possible start of a stop string)."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The sequence is done; times are seconds on the `time.perf_counter` clock since it was submitted."""

    reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    queue_s: float
    ttft_s: float | None
    latency_s: float


@dataclass(frozen=True)
class Failed:
    """The sequence could not run (its adapter failed to load or was unloaded); `message` says why."""

    message: str


Event = Delta | Finished | Failed


@dataclass(eq=False)
class Sequence:
    """One completion in flight. `cancel()` may be called from any thread; the engine drops it at the next step."""

    prompt_ids: list[int]
    adapter: str | None
    sampling: Sampling
    sink: Callable[[Event], None]
    submitted: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    admitted: float | None = None
    first_token: float | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def length(self) -> int:
        """Tokens in this sequence's KV cache once its last token has been fed."""
        return len(self.prompt_ids) + len(self.tokens)


class _Batch:
    """The running sequences' KV caches as the rows of one DynamicCache, left-padded to a common length."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        self.cache, self.mask = cache, mask

    def add(self, other: _Batch) -> None:
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(other.mask, width)])

    def keep(self, rows: list[int]) -> None:
        """Only `rows`, in that order; columns that are padding in every kept row are dropped."""
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) > 0).int().argmax())
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros in front along the sequence dimension (-2 for cache tensors [b, heads, len, dim], -1 for masks)."""
    dim = -2 if t.dim() == 4 else -1
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    return F.pad(t, (0, 0, missing, 0) if dim == -2 else (missing, 0))


def context_length(config) -> int:
    """Positions the model was built for (what a prompt plus its completion must fit in)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ConfigError(f"{type(config).__name__} names no context length (max_position_embeddings)")


def drop_adapter(model: torch.nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer that holds it (the base itself is untouched)."""
    for layer in model.modules():
        if isinstance(layer, QLinear) and name in layer.lora_A:
            layer.delete_adapter(name)


class Engine:
    """The decode loop of one model. `submit` queues a sequence; `register`/`unregister` change the adapters
    requests may name. Adapter state changes on the engine thread only, under `_wake`'s lock."""

    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_adapters: int = 8) -> None:
        if max_batch < 1 or max_adapters < 1:
            raise ConfigError(f"--max-batch and --max-adapters must be at least 1, got {max_batch}, {max_adapters}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_adapters = max_batch, max_adapters
        self.context = context_length(model.config)
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos  # the ids model.generate stops at: same texts
        self.eos = set(eos) if isinstance(eos, list) else {eos} - {None}
        self._paths: dict[str, Path] = {}  # every adapter a request may name
        self._held: OrderedDict[str, None] = OrderedDict((n, None) for n in adapter_names(model))  # LRU first
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._batch: _Batch | None = None
        self._commands: list[tuple[Callable[[], bool], Future]] = []
        self._wake = threading.Condition()
        self._draining: set[str] = set()  # unregistered, still decoding in a running row
        self._stopping = False
        self.peak_batch = 0  # most sequences decoded in one step so far
        self._thread = threading.Thread(target=self._loop, name="qlora-kit-engine", daemon=True)
        self._check_cache()

    # ---- the caller's side (any thread) ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish every queued and running sequence, then end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, seq: Sequence) -> Sequence:
        with self._wake:
            if self._stopping:
                raise QloraKitError("the server is shutting down")
            self._waiting.append(seq)
            self._wake.notify()
        return seq

    def register(self, name: str, path: Path) -> Future:
        """Load adapter `name` from `path` (refused with the reason if it does not load) and make it nameable."""
        def run() -> bool:
            if name in self._paths:
                raise CheckpointError(f"an adapter named {name!r} is already loaded (from {self._paths[name]})")
            if name in self._draining or not self._make_room():  # wait for the old one's rows, or for a slot
                return False
            self._load(name, path)
            with self._wake:
                self._paths[name] = path
            return True

        return self._command(run)

    def unregister(self, name: str) -> Future:
        """Forget adapter `name`: queued requests naming it fail; it is dropped once no running row uses it."""
        def run() -> bool:
            if name in self._paths:
                with self._wake:
                    del self._paths[name]  # from now on a request naming it is refused
                self._draining.add(name)
            elif name not in self._draining:
                raise CheckpointError(f"no adapter named {name!r}; loaded: {', '.join(self._paths) or 'none'}")
            if any(s.adapter == name for s in self._running):
                return False
            self._draining.discard(name)
            if name in self._held:
                drop_adapter(self.model, name)
                del self._held[name]
            return True

        return self._command(run)

    def adapters(self) -> dict[str, Path]:
        """Every adapter a request may name, and where it is loaded from (a copy: safe from any thread)."""
        with self._wake:
            return dict(self._paths)

    def busy(self) -> int:
        """Sequences queued or running."""
        with self._wake:
            return len(self._waiting) + len(self._running)

    def _command(self, fn: Callable[[], bool]) -> Future:
        future: Future = Future()
        if not self._thread.is_alive():  # before start(): run here (startup adapters, tests)
            self._run_command(fn, future)
            if not future.done():
                raise ConfigError("no room for another adapter; raise --max-adapters")
            return future
        with self._wake:
            self._commands.append((fn, future))
            self._wake.notify()
        return future

    # ---- the engine thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._commands or self._waiting or self._running or self._stopping):
                    self._wake.wait()
                if self._stopping and not (self._waiting or self._running or self._commands):
                    return
                commands, self._commands = self._commands, []
            pending = [(fn, fut) for fn, fut in commands if not self._run_command(fn, fut)]
            with self._wake:
                self._commands[:0] = pending
            try:
                self._admit()
                if self._running:
                    self._step()
                elif pending:
                    time.sleep(0.001)  # a command waits for a row that is already gone; try again
            except Exception as e:  # a bug or out of memory: fail what is in flight, keep serving
                log.exception("decode step failed")
                for seq in self._running:
                    self._emit(seq, Failed(f"internal error: {type(e).__name__}: {e}"))
                self._running, self._batch = [], None

    @staticmethod
    def _run_command(fn: Callable[[], bool], future: Future) -> bool:
        try:
            done = fn()
        except Exception as e:
            future.set_exception(e)
            return True
        if done:
            future.set_result(None)
        return done

    def _admit(self) -> None:
        """Waiting sequences join in FIFO order while there is a row and their adapter can be held (a sequence
        that must wait for an adapter slot holds back the ones behind it, so nobody starves); those admitted
        together are prefilled together, up to PREFILL_TOKENS."""
        joining: list[Sequence] = []
        while self._waiting and len(self._running) + len(joining) < self.max_batch:
            seq = self._waiting[0]
            if seq.cancelled:
                self._waiting.popleft()
                self._finish(seq, CANCELLED)
                continue
            width = max([len(seq.prompt_ids), *(len(s.prompt_ids) for s in joining)])
            if joining and width * (len(joining) + 1) > PREFILL_TOKENS:
                break  # the rest join after the next decode step
            try:
                if not self._hold(seq.adapter, pinned={s.adapter for s in joining}):
                    break
            except Exception as e:  # the adapter's files changed or vanished since it was registered
                self._waiting.popleft()
                self._emit(seq, Failed(f"adapter {seq.adapter!r} failed to load: {e}"))
                continue
            joining.append(self._waiting.popleft())
        if not joining:
            return
        try:
            self._prefill(joining)
        except Exception as e:
            log.exception("prefill failed")
            for seq in joining:
                self._emit(seq, Failed(f"internal error: {type(e).__name__}: {e}"))

    def _hold(self, name: str | None, pinned: set[str | None]) -> bool:
        """Make adapter `name` resident (most recently used); False while no slot can be freed for it."""
        if name is None:
            return True
        if name not in self._paths:
            raise CheckpointError(f"adapter {name!r} was unloaded")
        if name in self._held:
            self._held.move_to_end(name)
            return True
        if not self._make_room(pinned):
            return False
        self._load(name, self._paths[name])
        return True

    def _make_room(self, pinned: set[str | None] = frozenset()) -> bool:
        """Evict least recently used adapters no running (or `pinned`) row uses until one more fits."""
        in_use = {s.adapter for s in self._running} | pinned
        while len(self._held) >= self.max_adapters:
            victim = next((n for n in self._held if n not in in_use), None)
            if victim is None:
                return False
            drop_adapter(self.model, victim)
            del self._held[victim]
            log.info("evicted adapter %s (least recently used)", victim)
        return True

    def _load(self, name: str, path: Path) -> None:
        try:
            load_adapter(self.model, path, name)
        except Exception:
            drop_adapter(self.model, name)  # a load that failed half way leaves nothing behind
            raise
        self._held[name] = None

    @torch.no_grad()
    def _prefill(self, seqs: list[Sequence]) -> None:
        """One forward over the joining prompts, left-padded (a prompt alone is exactly `model.generate`'s
        prefill); each gets its first token and its cache becomes a row of the running batch."""
        now, device = time.perf_counter(), self.model.device
        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(seqs):
            seq.admitted = now
            if seq.sampling.seed is not None:
                seq.generator = torch.Generator(device).manual_seed(seq.sampling.seed)
            ids[i, width - len(seq.prompt_ids):] = torch.tensor(seq.prompt_ids)
            mask[i, width - len(seq.prompt_ids):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as model.generate numbers left-padded prompts
        with per_row_adapters(self.model, [s.adapter for s in seqs]):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **self._extra)
        picks = self._sample(out.logits[:, -1], seqs)
        keep = [i for i, (seq, token) in enumerate(zip(seqs, picks)) if not self._accept(seq, token)]
        if not keep:
            return
        rows = _Batch(self._cache_of(out), mask)
        if len(keep) < len(seqs):
            rows.keep(keep)
        if self._batch is None:
            self._batch = rows
        else:
            self._batch.add(rows)
        self._running += [seqs[i] for i in keep]
        self.peak_batch = max(self.peak_batch, len(self._running))

    @torch.no_grad()
    def _step(self) -> None:
        live = [i for i, s in enumerate(self._running) if not s.cancelled]
        if len(live) < len(self._running):
            for s in self._running:
                if s.cancelled:
                    self._finish(s, CANCELLED)
            self._keep(live)
            if not self._running:
                return
        batch, device = self._batch, self.model.device
        ids = torch.tensor([[s.tokens[-1]] for s in self._running], device=device)
        batch.mask = torch.cat([batch.mask, torch.ones_like(ids)], dim=1)
        positions = torch.tensor([[s.length - 1] for s in self._running], device=device)
        with per_row_adapters(self.model, [s.adapter for s in self._running]):
            out = self.model(input_ids=ids, attention_mask=batch.mask, position_ids=positions,
                             cache_position=torch.tensor([batch.mask.shape[1] - 1], device=device), use_cache=True,
                             **{self._cache_arg: batch.cache}, **self._extra)
        picks = self._sample(out.logits[:, -1], self._running)
        self._keep([i for i, (s, t) in enumerate(zip(self._running, picks)) if not self._accept(s, t)])

    def _keep(self, rows: list[int]) -> None:
        self._running = [self._running[i] for i in rows]
        if not rows:
            self._batch = None
        elif len(rows) < self._batch.mask.shape[0]:
            self._batch.keep(rows)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """One token per row: argmax at temperature 0, else nucleus sampling from each row's own generator."""
        picks = logits.argmax(-1).tolist()
        for i, seq in enumerate(seqs):
            s = seq.sampling
            if s.temperature > 0:
                probs = torch.softmax(logits[i].float() / s.temperature, -1)
                if s.top_p < 1.0:
                    sorted_p, order = probs.sort(descending=True)
                    cut = sorted_p.cumsum(0) - sorted_p >= s.top_p  # keep the smallest head reaching top_p
                    probs = torch.zeros_like(probs).scatter_(0, order, sorted_p.masked_fill(cut, 0.0))
                picks[i] = int(torch.multinomial(probs, 1, generator=seq.generator))
        return picks

    def _accept(self, seq: Sequence, token: int) -> bool:
        """Record one sampled token, send what text is final; True when the sequence is done."""
        now = time.perf_counter()
        seq.first_token = seq.first_token or now
        seq.tokens.append(token)
        if token in self.eos and not seq.sampling.ignore_eos:
            return self._finish(seq, STOP, text=self._decode(seq.tokens[:-1]))
        text = self._decode(seq.tokens)
        reason = None
        cut = min((i for i in (text.find(stop, max(0, seq.sent - len(stop))) for stop in seq.sampling.stop)
                   if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], STOP
        elif len(seq.tokens) >= seq.sampling.max_tokens or seq.length >= self.context:
            reason = LENGTH
        if reason:
            return self._finish(seq, reason, text=text)
        seq.text = text
        ready = _sendable(text, seq.sampling.stop)
        if ready > seq.sent:
            self._emit(seq, Delta(text[seq.sent:ready]))
            seq.sent = ready
        return False

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _finish(self, seq: Sequence, reason: str, text: str | None = None) -> bool:
        text = seq.text if text is None else text
        if reason != CANCELLED and len(text) > seq.sent:
            self._emit(seq, Delta(text[seq.sent:]))
        now = time.perf_counter()
        admitted = seq.admitted or now
        ttft = seq.first_token - seq.submitted if seq.first_token else None
        self._emit(seq, Finished(reason, text, len(seq.prompt_ids), len(seq.tokens), admitted - seq.submitted,
                                 ttft, now - seq.submitted))
        return True

    @staticmethod
    def _emit(seq: Sequence, event: Event) -> None:
        try:
            seq.sink(event)
        except Exception:  # a sink whose client is gone must not stop the batch
            log.debug("sink failed", exc_info=True)

    # ---- setup -------------------------------------------------------------------------------------------

    def _check_cache(self) -> None:
        """Refuse a model whose KV cache is not a list of plain per-layer tensors (sliding-window and other caches
        cannot be re-laid row by row), and learn whether the forward can skip the logits of the prompt."""
        import inspect

        params = inspect.signature(self.model.forward).parameters
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # as model.generate does
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers 5.x renamed it
        ids = torch.tensor([[self.tokenizer.bos_token_id or 0]], device=self.model.device)
        with torch.no_grad():
            cache = self._cache_of(self.model(input_ids=ids, use_cache=True, **self._extra))
        if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
            kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])}) or [type(cache).__name__]
            raise ConfigError(f"serving needs a model with a plain full-attention KV cache; "
                              f"{type(self.model).__name__} uses {', '.join(kinds)}")


    def _cache_of(self, out) -> DynamicCache:
        return out[self._cache_arg] if self._cache_arg in out else out["past_key_values"]


def _sendable(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` is final: not a trailing partial character, not a suffix that may begin a stop string."""
    end = len(text.rstrip(REPLACEMENT))
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[end - k:end] == stop[:k]:
                end -= k
                break
    return end


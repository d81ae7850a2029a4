"""The training loop: a recipe in, a PEFT adapter out, resumable at any checkpoint.

One optimizer step = `gradient_accumulation_steps` micro-batches whose token losses are summed and divided by
the step's total number of trained tokens, so accumulation gives exactly the loss of one big batch (dividing
per micro-batch would weight short batches more). Base weights are frozen 4-bit; LoRA weights are fp32
masters, run under autocast in the compute dtype. Everything that decides the next step — adapter, optimizer,
schedule, RNG, data position, counters — is the trainer's state dict (`Trainer.state_dict`), which each
checkpoint holds (`runstate` lays it out on disk), so a resumed run continues bit for bit.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from qlora_kit import runstate
from qlora_kit.adapters import AdapterFiles, adapter_state_dict, load_adapter_state
from qlora_kit.atomic import AtomicDir
from qlora_kit.attention import use_per_example_attention
from qlora_kit.batching import FILLER, BatchIterator, eval_batches
from qlora_kit.config import Recipe, dump_recipe
from qlora_kit.data import IGNORE_INDEX, build_datasets, chat_template, ensure_pad_token
from qlora_kit.distributed import Dist
from qlora_kit.errors import CheckpointError, QloraKitError
from qlora_kit.loader import load_quantized, read_config
from qlora_kit.lora import lora_parameters, quant_state_parameters
from qlora_kit.loss import token_loss_sum
from qlora_kit.metrics import MetricsLog
from qlora_kit.optim import make_optimizer, make_scheduler
from qlora_kit.device import keep_freed_memory, load_tokenizer, resolve_device, resolve_dtype

log = logging.getLogger(__name__)


class TrainingError(QloraKitError):
    """The run cannot go on (a non-finite loss with on_nonfinite=stop); the last good checkpoint is kept."""


@dataclass
class Counters:
    """Progress that must survive a restart."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    skipped_steps: int = 0
    loss_window: list[float] = field(default_factory=list)
    """Losses of the steps since the last log line, so a run resumed between two logs averages the same steps."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    eval_loss_before: float | None
    eval_loss_after: float | None
    resumed_from: int | None
    interrupted: bool = False
    main: bool = True
    """Whether this process is rank 0 (the one that wrote the outputs)."""


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens: what tokens/s and `tokens_seen` count."""
    if FILLER in batch:
        return 0
    if "seq_ids" in batch:
        return int((batch["seq_ids"] >= 0).sum())
    return int(batch["attention_mask"].sum())


@torch.no_grad()
def evaluate(model, data, batch_size: int, pad_id: int, device, autocast, max_batches: int = 0,
             dist: Dist | None = None) -> float:
    """Mean token loss over the eval set (padded batches, dataset order); perplexity is its exp. With `dist`,
    each rank takes every world-th batch and the sums are added over ranks."""
    was_training = model.training
    model.eval()
    batches = list(eval_batches(data, batch_size, pad_id))[: max_batches or None]
    indices = dist.shard_indices(len(batches)) if dist is not None else range(len(batches))
    total, count = 0.0, 0
    for i in indices:
        with autocast():
            loss, n = token_loss_sum(model, {k: v.to(device) for k, v in batches[0 if i is None else i].items()})
        if i is not None:
            total, count = total + loss.item(), count + n
    if dist is not None:
        total, count = dist.total(total, count)
    model.train(was_training)
    return total / max(count, 1)


def _rng_state() -> dict[str, torch.Tensor]:
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    return rng


def _rng_key(key: str, rank: int) -> str:
    """Rank 0's RNG keeps the single-process names; rank r's gets a `.rank<r>` suffix."""
    return key if rank == 0 else f"{key}.rank{rank}"


class _StopFlag:
    """SIGINT sets a flag checked between steps, so Ctrl-C ends on a saved, consistent checkpoint."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopFlag:
        def handler(signum, frame):
            if self.requested:  # a second Ctrl-C means now
                raise KeyboardInterrupt
            self.requested = True
            tqdm.write("interrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)",
                       file=sys.stderr)

        self._previous = signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


class Trainer:
    """Holds the run's objects; `run()` is the loop. Built from a validated Recipe and nothing else."""

    def __init__(self, recipe: Recipe, progress: bool = True) -> None:
        self.recipe = recipe
        self.out = Path(recipe.output_dir)
        self.dist = Dist(recipe.distributed, resolve_device())
        self.progress = progress and self.dist.is_main
        self.device = self.dist.device
        self.optimizer_name = self.dist.optimizer_name(recipe.optimizer)
        self.dtype = resolve_dtype(recipe.compute_dtype, self.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # a step frees and allocates the same tensors again: reuse, don't refault them
        read_config(Path(recipe.model), recipe.trust_remote_code)  # a broken config.json, named as such, first
        self.tokenizer = load_tokenizer(recipe.model, recipe.trust_remote_code)
        self.pad_id = ensure_pad_token(self.tokenizer)
        # saved with the adapter, so inference renders conversations exactly as training did
        self.chat_template = chat_template(self.tokenizer) if recipe.dataset.format == "messages" else None
        self.train_data, self.eval_data = build_datasets(recipe.dataset, self.tokenizer, recipe.max_seq_len, recipe.seed)
        torch.manual_seed(recipe.seed)
        load_device = "cpu" if recipe.distributed.cpu_offload else self.device  # offload: FSDP streams blocks in
        self.model = load_quantized(recipe.model, quant=recipe.quant, lora=recipe.lora, device=load_device,
                                    dtype=self.dtype, trust_remote_code=recipe.trust_remote_code)
        per_example = use_per_example_attention(self.model)  # packed rows: attention per example, no row mask
        packing_len = recipe.max_seq_len if recipe.packing else 0
        self.batches = BatchIterator(self.train_data, recipe.batch_size, self.pad_id, recipe.seed, packing_len,
                                     self.dist.rank, self.dist.world, padding_free=recipe.padding_free and per_example)
        self.total_steps = recipe.max_steps or max(
            1, math.ceil(recipe.epochs * len(self.batches) / recipe.gradient_accumulation_steps)
        )
        if recipe.gradient_checkpointing and getattr(self.model, "supports_gradient_checkpointing", False):
            enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers >= 5 name
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.dist.rank > 0:  # own dropout streams; the adapters were initialised alike on every rank
            torch.manual_seed(recipe.seed * 1000 + self.dist.rank)
        self.net = self.dist.wrap(self.model)  # what the training forward runs through (DDP's wrapper)
        self.params = lora_parameters(self.model)
        self.optimizer = make_optimizer(self.params.values(), self.optimizer_name, recipe.learning_rate,
                                        recipe.weight_decay, self.device)
        warmup = recipe.warmup_steps or int(recipe.warmup_ratio * self.total_steps)
        self.scheduler = make_scheduler(self.optimizer, recipe.lr_scheduler, warmup, self.total_steps)
        self.counters = Counters()
        self.scaler = self._loss_scaler()

    def _loss_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 gradients underflow without loss scaling (bf16 has fp32's range and needs none): dynamic scaling,
        as torch.amp does it -- steps whose gradients overflow are skipped and the scale is lowered."""
        if self.dtype != torch.float16:
            return None
        scaler = torch.amp.GradScaler(self.device.type)
        tqdm.write(f"compute_dtype float16: dynamic loss scaling (torch.amp.GradScaler, initial scale "
                   f"{scaler.get_scale():g}); overflowing steps are skipped", file=sys.stderr)
        return scaler

    def autocast(self):
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    def _eval(self) -> float | None:
        if self.eval_data is None:
            return None
        return evaluate(self.model, self.eval_data, self.recipe.batch_size, self.pad_id, self.device,
                        self.autocast, self.recipe.max_eval_batches, self.dist)

    def _step(self, batch_iter) -> tuple[float, float, int] | None:
        """One optimizer step; returns (loss, grad norm, real tokens), or None if a non-finite step was skipped."""
        micro = [next(batch_iter) for _ in range(self.recipe.gradient_accumulation_steps)]
        local_target = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        (n_target,) = self.dist.total(local_target)  # the loss is over every rank's tokens: exact, not a mean
        total = 0.0
        for i, batch in enumerate(micro):
            with self.dist.micro_batch(self.net, last=i == len(micro) - 1), self.autocast():
                loss, _ = token_loss_sum(self.net, {k: v.to(self.device) for k, v in batch.items()})
            scaled = loss * self.dist.grad_scale / max(n_target, 1)
            (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()
            total += loss.item()
        (total,) = self.dist.total(total)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = list(self.params.values())
        max_norm = self.recipe.max_grad_norm or float("inf")
        grad_norm = self.dist.grad_norm(params, max_norm)
        step = self.counters.step + 1
        if self.scaler is not None and math.isfinite(total) and not math.isfinite(grad_norm):
            return self._overflow(step)
        if not (math.isfinite(total) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            if self.recipe.on_nonfinite == "stop":
                raise TrainingError(
                    f"step {step}: non-finite {'loss' if not math.isfinite(total) else 'gradient norm'}; "
                    f"stopped, the last good checkpoint is kept in {self.out / 'checkpoints'} "
                    "(lower learning_rate, or set on_nonfinite=skip)"
                )
            log.warning("step %d: non-finite loss or gradient; step skipped", step)
            self.scheduler.step()
            return None
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        (tokens,) = self.dist.total(sum(real_tokens(b) for b in micro))
        return total / max(n_target, 1), grad_norm, int(tokens)

    def _adapter_files(self) -> AdapterFiles:
        """The adapter as saved, whole on every rank (a sharded model's tensors are gathered: all ranks call it)."""
        tensors = self.dist.full_tensors(adapter_state_dict(self.model))
        return AdapterFiles.of(self.model, self.recipe.lora, str(Path(self.recipe.model).resolve()),
                               chat_template=self.chat_template, tensors=tensors)

    def state_dict(self) -> dict[str, Any]:
        """Everything that decides the next step (torchtune's recipe state): adapter, optimizer, schedule, data
        position, counters, RNG. `runstate` lays it out on disk; only the trainer reads or changes it.

        Distributed, every rank must call it: the adapter and optimizer state are gathered whole (the same state
        whatever the sharding), and each rank's RNG is kept under its own key."""
        rngs = self.dist.gather_objects(_rng_state())
        optimizer = (self.dist.optimizer_state(self.net, self.optimizer) if self.dist.active
                     else self.optimizer.state_dict())
        return {
            "adapter": self._adapter_files(),
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "data": self.batches.state_dict(),
            "counters": asdict(self.counters),
            "total_steps": self.total_steps,
            "world_size": self.dist.world,
            "strategy": self.dist.strategy,
            "rng": {_rng_key(k, rank): v for rank, rng in enumerate(rngs) for k, v in rng.items()},
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s output; a run it does not fit (another length, world, adapter shape or
        set of adapted layers) is refused with the difference named, before anything is changed. Distributed,
        rank 0's optimizer state is enough: each rank receives its shard of it."""
        if state["total_steps"] != self.total_steps:
            raise CheckpointError(f"was saved by a run of {state['total_steps']} steps, this recipe runs "
                                  f"{self.total_steps}; use a new output_dir or restore the recipe")
        self._check_world(state.get("world_size", 1), state.get("strategy", "none"))
        self._check_lora(state["adapter"].config)
        load_adapter_state(self.model, state["adapter"].tensors, copy=self.dist.load_into)
        if self.dist.active:
            self.dist.load_optimizer_state(self.net, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["data"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.counters = Counters(**state["counters"])
        rng, rank = state["rng"], self.dist.rank
        torch.set_rng_state(rng[_rng_key("torch_cpu", rank)])
        if _rng_key("torch_cuda", rank) in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng[_rng_key("torch_cuda", rank)])

    def _check_world(self, saved: int, strategy: str) -> None:
        """The per-rank RNG streams (and the data each rank drew) belong to the world that wrote them."""
        same_kind = (strategy == "none") == (self.dist.strategy == "none")
        if saved != self.dist.world or not same_kind:
            launch = f"torchrun --nproc-per-node {saved}" if strategy != "none" else "a single process (no torchrun)"
            raise CheckpointError(
                f"was saved by a run on {saved} process(es) (strategy {strategy}), this one runs on "
                f"{self.dist.world} (strategy {self.dist.strategy}); resume it with {launch}, or start a new output_dir"
            )

    def _check_lora(self, saved: dict[str, Any]) -> None:
        lora = self.recipe.lora
        for key, ours, theirs in (("r", lora.r, saved.get("r")), ("alpha", lora.alpha, saved.get("lora_alpha")),
                                  ("dropout", lora.dropout, saved.get("lora_dropout")),
                                  ("use_rslora", lora.use_rslora, saved.get("use_rslora"))):
            if ours != theirs:
                raise CheckpointError(f"was saved with lora.{key}={theirs}, this recipe has lora.{key}={ours}; "
                                      "use a new output_dir or restore the recipe")

    def _overflow(self, step: int) -> None:
        """An fp16 step whose scaled gradients overflowed: the scaler skips it and lowers the scale."""
        self.scaler.step(self.optimizer)  # sees the inf it recorded in unscale_ and does not step
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        log.warning("step %d: fp16 gradients overflowed; step skipped, loss scale now %g", step,
                    self.scaler.get_scale())
        return None

    def _save(self) -> None:
        state = self.state_dict()  # every rank joins the gathers
        if self.dist.is_main:
            runstate.save_checkpoint(self.out, self.counters.step, state, self.recipe.save_total_limit)
        self.dist.barrier()  # the others wait until the directory is complete

    def _resume(self) -> int | None:
        """Load the newest complete checkpoint; None when starting fresh."""
        found = runstate.complete_checkpoints(self.out)
        if not found:
            return None
        step, d = found[-1]
        state = runstate.load_checkpoint(d, self.device, optimizer=self.dist.is_main)
        try:
            self.load_state_dict(state)
        except CheckpointError as e:
            raise CheckpointError(f"{d}: {e}") from None
        return step

    def run(self) -> TrainResult:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"{self.out}: cannot create the output directory ({e.strerror}); "
                                  "set output_dir to a writable place") from None
        main = self.dist.is_main
        if main:
            dump_recipe(self.recipe, self.out / "recipe.yaml")
        self._announce()
        resumed = self._resume()
        if resumed is not None and main:
            tqdm.write(f"resuming from step {resumed}", file=sys.stderr)
        # a fresh start keeps no records, not even the step-0 eval of a run killed before its first checkpoint
        upto = self.counters.step if resumed is not None else -1
        self.dist.barrier()  # every rank reads the log before rank 0 cuts it back
        metrics = MetricsLog(self.out, upto, tensorboard=self.recipe.tensorboard and main, readonly=not main)
        before = self._eval() if resumed is None else metrics.first("eval_loss")
        if resumed is None and before is not None:
            metrics.write({"step": 0, "eval_loss": before, "eval_ppl": math.exp(before)})
        interrupted = self._loop(metrics)
        after = None
        if not interrupted:
            after = self._finish(metrics)
        metrics.close()
        return TrainResult(self.out, self.counters.step, before, after, resumed, interrupted, self.dist.is_main)

    def _announce(self) -> None:
        """The run's first line when distributed: strategy, world size, and the 4-bit base each rank holds."""
        if not self.dist.active:
            return
        held = self.dist.gather_objects(self.dist.local_bytes(quant_state_parameters(self.model).values()))
        if self.dist.is_main:
            swapped = self.optimizer_name != self.recipe.optimizer
            tqdm.write(f"distributed: strategy {self.dist.strategy}, world size {self.dist.world}, 4-bit base bytes "
                       f"per rank {held} (whole base {sum(held) if self.dist.strategy == 'fsdp' else held[0]})"
                       + (f"; optimizer {self.recipe.optimizer} runs as torch's AdamW (the same update; bitsandbytes "
                          "cannot step sharded parameters)" if swapped else ""), file=sys.stderr)

    def _loop(self, metrics: MetricsLog) -> bool:
        r = self.recipe
        self.model.train()
        batch_iter = iter(self.batches)
        bar = tqdm(total=self.total_steps, initial=self.counters.step, desc="train", disable=not self.progress,
                   dynamic_ncols=True)
        t0 = time.perf_counter() - self.counters.elapsed_s
        with _StopFlag() as stop:
            while self.counters.step < self.total_steps:
                result = self._step(batch_iter)
                c = self.counters
                c.step += 1
                c.elapsed_s = time.perf_counter() - t0
                if result is None:
                    c.skipped_steps += 1
                else:
                    loss, grad_norm, tokens = result
                    c.tokens_seen += tokens
                    c.loss_window.append(loss)
                    if c.step % r.logging_steps == 0 or c.step == self.total_steps:
                        lr = self.scheduler.get_last_lr()[0]
                        window = c.loss_window
                        rec = {"step": c.step, "loss": sum(window) / len(window), "lr": lr, "grad_norm": grad_norm,
                               "tokens_seen": c.tokens_seen, "elapsed_s": round(c.elapsed_s, 3),
                               "tokens_per_s": round(c.tokens_seen / max(c.elapsed_s, 1e-9), 1),
                               "world_size": self.dist.world}
                        if self.scaler is not None:
                            rec["loss_scale"] = self.scaler.get_scale()
                        metrics.write(rec)
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", tok_s=rec["tokens_per_s"])
                        c.loss_window = []
                if r.eval_steps and c.step % r.eval_steps == 0 and c.step < self.total_steps:
                    loss = self._eval()
                    if loss is not None:
                        metrics.write({"step": c.step, "eval_loss": loss, "eval_ppl": math.exp(loss)})
                stopping = self.dist.any(stop.requested)  # every rank stops at the same step
                if (r.save_steps and c.step % r.save_steps == 0) or stopping:
                    metrics.flush()
                    self._save()
                bar.update(1)
                if stopping:
                    bar.close()
                    if self.dist.is_main:
                        tqdm.write(f"stopped at step {c.step}; run the same command again to resume",
                                   file=sys.stderr)
                    return True
        bar.close()
        return False

    def _finish(self, metrics: MetricsLog) -> float | None:
        step = self.counters.step  # already logged when a kill came after the final checkpoint: log it once
        after = next((r["eval_loss"] for r in metrics.records if r.get("step") == step and "eval_loss" in r), None)
        if after is None:
            after = self._eval()
            if after is not None:
                metrics.write({"step": step, "eval_loss": after, "eval_ppl": math.exp(after)})
        metrics.flush()
        self._save()
        adapter = self._adapter_files()  # every rank joins the gather; rank 0 writes
        if self.dist.is_main:
            with AtomicDir(self.out / "adapter", overwrite=True) as tmp:  # never half an adapter, even on a full disk
                adapter.write(tmp)
            metrics.plot(self.out / "loss.png")
        self.dist.barrier()
        return after


def train(recipe: Recipe, progress: bool = True) -> TrainResult:
    trainer = Trainer(recipe, progress)
    try:
        return trainer.run()
    finally:
        trainer.dist.close()  # the process group too, also after a failure

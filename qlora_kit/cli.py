"""`qlora-kit` command line: parse, call the library, turn known failures into one clear line.

Every subcommand is a thin function over the library. A `QloraKitError` (or an OS error about a path) prints
`qlora-kit: error: ...` and exits 2 with no traceback; `--debug` re-raises to show it.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import sys
from pathlib import Path

from qlora_kit.errors import QloraKitError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _quantize(args: argparse.Namespace) -> int:
    from qlora_kit.convert import quantize_checkpoint
    from qlora_kit.quant import QuantConfig

    quant = QuantConfig(args.quant_type, not args.no_double_quant, args.blocksize, args.scale_search, args.calibrate)
    report = quantize_checkpoint(
        Path(args.model_dir), Path(args.out_dir), quant, int(args.max_shard_gb * 1024**3), args.trust_remote_code
    )
    bits = 8 * report.bytes_out / max(report.params_quantized, 1)
    print(
        f"wrote {report.out_dir}: {report.quantized} linear layers in {quant}"
        f"{', scale search' if quant.scale_search else ''}{', calibrated' if quant.calibration else ''} "
        f"({quant.bits_per_param():.3f} bits/param), {report.kept} tensors kept, "
        f"{report.bytes_in / 1e9:.2f} GB -> {report.bytes_out / 1e9:.2f} GB in {report.shards} shard(s)"
        f" [{bits:.2f} bits per quantized param overall]"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from qlora_kit.config import load_recipe
    from qlora_kit.train import train

    recipe = load_recipe(args.recipe, args.overrides)
    result = train(recipe, progress=not args.no_progress)
    if result.interrupted:
        return EXIT_INTERRUPTED
    if not result.main:  # under torchrun only rank 0 reports
        return 0
    before, after = result.eval_loss_before, result.eval_loss_after
    if before is not None and after is not None:
        print(f"eval loss {before:.4f} -> {after:.4f} (perplexity {math.exp(before):.2f} -> {math.exp(after):.2f})")
    print(f"adapter: {result.output_dir / 'adapter'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from qlora_kit.export import export_merged
    from qlora_kit.quant import QuantConfig

    given = args.quant_type is not None or args.no_double_quant or args.blocksize is not None
    quant = QuantConfig(args.quant_type or "nf4", not args.no_double_quant, args.blocksize or 64) if given else None
    report = export_merged(
        Path(args.adapter_dir), Path(args.out), base=args.base, merge_into=args.merge_into, quant=quant,
        max_shard_bytes=int(args.max_shard_gb * 1024**3), trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress,
    )
    q = report.quant
    how = f"{q}, " if q is not None else ""
    print(
        f"wrote {report.out_dir}: adapter merged into {report.merged} linear layers of {report.base_dir} "
        f"({report.merge_into} weights: {how}layers from {report.layers_from}), {report.dequantized} more written "
        f"dequantized, {report.kept} tensors kept; "
        f"{str(report.dtype).removeprefix('torch.')}, {report.bytes_out / 1e9:.2f} GB in {report.shards} shard(s)"
    )
    return 0


def _adapter_specs(specs: list[str]) -> dict[str, Path]:
    from qlora_kit.errors import ConfigError

    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {spec!r}: expected NAME=DIR")
        adapters[name] = Path(path)
    return adapters


def _generate(args: argparse.Namespace) -> int:
    from qlora_kit.generate import read_prompt_file, run

    adapters = _adapter_specs(args.adapter)
    rows = read_prompt_file(Path(args.file)) if args.file else [{"prompt": args.prompt}]
    run(args.model_dir, adapters, rows, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from qlora_kit.serve import serve

    serve(args.model_dir, _adapter_specs(args.adapter), host=args.host, port=args.port, max_batch=args.max_batch,
          max_adapters=args.max_adapters, trace=Path(args.trace) if args.trace else None, trace_text=args.trace_text,
          api_key=args.api_key or os.environ.get("QLORA_KIT_API_KEY"), dtype=args.dtype, device=args.device)
    return 0


def _traces(args: argparse.Namespace) -> int:
    from qlora_kit import traces

    summaries = traces.summarise(traces.read_traces([Path(f) for f in args.files]))
    print(traces.to_json(summaries) if args.json else traces.table(summaries))
    png = Path(args.png) if args.png else Path(args.files[0]).with_suffix(".png")
    traces.plot(summaries, png)
    print(f"plot: {png}", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from qlora_kit.evaluate import EvalConfig, render_text, run_eval, write_report
    from qlora_kit.scoring import METRICS

    cfg = EvalConfig(Path(args.model_dir), Path(args.data), _adapter_specs(args.adapter), args.format,
                     args.max_new_tokens, tuple(args.metric or METRICS), args.scorer, args.batch_size, args.bootstrap,
                     args.seed, args.latency_rows, device=args.device)
    report = run_eval(cfg, progress=lambda line: print(line, file=sys.stderr))
    print(render_text(report))
    if args.out:
        print(f"wrote {write_report(report, Path(args.out))}: eval.json, eval.md, eval.png, predictions.jsonl")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from qlora_kit.inspect_adapter import inspect_adapter, render_text, write_report

    report = inspect_adapter(Path(args.adapter_dir), args.base and Path(args.base), [Path(p) for p in args.compare])
    print(render_text(report))
    if args.out:
        print(f"wrote {args.out}: {', '.join(write_report(report, Path(args.out)))}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from qlora_kit.fit import plan_report

    report = plan_report(args.source, args.overrides, gpu_gib=args.gpu, fit=args.fit,
                         attn_implementation=args.attn, device=args.device, gpus=args.gpus,
                         strategy=args.strategy, offload_base=args.offload_base)
    print(report.to_json() if args.json else report.render())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-kit", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="write a checkpoint in the bitsandbytes 4-bit layout")
    q.add_argument("model_dir", help="HF checkpoint directory (config.json + safetensors)")
    q.add_argument("out_dir", help="output directory (must not exist)")
    q.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    q.add_argument("--no-double-quant", action="store_true", help="keep per-block absmax in fp32")
    q.add_argument("--blocksize", type=int, default=64, help="elements per absmax block (32..4096)")
    q.add_argument("--scale-search", action="store_true",
                   help="choose each block's absmax for the lowest input-weighted error, the weights from random "
                        "tokens run through the model, no data (same format)")
    q.add_argument("--calibrate", metavar="FILE",
                   help="text / JSONL ('text' field): GPTQ-style rounding on its first tokens (same format)")
    q.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size of the output")
    q.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code")
    q.set_defaults(func=_quantize)

    t = sub.add_parser("train", help="fine-tune LoRA adapters on a 4-bit base from a YAML recipe")
    t.add_argument("recipe", help="recipe YAML (see recipes/)")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. lora.r=8 max_steps=100")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    t.set_defaults(func=_train)

    g = sub.add_parser("generate", help="generate text from a 4-bit base with zero or more adapters")
    g.add_argument("model_dir", help="HF checkpoint directory (bf16 or bitsandbytes 4-bit)")
    g.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="a PEFT adapter; repeatable")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (the chat template is applied when the tokenizer has one)")
    src.add_argument("--file", help="JSONL of prompts: {prompt} | {instruction, input} | {messages}")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.set_defaults(func=_generate)

    s = sub.add_parser("serve", help="an OpenAI-compatible server: one 4-bit base, many adapters, batched")
    s.add_argument("model_dir", help="HF checkpoint directory (bf16 or bitsandbytes 4-bit)")
    s.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="a PEFT adapter; repeatable")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    s.add_argument("--max-adapters", type=int, default=8, help="adapters held at once; more are swapped in (LRU)")
    s.add_argument("--trace", metavar="FILE.jsonl", help="append one JSON line per request")
    s.add_argument("--trace-text", action="store_true", help="also write prompt and completion text to --trace")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $QLORA_KIT_API_KEY, if set)")
    s.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16", help="compute dtype")
    s.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda when there is one)")
    s.set_defaults(func=_serve)

    tr = sub.add_parser("traces", help="summarise serve traces per adapter: a table and a PNG")
    tr.add_argument("files", nargs="+", metavar="FILE.jsonl")
    tr.add_argument("--png", help="where the plot goes (default: the first file with .png)")
    tr.add_argument("--json", action="store_true", help="print JSON instead of the table")
    tr.set_defaults(func=_traces)

    e = sub.add_parser("export", help="merge an adapter into its base and write a plain HF checkpoint")
    e.add_argument("adapter_dir", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    e.add_argument("--out", required=True, help="output directory (must not exist)")
    e.add_argument("--base", help="base model directory (default: the adapter's base_model_name_or_path)")
    e.add_argument("--merge-into", choices=("dequantized", "original"), default="dequantized",
                   help="dequantized: dequant(quant(W)) + B·A, what the adapter was trained against (default); "
                        "original: W + B·A")
    e.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size of the output")
    e.add_argument("--quant-type", choices=("nf4", "fp4"),
                   help="the training's 4-bit type (default: as the adapter's qlora_kit.json records, else nf4)")
    e.add_argument("--no-double-quant", action="store_true", help="the training kept absmax in fp32")
    e.add_argument("--blocksize", type=int,
                   help="the training's quantization block size (default: as recorded, else 64)")
    e.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=_export)

    v = sub.add_parser("eval", help="base and adapters side by side on held-out rows: quality, latency, cost")
    v.add_argument("model_dir", help="base model directory (bf16 or bitsandbytes 4-bit)")
    v.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="a PEFT adapter; repeatable")
    v.add_argument("--data", required=True, help="held-out rows (JSONL) in a training format")
    v.add_argument("--format", choices=("auto", "alpaca", "messages", "text"), default="auto")
    v.add_argument("--max-new-tokens", type=int, default=64, help="greedy answer length (0: loss only)")
    v.add_argument("--metric", action="append", choices=("exact", "contains", "f1"), help="default: all; repeatable")
    v.add_argument("--scorer", metavar="MODULE:FUNCTION", help="your own score(prediction, reference[, row])")
    v.add_argument("--batch-size", type=int, default=8, help="rows per batch (each row runs once per model)")
    v.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap rounds")
    v.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    v.add_argument("--latency-rows", type=int, default=4, help="prompts timed per model")
    v.add_argument("--device", help="default: cuda when available")
    v.add_argument("--out", help="write eval.json, eval.md, eval.png and predictions.jsonl here")
    v.set_defaults(func=_eval)

    n = sub.add_parser("inspect", help="what an adapter learned: ΔW spectra, effective rank, subspace similarity")
    n.add_argument("adapter_dir", help="PEFT adapter directory")
    n.add_argument("--base", help="base model directory: adds |ΔW|/|W| and the amplification factor")
    n.add_argument("--compare", action="append", default=[], metavar="ADAPTER_DIR", help="repeatable")
    n.add_argument("--out", help="write inspect.json, spectra.png and phi heatmaps here")
    n.set_defaults(func=_inspect)

    p = sub.add_parser("plan", help="GPU memory of one training step, from the model config alone")
    p.add_argument("source", help="recipe YAML, HF model directory or config.json")
    p.add_argument("overrides", nargs="*", help="dotted recipe key=value overrides, e.g. batch_size=4 lora.r=16")
    p.add_argument("--gpu", type=float, metavar="GiB", help="GPU memory to check against, in GiB")
    p.add_argument("--fit", action="store_true", help="propose the least change that fits --gpu")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="device the run is planned for")
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="plan per GPU for a run on N processes")
    p.add_argument("--strategy", choices=("fsdp", "ddp"), help="with --gpus: default the recipe's (fsdp)")
    p.add_argument("--offload-base", action="store_true",
                   help="FSDP CPU offload: the sharded base, adapters and optimizer states in host memory")
    p.set_defaults(func=_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    # here, not under __main__: the installed `qlora-kit` script calls main() directly. Tokenizers would
    # otherwise warn (and risk a deadlock) when a dataloader or the export's threads fork after tokenizing.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `train recipe.yaml --no-progress lora.r=8`: overrides may follow the options too.
    if extra and hasattr(args, "overrides") and not any(x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(levelname)s: %(message)s")
    if not args.debug:  # bitsandbytes warns on import about optional hub kernels we never use
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except QloraKitError as e:
        if args.debug:
            raise
        print(f"qlora-kit: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        hint = "; free some space and run the same command again" if e.errno == errno.ENOSPC else ""
        print(f"qlora-kit: error: {where}{e.strerror or e}{hint}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qlora-kit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

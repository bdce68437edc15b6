"""The Python API object returned by `mxq.load`: tokenizer, logits, streaming generation.

    model = mxq.load("smol.mxq")                       # device="cpu", cache_dequantized=False
    ids = model.tokenizer.encode("Hello")
    logits = model.logits(ids)                         # (len(ids), vocab) float32, empty cache
    for piece in model.generate("Once upon a time", max_new_tokens=32, temperature=0.7, seed=1):
        print(piece, end="", flush=True)
    print(model.last_stats)                            # prefill/decode token counts and seconds
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from ..format_spec import MxqFile, MxqFormatError
from .backends import get_backend
from .config import ModelConfig
from .errors import ModelError
from .model import Model
from .sampler import Sampler, is_int
from .tokenizer import Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # time for tokens after the first (each needs one decode step)
    stop_reason: str = ""  # "eos", "limit" or "context"

    def summary(self) -> str:
        prefill = self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0
        steps = max(self.new_tokens - 1, 0)
        decode = steps / self.decode_seconds if self.decode_seconds else 0.0
        return (f"prefill: {self.prompt_tokens} tokens, {prefill:.1f} tok/s; decode: {steps} tokens, "
                f"{decode:.1f} tok/s; stopped at {self.stop_reason or 'end'}")


class LoadedModel:
    """A .mxq file opened for inference on one device."""

    def __init__(self, path, device: str = "cpu", cache_dequantized: bool = False, verify: bool = True):
        t0 = time.perf_counter()
        self.path = str(path)
        try:
            self.file = MxqFile.open(path)
        except FileNotFoundError:
            raise ModelError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise ModelError(f"{path}: is a directory, not an .mxq file") from None
        self.backend = None
        try:
            if verify:
                _check_checksums(self.file)
            self.config = ModelConfig.from_json(self.file.model)
            self.backend = get_backend(device, cache_dequantized=cache_dequantized)
            self.tokenizer = Tokenizer.from_file(self.file, self.config)
            self.model = Model.from_file(self.file, self.config, self.backend)
            self.backend.loaded(self.file)
        except BaseException:
            if self.backend is not None:
                self.backend.close()
            self.file.close()
            raise
        self.device = device
        self.load_seconds = time.perf_counter() - t0
        self.last_stats = GenerationStats()

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    def close(self) -> None:
        self.model = None
        self.backend.close()
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- scoring -----------------------------------------------------------------------------------
    def logits(self, ids) -> np.ndarray:
        """Logits for every position of `ids` run from an empty cache: (len(ids), vocab) float32."""
        return self._open_model().logits(self._token_ids(ids))

    def _open_model(self):
        if self.model is None:
            raise ModelError("the model is closed")
        return self.model

    def _token_ids(self, ids) -> list[int]:
        """`ids` as Python ints, each a token of the vocabulary (ModelError naming the first that is not)."""
        vocab = self.config.vocab_size
        for i in ids:
            if not is_int(i) or not 0 <= i < vocab:
                raise ModelError(f"token id {i!r:.40} is not an integer in the vocabulary [0, {vocab})")
        return [int(i) for i in ids]

    # -- generation --------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str, chat: bool = False) -> list[int]:
        if not isinstance(prompt, str):
            raise ModelError(f"the prompt must be a str, got {type(prompt).__name__}")
        ids = self.tokenizer.encode_chat(prompt) if chat else self.tokenizer.encode(prompt)
        if not ids:
            raise ModelError("the prompt is empty (no tokens) and the model adds no BOS token")
        if len(ids) >= self.context_length:
            raise ModelError(f"the prompt has {len(ids)} tokens; the model's context is {self.context_length} "
                             "tokens, leaving no room to generate")
        return ids

    def generate_ids(self, ids, max_new_tokens: int = 128, temperature: float = 0.0, top_k=None, top_p=None,
                     seed=None):
        """Yield new token ids after prompt `ids` until an EOS id (not yielded), max_new_tokens, or the
        end of the context. Statistics go to self.last_stats."""
        if not is_int(max_new_tokens) or max_new_tokens < 0:
            raise ModelError(f"the number of new tokens must be an integer >= 0, got {max_new_tokens!r:.40}")
        model, ids = self._open_model(), self._token_ids(ids)
        if len(ids) >= self.context_length:
            raise ModelError(f"the prompt has {len(ids)} tokens; the model's context is {self.context_length} "
                             "tokens, leaving no room to generate")
        sample = Sampler(temperature, top_k, top_p, seed)
        stats = self.last_stats = GenerationStats(prompt_tokens=len(ids))
        limit = min(max_new_tokens, self.context_length - len(ids))
        if limit == 0:
            stats.stop_reason = "limit" if max_new_tokens == 0 else "context"
            return
        cache = model.new_cache(len(ids) + limit)
        t0 = time.perf_counter()
        logits = self.backend.to_host(model.forward(ids, cache, last_only=True))[-1]  # (vocab,)
        stats.prefill_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        while True:
            token = sample(logits)
            stats.new_tokens += 1
            if token in self.tokenizer.eos_ids:
                stats.stop_reason = "eos"
                break
            yield token
            if stats.new_tokens >= limit:
                stats.stop_reason = "limit" if limit == max_new_tokens else "context"
                break
            logits = self.backend.to_host(model.forward([token], cache))[-1]
            stats.decode_seconds = time.perf_counter() - t0
        stats.decode_seconds = time.perf_counter() - t0

    def generate(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_k=None,
                 top_p=None, seed=None, chat: bool = False):
        """Yield text pieces of the continuation of `prompt` (a str; with chat=True it is sent as a
        user message through the file's chat template). Pieces never split a UTF-8 character."""
        ids = self.prompt_ids(prompt, chat=chat)
        stream = self.tokenizer.stream(ids)
        for token in self.generate_ids(ids, max_new_tokens, temperature, top_k, top_p, seed):
            piece = stream.push(token)
            if piece:
                yield piece
        rest = stream.flush()
        if rest:
            yield rest


def _check_checksums(file: MxqFile) -> None:
    """Every crc32 (a packed tensor's, or each blob's) and the zero padding (SPEC.md §9), read once in bounded chunks;
    the content rules are checked as each tensor is prepared (Backend.check_outliers)."""
    problems = file.verify(content=False)
    if problems:
        more = f" (and {len(problems) - 1} more; `mxq verify` lists them)" if len(problems) > 1 else ""
        raise MxqFormatError(file.path, f"damaged: {problems[0]}{more}")


def load(path, device: str = "cpu", cache_dequantized: bool = False, verify: bool = True,
         **options) -> LoadedModel:
    """Open a .mxq file for inference.

    device: "cpu" (NumPy) or "cuda" (needs the CUDA backend and a GPU).
    cache_dequantized: False (default, "lean") keeps weights packed in the memory-mapped file and
    dequantizes each matrix when it is used — memory ≈ the file size; True dequantizes every matrix
    once at load to float32 — 4 bytes per weight more memory, several times faster decoding.
    verify: check every weight checksum before use (one read of the file; False skips it). The JSON
    metadata and the tokenizer blob are checked at every open regardless."""
    if options:
        raise ModelError(f"unknown option(s) for load: {', '.join(sorted(options))}")
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(text, str) or "\0" in text:
        raise ModelError(f"the path must be a str or os.PathLike without NUL characters, got {path!r:.60}")
    return LoadedModel(path, device=device, cache_dequantized=cache_dequantized, verify=verify)

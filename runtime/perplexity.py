"""Perplexity of a text under a loaded model, by the two usual methods (the text tokenized once).

chunks (default; GPTQ-style): the token stream is cut into non-overlapping ctx-token chunks
    (a trailing partial chunk is dropped); each chunk runs from an empty cache, and the loss is the
    NLL of positions 1..ctx-1 predicted from the chunk itself. ppl = exp(mean NLL over all of them).
stride (transformers' sliding window, docs/transformers/perplexity): windows of up to ctx tokens
    starting every `stride` tokens; each window scores only the tokens not scored by the previous
    one. Reproduces that recipe exactly, including its weighting: a window's mean loss counts
    (newly scored tokens − 1) times.
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np

from .errors import ModelError

HEAD_ROWS = 512  # positions per lm_head block: bounds the (rows, vocab) logits in memory


def _nll(lm, hidden, targets: np.ndarray) -> np.ndarray:
    """NLL of targets[i] given hidden state row i, lm_head applied in blocks. (n,) float64."""
    be, out = lm.backend, []
    for r0 in range(0, len(targets), HEAD_ROWS):
        logits = lm.model.logits_from_hidden(hidden[r0:r0 + HEAD_ROWS])  # (rows, vocab)
        out.append(be.token_nll(logits, targets[r0:r0 + HEAD_ROWS]))
    return np.concatenate(out)


def perplexity(lm, ids, ctx: int = 2048, stride: int | None = None, max_chunks: int | None = None,
               progress: bool = True) -> dict:
    """lm: a LoadedModel; ids: the tokenized text. Returns a JSON-ready report."""
    from tqdm import tqdm

    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = len(ids)
    if ctx < 2:
        raise ModelError(f"--ctx must be at least 2, got {ctx}")
    if ctx > lm.context_length:
        raise ModelError(f"--ctx {ctx} exceeds the model's context of {lm.context_length} tokens")
    if stride is not None and not 1 <= stride <= ctx:
        raise ModelError(f"--stride must be between 1 and --ctx ({ctx}), got {stride}")
    if max_chunks is not None and max_chunks < 1:
        raise ModelError(f"--max-chunks must be at least 1, got {max_chunks}")
    model = lm.model
    t0 = time.perf_counter()
    if stride is None:
        n_chunks = n // ctx
        if n_chunks == 0:
            raise ModelError(f"the text has {n} tokens, fewer than one chunk of --ctx {ctx}; use a smaller --ctx")
        n_chunks = min(n_chunks, max_chunks or n_chunks)
        total, count = 0.0, 0
        for i in tqdm(range(n_chunks), desc="perplexity", unit="chunk", file=sys.stderr, disable=not progress):
            chunk = ids[i * ctx:(i + 1) * ctx]
            hidden = model.hidden_states(chunk, model.new_cache(ctx))  # (ctx, hidden)
            nll = _nll(lm, hidden[:-1], chunk[1:])  # positions 1..ctx-1
            total, count = total + float(nll.sum()), count + len(nll)
        report = {"method": "chunks", "ctx": ctx, "stride": None, "chunks": n_chunks}
    else:
        if n < 2:
            raise ModelError(f"the text has {n} tokens; perplexity needs at least 2")
        starts = list(range(0, n, stride))
        windows = 0
        total, count, prev_end = 0.0, 0, 0
        bar = tqdm(total=min(len(starts), max_chunks or len(starts)), desc="perplexity", unit="window",
                   file=sys.stderr, disable=not progress)
        for begin in starts:
            if max_chunks is not None and windows >= max_chunks:
                break
            end = min(begin + ctx, n)
            new = end - prev_end  # tokens this window scores (trg_len in the HF recipe)
            window = ids[begin:end]
            if len(window) < 2:  # a last window of one token scores nothing (HF's loss would be NaN)
                break
            first = max(1, len(window) - new)  # first scored position (labels shift by one)
            hidden = model.hidden_states(window[:-1], model.new_cache(len(window)))
            nll = _nll(lm, hidden[first - 1:], window[first:])
            total += float(nll.mean()) * (new - 1)  # the HF recipe's weighting
            count += new - 1
            prev_end, windows = end, windows + 1
            bar.update(1)
            if end == n:
                break
        bar.close()
        report = {"method": "stride", "ctx": ctx, "stride": stride, "chunks": windows}
    if count == 0:
        raise ModelError("no tokens were scored")
    mean = total / count
    report.update(tokens=n, scored_tokens=count, nll=mean, ppl=math.exp(mean),
                  seconds=round(time.perf_counter() - t0, 3))
    return report

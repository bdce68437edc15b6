"""Perplexity of a text under a loaded model, by the two usual methods (the text tokenized once).

chunks (default; GPTQ-style): the token stream is cut into non-overlapping ctx-token chunks
    (a trailing partial chunk is dropped); each chunk runs from an empty cache, and the loss is the
    NLL of positions 1..ctx-1 predicted from the chunk itself. ppl = exp(mean NLL over all of them).
stride (transformers' sliding window, docs/transformers/perplexity): windows of up to ctx tokens
    starting every `stride` tokens; each window scores only the tokens not scored by the previous
    one. Reproduces that recipe exactly, including its weighting: a window's mean loss counts
    (newly scored tokens − 1) times.

Noise: each chunk (window) is one sample; the report's 95% interval is mean NLL ± 1.96 standard
errors over them (the ratio estimator for unequal sizes). With a reference model (e.g. the fp16 file of
the same checkpoint) both run on the same chunks: the ratio of perplexities gets its interval from the
paired per-chunk differences, far tighter than either perplexity's own, and the report adds the mean
KL divergence KL(reference ‖ model) per token and how often both models' top tokens agree.
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np

from .errors import ModelError

HEAD_ROWS = 512  # positions per lm_head block: bounds the (rows, vocab) logits in memory
COMPARE_ELEMENTS = 1 << 24  # with a reference: (rows, vocab) float32 log-probabilities per block, two models
Z95 = 1.959964  # two-sided 95% quantile of the normal distribution
MAX_NLL = 700.0  # nats per token: exp() of more leaves float64 (a perplexity of 1e304)


def _nll(lm, hidden, targets: np.ndarray) -> np.ndarray:
    """NLL of targets[i] given hidden state row i, lm_head applied in blocks. (n,) float64."""
    be, out = lm.backend, []
    for r0 in range(0, len(targets), HEAD_ROWS):
        logits = lm.model.logits_from_hidden(hidden[r0:r0 + HEAD_ROWS])  # (rows, vocab)
        out.append(be.token_nll(logits, targets[r0:r0 + HEAD_ROWS]))
    return np.concatenate(out)


def _log_softmax(lm, logits) -> np.ndarray:
    """(rows, vocab) logits on the model's backend → host float32 log-probabilities."""
    z = np.asarray(lm.backend.to_host(logits), dtype=np.float32)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)


def _compared(lm, ref, hidden, ref_hidden, targets: np.ndarray) -> dict:
    """Per target (n,) float64: the model's and the reference's NLL, KL(reference ‖ model) of the
    next-token distributions, and whether their most likely tokens agree."""
    rows = max(1, min(HEAD_ROWS, COMPARE_ELEMENTS // lm.model.config.vocab_size))
    out = {"nll": [], "ref_nll": [], "kl": [], "agree": []}
    for r0 in range(0, len(targets), rows):
        t = targets[r0:r0 + rows]
        lq = _log_softmax(lm, lm.model.logits_from_hidden(hidden[r0:r0 + rows]))  # (rows, vocab)
        lr = _log_softmax(ref, ref.model.logits_from_hidden(ref_hidden[r0:r0 + rows]))
        at = np.arange(len(t))
        out["nll"].append(-lq[at, t].astype(np.float64))
        out["ref_nll"].append(-lr[at, t].astype(np.float64))
        out["kl"].append((np.exp(lr) * (lr - lq)).sum(axis=-1, dtype=np.float64))
        out["agree"].append((lq.argmax(axis=-1) == lr.argmax(axis=-1)).astype(np.float64))
    return {key: np.concatenate(parts) for key, parts in out.items()}


def mean_and_se(sums, counts) -> tuple[float, float | None]:
    """Σsums/Σcounts and its standard error over the units (a ratio estimator: units of unequal
    sizes); None with a single unit."""
    sums, counts = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    mean = float(sums.sum() / counts.sum())
    k = len(sums)
    if k < 2:
        return mean, None
    residuals = (sums - mean * counts) / counts.mean()
    return mean, float(math.sqrt((residuals ** 2).sum() / (k * (k - 1))))


def paired_difference(report: dict, reference: dict) -> tuple[float, float | None]:
    """report's mean NLL minus reference's (nats per token) and its standard error over the chunks: two
    perplexity() reports (or a report and its "reference") of the same chunks of the same tokens."""
    counts = report["chunk_tokens"]
    if counts != reference.get("chunk_tokens"):
        raise ValueError("the two reports were not measured on the same chunks")
    diffs = [(a - b) * c for a, b, c in zip(report["chunk_nll"], reference["chunk_nll"], counts)]
    return mean_and_se(diffs, counts)


def _interval(mean: float, se: float | None) -> list | None:
    return None if se is None else [_exp(mean - Z95 * se), _exp(mean + Z95 * se)]


def _exp(nll: float) -> float:
    """exp of a mean NLL; a damaged model's (NaN, or past float64's range) is refused with one line."""
    if not -MAX_NLL <= nll <= MAX_NLL:
        raise ModelError(f"the model's log-likelihood of the text is {nll:.4g} nats per token: its weights or "
                         f"settings are damaged")
    return math.exp(nll)


def _summary(sums, counts) -> dict:
    """One model's part of the report from its per-unit NLL sums and token counts."""
    mean, se = mean_and_se(sums, counts)
    return {"nll": mean, "ppl": _exp(mean), "nll_se": se, "ppl_95": _interval(mean, se),
            "chunk_nll": [s / c for s, c in zip(sums, counts)], "chunk_tokens": list(counts)}


def _windows(n: int, ctx: int, stride: int | None, max_chunks: int | None):
    """(inputs (begin, end), cache length, first scored row, targets (begin, end), weight) per unit:
    hidden-state rows first, first + 1, … of ids[inputs] predict ids[targets]. weight: None (each target
    counts once) or, in the stride recipe, the count the unit's mean loss stands for (new − 1)."""
    if stride is None:
        n_chunks = n // ctx
        if n_chunks == 0:
            raise ModelError(f"the text has {n} tokens, fewer than one chunk of --ctx {ctx}; use a smaller --ctx")
        for i in range(min(n_chunks, max_chunks or n_chunks)):
            b = i * ctx
            yield (b, b + ctx), ctx, 0, (b + 1, b + ctx), None
        return
    if n < 2:
        raise ModelError(f"the text has {n} tokens; perplexity needs at least 2")
    prev_end, windows = 0, 0
    for begin in range(0, n, stride):
        if max_chunks is not None and windows >= max_chunks:
            return
        end = min(begin + ctx, n)
        new = end - prev_end  # tokens this window scores (trg_len in the HF recipe)
        if end - begin < 2:  # a last window of one token scores nothing (HF's loss would be NaN)
            return
        first = max(1, end - begin - new)  # first scored position (labels shift by one)
        yield (begin, end - 1), end - begin, first - 1, (begin + first, end), new - 1
        prev_end, windows = end, windows + 1
        if end == n:
            return


def perplexity(lm, ids, ctx: int = 2048, stride: int | None = None, max_chunks: int | None = None,
               progress: bool = True, reference=None) -> dict:
    """lm: a LoadedModel; ids: the tokenized text; reference: another LoadedModel with the same
    vocabulary, run on the same chunks (module doc). Returns a JSON-ready report."""
    from tqdm import tqdm

    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = len(ids)
    if ctx < 2:
        raise ModelError(f"--ctx must be at least 2, got {ctx}")
    if ctx > lm.context_length:
        raise ModelError(f"--ctx {ctx} exceeds the model's context of {lm.context_length} tokens")
    if reference is not None and ctx > reference.context_length:
        raise ModelError(f"--ctx {ctx} exceeds the reference model's context of {reference.context_length} tokens")
    if stride is not None and not 1 <= stride <= ctx:
        raise ModelError(f"--stride must be between 1 and --ctx ({ctx}), got {stride}")
    if max_chunks is not None and max_chunks < 1:
        raise ModelError(f"--max-chunks must be at least 1, got {max_chunks}")
    t0 = time.perf_counter()
    units = {"nll": [], "ref_nll": [], "kl": [], "agree": [], "count": []}  # per chunk / window: sums, count
    plan = list(_windows(n, ctx, stride, max_chunks))  # slices only: cheap, and the progress bar's length
    for (i0, i1), cache_len, first, (s0, s1), weight in tqdm(plan, desc="perplexity", file=sys.stderr,
                                                             unit="chunk" if stride is None else "window",
                                                             disable=not progress):
        inputs, targets = ids[i0:i1], ids[s0:s1]
        hidden = lm.model.hidden_states(inputs, lm.model.new_cache(cache_len))[first:first + len(targets)]
        if reference is None:
            scores = {"nll": _nll(lm, hidden, targets)}
        else:
            ref_hidden = reference.model.hidden_states(inputs, reference.model.new_cache(cache_len))
            scores = _compared(lm, reference, hidden, ref_hidden[first:first + len(targets)], targets)
        count = len(targets) if weight is None else weight  # the stride recipe: mean loss × (new − 1)
        if count:  # a last stride window of new == 1 counts 0 times
            for key, values in scores.items():
                units[key].append(float(values.mean()) * count)
            units["count"].append(count)
    if not units["count"]:
        raise ModelError("no tokens were scored")
    report = {"method": "chunks" if stride is None else "stride", "ctx": ctx, "stride": stride,
              "chunks": len(plan), "tokens": n, "scored_tokens": int(sum(units["count"])),
              **_summary(units["nll"], units["count"])}
    if reference is not None:
        kl, kl_se = mean_and_se(units["kl"], units["count"])
        report["reference"] = _summary(units["ref_nll"], units["count"])
        diff_mean, diff_se = paired_difference(report, report["reference"])
        if not math.isfinite(kl):
            raise ModelError("the KL divergence to the reference is not finite: a model's weights or settings are "
                             "damaged")
        report.update(ppl_ratio=_exp(diff_mean), ppl_ratio_95=_interval(diff_mean, diff_se),
                      kl_divergence=kl, kl_divergence_se=kl_se,
                      top1_agreement=float(np.sum(units["agree"]) / sum(units["count"])))
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report

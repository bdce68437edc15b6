"""The NumPy backend: the CPU runtime, and the reference every other backend is tested against.

Two memory modes (chosen at load):

  lean (default)      Weights stay packed in the memory-mapped file. Each matrix is dequantized in
                      row chunks into a small reused float32 buffer every time it is used, then
                      multiplied with BLAS. Memory: the file's pages (shared, evictable) plus a few MB
                      of scratch and the decoded per-group scales/zeros (1/group_size of fp32 weights).
  cache_dequantized   Every matrix is dequantized once at load to float32 and kept. Memory: 4 bytes
                      per weight (e.g. ~540 MB for a 135M-parameter model) on top of the file; decode
                      is then plain BLAS and several times faster.

How a packed matrix is multiplied (lean mode). The packed stream is a little-endian bit stream, so
b-bit codes come in *units* of U codes per B bytes (4-bit: 2 per byte, 3-bit: 8 per 3 bytes ...).
`unpack_planes` cuts code j of every unit out of a whole chunk of rows at once ("plane" j) with
shifts and masks on 8 bytes at a time. Within each group the codes then sit plane-major, a fixed
permutation of the columns (`column_order`). Instead of undoing it, the input x is permuted the same
way (cheap: one row per token) and padded with zeros for the padded last group, so padding codes
contribute nothing.
  decode (≤ 8 tokens):  per group k, P[k] = codes[k] @ x[k] with BLAS (codes cast to float32 once),
                        then y = Σ_k scale[k]·P[k] − Σ_k scale[k]·zero[k]·Σx[k]: no other float32
                        pass over the weights.
  prefill (more):       W = (codes − zero)·scale in float32 (SPEC.md §6.1), y = x @ Wᵀ (sgemm).
CSR outliers are added as y[:, r] += Σ v·x[:, c], the same as adding them to W.

Threads: products are split by output rows over a small thread pool (NumPy and BLAS release the
GIL), prefill attention by query blocks; BLAS itself runs single-threaded (see blas.py).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from ...format_spec import decode_meta
from ..errors import ModelError
from .base import Backend, LayerCache
from .blas import blas_threads

# bits -> (U codes per unit, B bytes per unit): the packed bit stream repeats every B bytes
UNITS = {2: (4, 1), 3: (8, 3), 4: (2, 1), 5: (8, 5), 6: (4, 3), 8: (1, 1)}
DECODE_MAX_TOKENS = 8  # up to this many rows of x, use the per-group (decode) product
DECODE_CHUNK_BYTES = 1 << 20  # float32 weight chunk per BLAS call while decoding (fits in L2)
PREFILL_CHUNK_BYTES = 4 << 20  # ... while prefilling (bigger: better sgemm efficiency)
ATTENTION_BLOCK = 256  # queries per block in prefill attention (bounds the score matrix)
PARALLEL_MIN_WORK = 1 << 18  # split a product over threads from this many weights to dequantize ...
PARALLEL_MIN_FLOPS = 1 << 23  # ... or multiply-adds with cached float32 weights


class NumpyBackend(Backend):
    """threads: worker threads for products and attention (default: $MXQ_THREADS, else the CPU
    count, at most 8). NumPy releases the GIL inside its loops, so the threads run in parallel.
    BLAS itself is kept single-threaded (see blas.py)."""

    name = "cpu"
    xp = np

    def __init__(self, cache_dequantized: bool = False, threads: int | None = None):
        self.cache_dequantized = bool(cache_dequantized)
        env = os.environ.get("MXQ_THREADS", "")
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.threads = max(1, threads or (int(env) if env.isdigit() else min(cpus, 8)))
        self.pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="mxq") if self.threads > 1 else None
        self._buffers = [{} for _ in range(self.threads)]  # per worker slot: reused scratch buffers
        self.blas = blas_threads()
        self.blas.set(1)

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False)
            self.pool = None

    # -- scratch and threads ---------------------------------------------------------------------------
    def scratch(self, slot: int = 0):
        """A function (name, shape, dtype) → reused uninitialized buffer of worker `slot`
        (fresh allocations would page-fault on every call)."""
        buffers = self._buffers[slot]

        def get(name, shape, dtype):
            n, dt = math.prod(shape), np.dtype(dtype)
            buf = buffers.get((name, dt))
            if buf is None or buf.size < n:
                buf = buffers[(name, dt)] = np.empty(max(n, 1), dt)
            return buf[:n].reshape(shape)

        return get

    def parallel_rows(self, n_rows: int, work: int, fn) -> None:
        """Run fn(r0, r1, scratch) over [0, n_rows) split into one contiguous part per thread
        (a single part when `work` is below the threshold the caller compared it with)."""
        parts = self.threads if work and self.pool is not None else 1
        step = -(-n_rows // parts)
        step = -(-step // 8) * 8  # parts start on multiples of 8 rows
        bounds = [(r, min(n_rows, r + step)) for r in range(0, n_rows, step)]
        futures = [self.pool.submit(fn, r0, r1, self.scratch(i)) for i, (r0, r1) in enumerate(bounds[1:], 1)]
        try:
            fn(*bounds[0], self.scratch(0))
        finally:
            for future in futures:
                future.result()

    def parallel_tasks(self, fn, items: list) -> None:
        """fn(*item) for every item, dealt round-robin to the calling thread and the workers."""
        if self.pool is None or len(items) < 2:
            for item in items:
                fn(*item)
            return

        def run(share):
            for item in share:
                fn(*item)

        shares = [items[i::self.threads] for i in range(min(self.threads, len(items)))]
        futures = [self.pool.submit(run, share) for share in shares[1:]]
        try:
            run(shares[0])
        finally:
            for future in futures:
                future.result()

    # -- weights ------------------------------------------------------------------------------------
    def prepare_matrix(self, entry, blobs: dict):
        if entry.config.scheme == "fp16":
            weight = DenseWeight(entry.name, blobs["data"], self)
        else:
            weight = AffineWeight(entry, blobs, self)
        if self.cache_dequantized and entry.role != "embedding":
            weight.cache()  # an untied embedding is only gathered from: dequantized when used as lm_head
        return weight

    def upload(self, array):
        return np.ascontiguousarray(array, dtype=np.float32)

    def to_host(self, x):
        return np.asarray(x, dtype=np.float32)

    # -- operations -----------------------------------------------------------------------------------
    def embedding(self, weight, ids):
        return weight.rows(np.asarray(ids, dtype=np.int64))  # (T, hidden)

    def linear(self, x, weight, bias=None, residual=None):
        y = weight.matmul(np.ascontiguousarray(x, dtype=np.float32))  # (T, out)
        if bias is not None:
            y += bias
        if residual is not None:
            y += residual
        return y

    def rms_norm(self, x, weight, eps):
        variance = np.mean(x * x, axis=-1, keepdims=True)  # (T, 1)
        return weight * (x * (np.float32(1.0) / np.sqrt(variance + np.float32(eps))))

    def rope(self, x, positions, inv_freq, head_dim=None):
        half = inv_freq.shape[0]
        head_dim = head_dim or 2 * half
        T = x.shape[0]
        angles = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # (T, half)
        cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]  # (T, 1, half)
        xh = x.reshape(T, -1, head_dim)  # (T, n, head_dim)
        x1, x2 = xh[..., :half], xh[..., half:2 * half]
        out = np.empty_like(xh)
        out[..., :half] = x1 * cos - x2 * sin
        out[..., half:2 * half] = x2 * cos + x1 * sin
        out[..., 2 * half:] = xh[..., 2 * half:]  # partial rotary: the rest passes through
        return out.reshape(T, -1)

    def attention(self, q, k, v, cache: LayerCache, start, scale=None, window=None):
        T = q.shape[0]
        n_kv, _, head_dim = cache.k.shape
        n_rep = q.shape[1] // head_dim // n_kv
        cache.k[:, start:start + T] = k.reshape(T, n_kv, head_dim).transpose(1, 0, 2)  # (n_kv, T, hd)
        cache.v[:, start:start + T] = v.reshape(T, n_kv, head_dim).transpose(1, 0, 2)
        qh = q.reshape(T, n_kv, n_rep, head_dim).transpose(1, 2, 0, 3)  # (n_kv, n_rep, T, hd)
        out = np.empty((T, n_kv, n_rep, head_dim), dtype=np.float32)
        scale = np.float32(1.0 / math.sqrt(head_dim) if scale is None else scale)

        def block(t0, t1):
            S = start + t1  # keys the last query of this block may see
            first = 0 if window is None else max(0, start + t0 - window + 1)  # keys no query here sees before
            keys, values = cache.k[:, None, first:S], cache.v[:, None, first:S]  # (n_kv, 1, S', hd)
            scores = np.matmul(qh[:, :, t0:t1], keys.transpose(0, 1, 3, 2))  # (n_kv, n_rep, tb, S')
            scores *= scale
            j = np.arange(first, S)[None, :]  # key positions
            p = (start + np.arange(t0, t1))[:, None]  # query positions
            hidden = (j > p) if window is None else (j > p) | (j <= p - window)  # (tb, S') masked keys
            scores[..., hidden] = -np.inf
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            out[t0:t1] = np.matmul(scores, values).transpose(2, 0, 1, 3)  # (tb, n_kv, n_rep, hd)

        blocks = [(t0, min(T, t0 + ATTENTION_BLOCK)) for t0 in range(0, T, ATTENTION_BLOCK)]
        self.parallel_tasks(block, blocks[::-1])  # the last blocks see the most keys: start them first
        return out.reshape(T, -1)

    def silu_mul(self, gate, up):
        with np.errstate(over="ignore"):  # exp(-g) = inf for very negative g gives silu = -0, as it should
            return gate / (np.float32(1.0) + np.exp(-gate)) * up

    def add(self, a, b):
        a += b
        return a

    def token_nll(self, logits, targets):
        logits = np.asarray(logits, dtype=np.float32)
        peak = logits.max(axis=-1, keepdims=True)  # (T, 1)
        lse = np.log(np.exp(logits - peak).sum(axis=-1, dtype=np.float64)) + peak[:, 0]  # (T,)
        return lse - logits[np.arange(len(targets)), targets].astype(np.float64)


# ---------------------------------------------------------------------------------------------------
# fp16 weights


def half_to_float(h: np.ndarray, out: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """fp16 → fp32 with integer ops (3x faster than astype): shift exponent+mantissa into place and
    rescale by 2^112, which also turns fp16 subnormals into the right fp32 normals. Not for inf/NaN
    (weights never hold them). `out` float32 and `sign` uint32 buffers of h's shape."""
    bits = out.view(np.uint32)
    np.copyto(bits, h.view(np.uint16))
    np.bitwise_and(bits, np.uint32(0x8000), out=sign)
    np.left_shift(sign, np.uint32(16), out=sign)
    np.bitwise_and(bits, np.uint32(0x7FFF), out=bits)
    np.left_shift(bits, np.uint32(13), out=bits)
    np.multiply(out, np.float32(2.0 ** 112), out=out)
    np.bitwise_or(bits, sign, out=bits)
    return out


def dense_matmul(backend: NumpyBackend, dense: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x (T, in) @ dense (out, in)ᵀ, split over threads by output rows when big enough."""
    T, (out_features, in_features) = x.shape[0], dense.shape
    y = np.empty((T, out_features), dtype=np.float32)

    def part(r0, r1, scratch):
        y[:, r0:r1] = x @ dense[r0:r1].T

    backend.parallel_rows(out_features, out_features * in_features * T >= PARALLEL_MIN_FLOPS, part)
    return y


class DenseWeight:
    """An fp16 matrix (out, in): converted to float32 chunk by chunk when used (lean), or once (cached)."""

    def __init__(self, name, data: np.ndarray, backend: NumpyBackend):
        self.name, self.data, self.backend = name, data, backend
        self.shape = data.shape
        self.dense = None  # float32 (out, in) once cached

    def cache(self):
        if self.dense is None:
            self.dense = self.data.astype(np.float32)

    def rows(self, ids):
        if self.dense is not None:
            return self.dense[ids]
        return self.data[ids].astype(np.float32)  # (T, in)

    def matmul(self, x):
        if self.dense is None and self.backend.cache_dequantized:
            self.cache()  # a tied embedding, first used as lm_head
        if self.dense is not None:
            return dense_matmul(self.backend, self.dense, x)
        out_features, in_features = self.shape
        T = x.shape[0]
        y = np.empty((T, out_features), dtype=np.float32)
        chunk = _chunk_rows(T, in_features)

        def part(r0, r1, scratch):
            for c0 in range(r0, r1, chunk):
                c1 = min(r1, c0 + chunk)
                w = scratch("weight", (c1 - c0, in_features), np.float32)
                half_to_float(self.data[c0:c1], w, scratch("sign", w.shape, np.uint32))
                y[:, c0:c1] = x @ w.T  # (T, rows)

        self.backend.parallel_rows(out_features, out_features * in_features >= PARALLEL_MIN_WORK, part)
        return y


def _repeat_byte(value: int) -> np.uint64:
    return np.uint64(int.from_bytes(bytes([value]) * 8, "little"))


def unpack_planes(packed: np.ndarray, bits: int, scratch) -> np.ndarray:
    """Packed rows (R, n_bytes) uint8 → codes (U, R, n_units) uint8, U codes per unit of B bytes
    (UNITS): codes[j, r, u] = code u·U + j of row r.

    The B bytes of every unit are first split into B contiguous "byte planes"; code j of a unit
    starts at bit j·b, i.e. in byte plane j·b div 8 at shift j·b mod 8, and may continue in the
    next plane. Each code plane is then cut out of whole byte planes at once, 8 bytes per uint64
    operation (SWAR: shifts and byte-repeated masks). scratch(name, shape, dtype) → buffers."""
    U, B = UNITS[bits]
    R, n_bytes = packed.shape
    if bits == 8:
        return packed.reshape(1, R, n_bytes)
    n_units = n_bytes // B
    L = R * n_units
    Lp = -(-L // 8) * 8  # padded so every plane can be viewed as uint64
    units = np.ascontiguousarray(packed).reshape(L, B)
    planes = scratch("byte_planes", (B, Lp), np.uint8)
    for k in range(B):
        np.copyto(planes[k, :L], units[:, k])
    words = planes.view(np.uint64)  # (B, Lp / 8)
    out = scratch("codes", (U, Lp), np.uint8)
    codes = out.view(np.uint64)  # (U, Lp / 8)
    tmp = scratch("swar", (Lp // 8,), np.uint64)
    for j in range(U):
        byte, shift = divmod(j * bits, 8)
        low = min(bits, 8 - shift)  # bits of the code in this byte; the rest start the next one
        np.right_shift(words[byte], np.uint64(shift), out=codes[j])
        np.bitwise_and(codes[j], _repeat_byte((1 << low) - 1), out=codes[j])
        if low < bits:
            np.bitwise_and(words[byte + 1], _repeat_byte((1 << (bits - low)) - 1), out=tmp)
            np.left_shift(tmp, np.uint64(low), out=tmp)
            np.bitwise_or(codes[j], tmp, out=codes[j])
    return out[:, :L].reshape(U, R, n_units)


@lru_cache(maxsize=64)
def column_order(in_features: int, bits: int, group_size: int) -> np.ndarray:
    """The input column of each position of the unpacked order: within a group, codes sit
    plane-major (position j·(g/U) + u holds code u·U + j, see unpack_planes). Positions of the
    padded last group point at index in_features (a zero appended to x). (G·g,) intp."""
    U, _ = UNITS[bits]
    per_group = group_size // U
    p = np.arange(group_size)
    in_group = (p % per_group) * U + p // per_group
    n_groups = -(-in_features // group_size)
    columns = (np.arange(n_groups)[:, None] * group_size + in_group[None, :]).reshape(-1)
    columns[columns >= in_features] = in_features
    return columns


class AffineWeight:
    """A packed `affine` matrix (out, in), multiplied straight from the mmapped codes (lean), or
    dequantized once to float32 (cached). Scales and zeros are decoded at load (small)."""

    def __init__(self, entry, blobs: dict, backend: NumpyBackend):
        self.name, self.shape, self.backend = entry.name, tuple(entry.shape), backend
        self.bits, self.group_size = entry.config.bits, entry.config.group_size
        out_features, in_features = self.shape
        self.n_groups = -(-in_features // self.group_size)
        self.packed = blobs["qweight"].view(np.uint8)  # (out, G·g·b/8), zero-copy
        self.scale = decode_meta(blobs["scale_codes"], blobs["scale_meta"])  # (out, G) float32
        self.zero = decode_meta(blobs["zero_codes"], blobs["zero_meta"])  # (out, G) float32
        self.scale_t = np.ascontiguousarray(self.scale.T)  # (G, out) for the decode product
        self.zero_scale_t = np.ascontiguousarray((self.zero * self.scale).T)  # (G, out)
        self.columns = column_order(in_features, self.bits, self.group_size)  # (G·g,)
        self.outliers = None
        if entry.config.outliers:
            row_ptr = blobs["outlier_row_ptr"].astype(np.int64)
            rows = np.flatnonzero(np.diff(row_ptr))  # rows that have outliers
            self.outliers = (rows, row_ptr[rows], blobs["outlier_cols"].astype(np.intp),
                             blobs["outlier_values"].astype(np.float32), row_ptr)
        self.dense = None

    def _codes(self, packed, scratch):
        """Codes of packed rows (R, n_bytes) as (U, R, G, g/U) uint8 (see unpack_planes)."""
        U, _ = UNITS[self.bits]
        return unpack_planes(packed, self.bits, scratch).reshape(U, packed.shape[0], self.n_groups, -1)

    def _dequantize_into(self, codes, r, w):
        """w (R, G, U, g/U) float32 = (codes − zero)·scale (SPEC.md §6.1) for rows r."""
        np.subtract(codes.transpose(1, 2, 0, 3), self.zero[r][:, :, None, None], out=w)
        np.multiply(w, self.scale[r][:, :, None, None], out=w)
        return w

    # -- full dequantization --------------------------------------------------------------------------
    def dequantize_rows(self, r: np.ndarray | slice) -> np.ndarray:
        """Float32 rows of W in the natural column order, outliers included: (R, in)."""
        packed = np.ascontiguousarray(self.packed[r])
        R, (_, in_features) = packed.shape[0], self.shape
        U, _ = UNITS[self.bits]
        codes = self._codes(packed, _fresh)
        w = self._dequantize_into(codes, r, np.empty((R, self.n_groups, U, self.group_size // U), np.float32))
        out = np.empty((R, in_features + 1), dtype=np.float32)
        out[:, self.columns] = w.reshape(R, -1)  # the padding positions all land in column in_features
        out = out[:, :in_features]
        if self.outliers is not None:
            _, _, cols, values, row_ptr = self.outliers
            row_ids = np.arange(self.shape[0])[r]
            first, counts = row_ptr[row_ids], row_ptr[row_ids + 1] - row_ptr[row_ids]  # (R,)
            local = np.repeat(np.arange(R), counts)  # output row of each outlier taken
            index = np.arange(counts.sum()) + np.repeat(first - (np.cumsum(counts) - counts), counts)
            out[local, cols[index]] += values[index]  # (row, col) pairs are unique: no lost updates
        return np.ascontiguousarray(out)

    def cache(self):
        if self.dense is None:
            out_features = self.shape[0]
            chunk = max(1, (64 << 20) // (4 * self.n_groups * self.group_size))
            self.dense = np.empty(self.shape, dtype=np.float32)
            for r0 in range(0, out_features, chunk):
                self.dense[r0:r0 + chunk] = self.dequantize_rows(slice(r0, r0 + chunk))

    def rows(self, ids):
        if self.dense is not None:
            return self.dense[ids]
        return self.dequantize_rows(ids)

    # -- products -------------------------------------------------------------------------------------
    def matmul(self, x):
        if self.dense is None and self.backend.cache_dequantized:
            self.cache()  # a tied embedding, first used as lm_head
        if self.dense is not None:
            return dense_matmul(self.backend, self.dense, x)
        T, in_features = x.shape
        out_features = self.shape[0]
        xe = np.empty((T, in_features + 1), np.float32)
        xe[:, :in_features] = x
        xe[:, in_features] = 0.0
        x_perm = np.take(xe, self.columns, axis=1)  # (T, G·g) in unpack order, zeros at padding
        y = np.empty((T, out_features), dtype=np.float32)
        if T <= DECODE_MAX_TOKENS:
            G, g = self.n_groups, self.group_size
            xg = np.ascontiguousarray(x_perm.reshape(T, G, g).transpose(1, 2, 0))  # (G, g, T)
            x_sum = x_perm.reshape(T, G, g).sum(axis=2)  # (T, G)
            part = lambda r0, r1, scratch: self._decode_rows(xg, x_sum, y, r0, r1, scratch)
        else:
            part = lambda r0, r1, scratch: self._prefill_rows(x_perm, y, r0, r1, scratch)
        self.backend.parallel_rows(out_features, out_features * in_features >= PARALLEL_MIN_WORK, part)
        if self.outliers is not None:
            rows, starts, cols, values, _ = self.outliers
            y[:, rows] += np.add.reduceat(x[:, cols] * values, starts, axis=1)  # (T, rows with outliers)
        return y

    def _decode_rows(self, xg, x_sum, y, r0, r1, scratch):
        """y[:, r0:r1] for a few tokens: per group, (codes as float32) @ x with BLAS, then scales."""
        G, g, T = xg.shape
        U, _ = UNITS[self.bits]
        chunk = _chunk_rows(T, G * g)
        for c0 in range(r0, r1, chunk):
            c1 = min(r1, c0 + chunk)
            R = c1 - c0
            codes = self._codes(self.packed[c0:c1], scratch)  # (U, R, G, g/U)
            w = scratch("weight", (G, R, U, g // U), np.float32)
            np.copyto(w, codes.transpose(2, 1, 0, 3))  # (G, R, g) float32 codes
            partial = np.matmul(w.reshape(G, R, g), xg)  # (G, R, T): Σ code·x within each group
            partial *= self.scale_t[:, c0:c1, None]
            y[:, c0:c1] = partial.sum(axis=0).T - x_sum @ self.zero_scale_t[:, c0:c1]

    def _prefill_rows(self, x_perm, y, r0, r1, scratch):
        """y[:, r0:r1] for many tokens: dequantize a chunk of rows to float32, then sgemm."""
        G, g = self.n_groups, self.group_size
        U, _ = UNITS[self.bits]
        chunk = _chunk_rows(x_perm.shape[0], G * g)
        for c0 in range(r0, r1, chunk):
            c1 = min(r1, c0 + chunk)
            R = c1 - c0
            codes = self._codes(self.packed[c0:c1], scratch)
            w = self._dequantize_into(codes, slice(c0, c1), scratch("weight", (R, G, U, g // U), np.float32))
            y[:, c0:c1] = x_perm @ w.reshape(R, G * g).T  # (T, R)


def _fresh(name, shape, dtype):
    return np.empty(shape, dtype)


def _chunk_rows(T: int, row_elements: int) -> int:
    budget = DECODE_CHUNK_BYTES if T <= DECODE_MAX_TOKENS else PREFILL_CHUNK_BYTES
    return max(8, budget // (4 * row_elements))

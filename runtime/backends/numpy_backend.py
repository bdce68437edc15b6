"""The NumPy backend: the CPU runtime, and the reference every other backend is tested against.

Weights are handles from cpu_weights.py (DenseWeight, AffineWeight), cpu_lut.py (LutWeight), cpu_vq.py
(VqWeight), cpu_trellis.py (TrellisWeight) and, for `rows` matrices, row_blocks.py (RowBlocks of those): lean mode multiplies the packed codes
— with the compiled kernels of cpu_kernels.py when Numba is available (cpu_jit.py): the affine ones (and vq
ones on the 8-bit grid) of one input — a rows matrix's blocks, q/k/v, gate/up — as one call from their tiles of 16 rows, for decode
and whole prefill pieces (cpu_stack.py, cpu_stack_kernels.py, cpu_tiles.py), other products for decode-sized inputs — else with
NumPy from the memory-mapped file — and cache_dequantized keeps a float32 copy of every matrix (see
cpu_weights.py for both modes' memory and speed).
In either mode the small per-token ops (RMSNorm, RoPE, SwiGLU/GeGLU, decode attention) run as
compiled loops (cpu_ops.py) when Numba is available; the NumPy code below is their reference. Lean decode
runs every decoder layer whose products are kernel stacks in ONE compiled call of those same pieces
(cpu_layers.py: fused_layers), instead of ~10 calls a layer from Model.block.

Threads: `threads` (default $MXQ_THREADS, else the CPU count, at most 8) serve the compiled kernels'
team (cpu_team.py: `threads - 1` workers that spin between jobs, the calling thread taking the parts no
worker took) for decode's big products and long-context attention, in either kernel build; Numba's
OpenMP pool for the JIT's few remaining parallel loops (lut, vq and trellis matrices, lone affine blocks:
ThreadChoice); and the NumPy path (a small thread pool splitting products by output rows — NumPy and BLAS
release the GIL — and prefill attention by query blocks). BLAS itself runs single-threaded (see blas.py).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import cpu_weights
from .base import Backend, LayerCache
from .blas import blas_threads
from .cpu_jit import disable as disable_kernels
from .cpu_jit import kernels as load_kernels
from .cpu_layers import FusedLayers
from .cpu_lut import LutWeight
from .cpu_stack import KernelStack
from .cpu_team import MAX_PARTS, Team
from .cpu_trellis import TrellisWeight
from .cpu_vq import VqWeight
from .cpu_weights import KERNEL_MAX_TOKENS, STACK_MAX_TOKENS, AffineWeight, DenseWeight  # noqa: F401 - weight classes re-exported
from .row_blocks import RowBlocks

ATTENTION_BLOCK = 256  # queries per block in prefill attention, at most ...
ATTENTION_SCORE_BYTES = 4 << 20  # ... so many that a block's float32 scores (heads, block, keys) fit in this
PREFILL_CHUNK = 256  # Model runs longer prompts in pieces of this many tokens: bounded activations
ATTENTION_TEAM_MIN_WORK = 1 << 15  # compiled decode attention: heads over the team's threads from this many MACs
TEAM_PARTS_PER_THREAD = 1  # a team product's parts (cpu_team.py): so many per thread (claimed as they come) ...
TEAM_MIN_PART_ROWS = 16  # ... of at least this many rows


def attention_block(n_heads: int, keys: int) -> int:
    """Queries per block of prefill attention over `keys` keys: bounded score memory, at least 16."""
    return max(16, min(ATTENTION_BLOCK, ATTENTION_SCORE_BYTES // (4 * n_heads * keys)))


class NumpyBackend(Backend):
    """threads: worker threads for products and attention (default: $MXQ_THREADS, else the CPU
    count, at most 8). kernels: use the compiled CPU kernels (cpu_kernels.py, lean mode) and ops
    (cpu_ops.py) when available (False: the NumPy reference path only)."""

    name = "cpu"
    schemes = ("fp16", "affine", "lut", "vq", "trellis")  # the 2-D storage schemes prepare_matrix handles
    xp = np
    prefill_chunk = PREFILL_CHUNK
    fuse_layers = True  # decode's decoder layers as one compiled call (cpu_layers.py); False: a call per op

    def __init__(self, cache_dequantized: bool = False, threads: int | None = None, kernels: bool = True):
        self.cache_dequantized = bool(cache_dequantized)
        env = os.environ.get("MXQ_THREADS", "")
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.threads = max(1, threads or (int(env) if env.isdigit() and int(env) > 0 else min(cpus, 8)))
        # compiled kernels serve lean-mode decode; the cached mode's float32 products are BLAS
        self.kernels = load_kernels() if kernels and not self.cache_dequantized else None
        # kernel stacks multiply up to this many rows of x (decode; prefill pieces where the tiles beat sgemm)
        self.stack_max_tokens = (STACK_MAX_TOKENS[self.kernels.dot_isa, cpu_weights.ACTIVATION_SETTING]
                                 if self.kernels is not None else 0)
        compiled = load_kernels() if kernels else None
        self.ops = compiled.ops if compiled is not None else None  # per-token ops (cpu_ops.py), either memory mode
        if compiled is not None and compiled.parallel:  # Numba's JIT: its OpenMP pool serves the kernels
            import numba

            self.threads = min(self.threads, numba.config.NUMBA_NUM_THREADS)  # Numba's pool size
            numba.set_num_threads(self.threads)
        # decode's big products and attention: the compiled kernels' team (cpu_team.py), both memory modes
        self.team = Team(compiled, self.threads - 1) if compiled is not None and self.threads > 1 else None
        self.team_kernels = compiled
        self.pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="mxq") if self.threads > 1 else None
        self._buffers = [{} for _ in range(self.threads)]  # per worker slot: reused scratch buffers
        self.stacks = {}  # ids of handles → (the handles, their KernelStack or None): see stack()
        self.fused = {}  # id of a Model → (the model, its FusedLayers): see fused_layers()
        self.thread_choices = {}  # (weight kind, shape) → cpu_weights.ThreadChoice: serial or parallel products
        self.blas = blas_threads()
        self.blas.set(1)

    # -- compiled kernels --------------------------------------------------------------------------
    def kernels_for(self, n_tokens: int, most: int = KERNEL_MAX_TOKENS):
        """The compiled kernel module when it should multiply n_tokens rows of x (at most `most`), else None."""
        return self.kernels if n_tokens <= most else None

    def run_kernel(self, kernel, *args) -> bool:
        """kernel(*args, self.threads); False if it failed — then the kernels are switched off for
        good (one notice) and the caller takes the NumPy path."""
        try:
            kernel(*args, self.threads)
            return True
        except Exception as error:  # noqa: BLE001 - a failing JIT must not stop generation
            self.disable(error)
            return False

    def run_team(self, kernel, *args, op: bool = False) -> bool | None:
        """kernel(*args, team.ctrl) of cpu_team_kernels, the team's workers woken first; False if it failed
        (as run_kernel, or run_op when `op`); None, having done nothing, while another thread's job holds
        the team (one job at a time: the caller then runs its serial kernel)."""
        team = self.team
        if not team.lock.acquire(blocking=False):
            return None
        try:
            team.wake()
            kernel(*args, team.ctrl)
            return True
        except Exception as error:  # noqa: BLE001 - a failing JIT must not stop generation
            self.disable(error, ops=op)
            return False
        finally:
            team.lock.release()

    def team_parts(self, rows: int) -> int:
        """How many parts a team product of `rows` output rows is cut into."""
        return max(1, min(self.team.size * TEAM_PARTS_PER_THREAD, rows // TEAM_MIN_PART_ROWS, MAX_PARTS))

    def disable(self, error: Exception, ops: bool = False) -> None:
        """Switch the compiled kernels off for good (one notice): the NumPy path from now on."""
        disable_kernels(f"{type(error).__name__}: {error}")
        self.kernels = None
        if ops:
            self.ops = None
        if self.team is not None:
            self.team.close()
            self.team = None

    def run_op(self, op, *args) -> bool:
        """op(*args) of cpu_ops; False if it failed — then every compiled kernel is switched off
        for good (one notice) and the caller takes the NumPy path."""
        try:
            op(*args)
            return True
        except Exception as error:  # noqa: BLE001 - a failing JIT must not stop generation
            self.disable(error, ops=True)
            return False

    def close(self):
        if self.team is not None:
            self.team.close()
            self.team = None
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
        elif entry.config.scheme == "lut":
            weight = LutWeight(entry, blobs, self)
        elif entry.config.scheme == "vq":
            weight = VqWeight(entry, blobs, self)
        elif entry.config.scheme == "trellis":
            weight = TrellisWeight(entry, blobs, self)
        else:
            weight = AffineWeight(entry, blobs, self)
        if self.cache_dequantized and entry.role != "embedding":
            weight.cache()  # an untied embedding is only gathered from: dequantized when used as lm_head
        return weight

    def prepare_head(self, weight) -> None:
        """Make the lm_head's kernel stack (and so a tied affine embedding's tiles) at load, while memory holds
        only the weights: made at the first product, the tiles and the pages they are made from would add
        to the prefill's peak (measured: --fit on SmolLM2, 2 MiB over)."""
        self.stack((weight,), 1)

    def loaded(self, file) -> None:
        """Lean mode with the kernels: decode reads the codes from their tiles (cpu_tiles.py), so the file's
        pages read while making them are dropped from resident memory; what is still read from the file
        (outliers, small fp16 matrices, an embedding's gathered rows) faults back in as it is used."""
        if self.kernels is not None and not self.cache_dequantized:
            file.release_all()

    def upload(self, array):
        return np.ascontiguousarray(array, dtype=np.float32)

    def to_host(self, x):
        return np.asarray(x, dtype=np.float32)

    # -- operations -----------------------------------------------------------------------------------
    def embedding(self, weight, ids):
        return weight.rows(np.asarray(ids, dtype=np.int64))  # (T, hidden) (RowBlocks too: its blocks' rows)

    def linear(self, x, weight, bias=None, residual=None):
        x = np.ascontiguousarray(x, dtype=np.float32)
        stack = self.stack((weight,), x.shape[0])  # decode, stackable throughout: one kernel call (cpu_stack.py)
        if stack is not None:
            return stack.matmul(x, bias, residual)
        if isinstance(weight, RowBlocks):  # a `rows` matrix: each block through this method, then a gather
            return weight.linear(x, bias, residual)
        return weight.matmul(x, bias, residual)  # (T, out)

    def linears(self, x, weights, biases=None):
        """Decode: the products of one input as one kernel call (cpu_stack.py) when they stack."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        stack = self.stack(tuple(weights), x.shape[0])
        if stack is None:
            return super().linears(x, weights, biases)
        return stack.split(stack.matmul(x, stack.bias(biases)))  # [(T, out_i)]

    def stack(self, weights: tuple, n_tokens: int) -> KernelStack | None:
        """The KernelStack of these handles when the compiled kernels multiply n_tokens rows (up to the stack's
        kernel_tokens) and every handle is stackable (cpu_stack.py: affine, or vq on the 8-bit grid, throughout;
        made once per tuple of handles), else None."""
        if self.kernels_for(n_tokens, self.stack_max_tokens) is None:
            return None
        key = tuple(map(id, weights))
        if key not in self.stacks:
            self.stacks[key] = (weights, KernelStack.of(weights, self))  # the handles kept: their ids stay theirs
        stack = self.stacks[key][1]
        return stack if stack is not None and n_tokens <= stack.kernel_tokens else None

    def fused_layers(self, model, n_tokens: int) -> FusedLayers | None:
        """The model's layers as one compiled call (cpu_layers.py) for decode-sized inputs when the compiled kernels
        and ops run (made once per model), else None."""
        if not self.fuse_layers or self.ops is None or self.kernels_for(n_tokens) is None:
            return None
        if id(model) not in self.fused:
            self.fused[id(model)] = (model, FusedLayers(model, self, ATTENTION_TEAM_MIN_WORK))  # the model kept: its id stays its
        return self.fused[id(model)][1]

    def rms_norm(self, x, weight, eps):
        if self.ops is not None:  # one pass per row (few transcendental calls: any T)
            x = np.ascontiguousarray(x, dtype=np.float32)
            out = np.empty_like(x)
            if self.run_op(self.ops.rms_norm, x, weight, float(eps), out):
                return out
        variance = np.mean(x * x, axis=-1, keepdims=True)  # (T, 1)
        return weight * (x * (np.float32(1.0) / np.sqrt(variance + np.float32(eps))))

    def rope(self, x, positions, inv_freq, head_dim=None):
        half = inv_freq.shape[0]
        head_dim = head_dim or 2 * half
        T = x.shape[0]
        if self.ops is not None:
            x = np.ascontiguousarray(x, dtype=np.float32)
            out = np.empty_like(x)
            if self.run_op(self.ops.rope, x, np.asarray(positions, np.int64), inv_freq, int(head_dim), out):
                return out
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
        scale = np.float32(1.0 / math.sqrt(head_dim) if scale is None else scale)
        if self.ops is not None and T <= KERNEL_MAX_TOKENS:  # decode: one loop over the cache per head
            out = np.empty((T, q.shape[1]), np.float32)
            work = T * (start + T) * q.shape[1]
            args = (np.ascontiguousarray(q, dtype=np.float32), cache.k, cache.v, int(start), scale,
                    -1 if window is None else int(window), out)
            done = None  # a query head per part on the team (cpu_team.py), else the serial kernel
            if self.team is not None and work >= ATTENTION_TEAM_MIN_WORK:
                done = self.run_team(self.team_kernels.attention_team, *args, op=True)
            if done is None:
                done = self.run_op(self.ops.attention_serial, *args, self.threads)
            if done:
                return out
        qh = q.reshape(T, n_kv, n_rep, head_dim).transpose(1, 2, 0, 3)  # (n_kv, n_rep, T, hd)
        out = np.empty((T, n_kv, n_rep, head_dim), dtype=np.float32)

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

        size = attention_block(q.shape[1] // head_dim, start + T)
        blocks = [(t0, min(T, t0 + size)) for t0 in range(0, T, size)]
        self.parallel_tasks(block, blocks[::-1])  # the last blocks see the most keys: start them first
        return out.reshape(T, -1)

    def silu_mul(self, gate, up):
        if self.ops is not None and gate.shape[0] <= KERNEL_MAX_TOKENS:  # (NumPy's exp is SIMD: prefill)
            out = np.empty(gate.shape, np.float32)
            if self.run_op(self.ops.silu_mul, np.ascontiguousarray(gate), np.ascontiguousarray(up), out):
                return out
        out = np.negative(gate)  # one (T, intermediate) array, updated in place: silu(g)·up = g / (1 + e^-g) · up
        with np.errstate(over="ignore"):  # exp(-g) = inf for very negative g gives silu = -0, as it should
            np.exp(out, out=out)
        out += np.float32(1.0)
        np.divide(gate, out, out=out)
        out *= up
        return out

    def gelu_mul(self, gate, up):
        if self.ops is not None and gate.shape[0] <= KERNEL_MAX_TOKENS:
            out = np.empty(gate.shape, np.float32)
            if self.run_op(self.ops.gelu_mul, np.ascontiguousarray(gate), np.ascontiguousarray(up), out):
                return out
        return super().gelu_mul(gate, up)

    def add(self, a, b):
        a += b
        return a

    def token_nll(self, logits, targets):
        logits = np.asarray(logits, dtype=np.float32)
        peak = logits.max(axis=-1, keepdims=True)  # (T, 1)
        lse = np.log(np.exp(logits - peak).sum(axis=-1, dtype=np.float64)) + peak[:, 0]  # (T,)
        return lse - logits[np.arange(len(targets)), targets].astype(np.float64)



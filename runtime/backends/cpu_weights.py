"""The CPU backend's weight handles: how a stored matrix is multiplied on the CPU.

    DenseWeight    an fp16 matrix (a tied embedding / lm_head)
    AffineWeight   a packed `affine` matrix (SPEC.md §5–§7), kept as the file's bytes

Two memory modes (chosen at load, see NumpyBackend):

  lean (default)      Weights stay packed in the memory-mapped file: codes, the 8-bit scale/zero
                      codes and CSR outliers are zero-copy views of it; only the fp16 (step, min)
                      pairs of the metadata runs are widened to float32 (1/128 of the metadata).
                      With the kernels, a big fp16 matrix (the lm_head) is moved off the mapping
                      into anonymous memory (same resident size, faster to stream: off_the_mapping).
                      With the kernels, each affine matrix's codes are also moved once into
                      tiles of 16 rows (cpu_tiles.py) and the file's pages dropped: the tiles
                      take the place of the file's bytes in resident memory (a tied embedding's
                      lookups read its tiles, not the file: tile_dequantize).
                      Resident memory ≈ the file (+ ~0.3 MiB for the ahead-of-time kernels,
                      ~120 MiB with Numba's JIT). Products:
                        * up to KERNEL_MAX_TOKENS tokens (decode), and up to STACK_MAX_TOKENS
                          (a prefill piece) for kernel stacks: the compiled kernels of
                          cpu_kernels.py (cpu_stack_kernels.py for stacks) — unpack, dequantize and dot product fused, each
                          tile byte read once per token (a matrix that is not part of a
                          kernel stack: its packed file rows; in parallel when that has been
                          measured faster for the matrix, ThreadChoice);
                        * more tokens: with the kernels, a compiled one-pass
                          dequantization of a chunk of the file's rows (affine_dequantize;
                          their pages dropped again after each chunk), then sgemm; without
                          them, the NumPy path below.
  cache_dequantized   Every matrix is dequantized once at load to float32 and kept (4 bytes per
                      weight on top of the file); products are plain BLAS.

The NumPy path (the reference the kernels are tested against). The packed stream is a
little-endian bit stream, so b-bit codes come in *units* of U codes per B bytes (4-bit: 2 per
byte, 3-bit: 8 per 3 bytes ...). `unpack_planes` cuts code j of every unit out of a whole chunk
of rows at once ("plane" j) with shifts and masks on 8 bytes at a time. Within each group the
codes then sit plane-major, a fixed permutation of the columns (`column_order`). Instead of undoing
it, the input x is permuted the same way (cheap: one row per token) and padded with zeros for the
padded last group, so padding codes contribute nothing.
  decode (≤ 8 tokens):  per group k, P[k] = codes[k] @ x[k] with BLAS (codes cast to float32 once),
                        then y = Σ_k scale[k]·P[k] − Σ_k scale[k]·zero[k]·Σx[k]: no other float32
                        pass over the weights.
  prefill (more):       W = (codes − zero)·scale in float32 (SPEC.md §6.1), y = x @ Wᵀ (sgemm).
Scales and zeros are decoded per chunk of rows from the 8-bit codes (SPEC.md §6.2). CSR outliers
are added as y[:, r] += Σ v·x[:, c], the same as adding them to W.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import time
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING

import numpy as np

from ...format_spec.layout import META_GROUP_SIZE

if TYPE_CHECKING:
    from .numpy_backend import NumpyBackend

# bits -> (U codes per unit, B bytes per unit): the packed bit stream repeats every B bytes
UNITS = {2: (4, 1), 3: (8, 3), 4: (2, 1), 5: (8, 5), 6: (4, 3), 8: (1, 1)}
ACTIVATION_BLOCK = 32  # the affine kernels round x per block of this many columns (quantize_activations) ...
ACTIVATION_LOW_BITS = 8  # ... to 2^this·high + low, both int8: ~16-bit steps (or low = 0: activation_low_part)
KERNEL_MAX_TOKENS = 16  # up to this many rows of x the compiled kernels beat dequantize + sgemm (measured) ...
DOT_ISAS = ("vnni", "avx2", "generic")  # the integer dot products' lowerings, best first (cpu_qdot.dot_isas)
# ... and kernel stacks (the tiles' integer dot products) up to this many, by the kernels' lowering and
# $MXQ_ACTIVATIONS: as far as the tiles beat dequantize + sgemm on SmolLM2's prefill (measured, README "Prefill
# pieces"): whole 256-token pieces with VNNI; with AVX2 alone (Zen 1) 64 rows at ~16-bit activations (1.27× the
# time of sgemm at 128 rows) and 128 at 8-bit (1.09× at 256); LLVM's generic lowering, several times slower than
# AVX2's, decode-sized inputs only
STACK_MAX_TOKENS = {("vnni", "16"): 256, ("vnni", "8"): 256, ("avx2", "16"): 64, ("avx2", "8"): 128,
                    ("generic", "16"): KERNEL_MAX_TOKENS, ("generic", "8"): KERNEL_MAX_TOKENS}
KERNEL_PARALLEL_MIN_WEIGHTS = 1 << 19  # smaller matrices always run on the calling thread; bigger: ThreadChoice
TEAM_MIN_WEIGHTS = 1 << 16  # products on the team (cpu_team.py) from this many weights (a job costs ~1 µs)
DECODE_MAX_TOKENS = 8  # NumPy path: up to this many rows of x, use the per-group (decode) product
DECODE_CHUNK_BYTES = 1 << 20  # float32 weight chunk per BLAS call while decoding (fits in L2)
PREFILL_CHUNK_BYTES = 1 << 20  # ... while prefilling (4 MiB was no faster on SmolLM2: measured)
PARALLEL_MIN_WORK = 1 << 18  # split a product over threads from this many weights to dequantize ...
PARALLEL_MIN_FLOPS = 1 << 23  # ... or multiply-adds with cached float32 weights
PRIVATE_COPY_MIN_BYTES = 16 << 20  # lean: fp16 matrices this big are streamed from anonymous memory (DenseWeight)
COPY_CHUNK_BYTES = 4 << 20  # ... copied this much at a time


def readonly(a: np.ndarray) -> np.ndarray:
    """A read-only C-contiguous view (mmapped blobs are read-only: the kernels compile for that)."""
    a = np.ascontiguousarray(a).view()
    a.flags.writeable = False
    return a


def content_cached(store, array: np.ndarray, make):
    """make(array), made once per distinct content of `array` while one is alive: `store` (a
    weakref.WeakValueDictionary of the caller's) keeps what was made, keyed by the content's hash, shape and
    dtype — not the blob's address: equal content gives equal results, and a closed file's address may be
    reused by another file's bytes. The tensors of a file that share a codebook or table share one result."""
    array = np.ascontiguousarray(array)
    key = (hashlib.blake2b(array.view(np.uint8).reshape(-1), digest_size=16).digest(), array.shape, array.dtype.str)
    found = store.get(key)
    if found is None:
        found = store[key] = make(array)
    return found


def decoded_scales(scale_codes: np.ndarray, scale_meta: np.ndarray, n_groups: int, rows: np.ndarray) -> np.ndarray:
    """Decoded scales of `rows` (R,): (R, G) float32, scale = code·step + min over the runs of 128 (SPEC.md §6.2;
    = format_spec.decode_meta); scale_codes uint8 (out, G), scale_meta float32 (runs, 2)."""
    run = (rows[:, None] * n_groups + np.arange(n_groups)[None, :]) // META_GROUP_SIZE  # (R, G)
    return scale_codes[rows].astype(np.float32) * scale_meta[run, 0] + scale_meta[run, 1]


# stand-ins for absent kernel arguments (same types as present ones; the kernels' signatures fix them)
NO_ROWS = readonly(np.zeros(1, np.uint32))  # CSR row_ptr, cols, fp16 values without outliers
NO_COLS = readonly(np.zeros(0, np.uint16))
NO_VALUES = readonly(np.zeros(0, np.uint16))
NO_FLOAT = np.zeros(0, np.float32)
NO_RESIDUAL = np.zeros((0, 0), np.float32)
NO_MAP = readonly(np.zeros(0, np.int64))  # no row map: stored row r is output column r


def cpu_info() -> dict:
    """The first processor's fields in Linux's /proc/cpuinfo ({} where there is none)."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if not line.strip():
                    break  # the first processor is enough
                name, _, value = line.partition(":")
                fields[name.strip()] = value.strip()
    except OSError:
        pass
    return fields


def dot_isa_of(flags) -> str:
    """The best of DOT_ISAS a CPU with these /proc/cpuinfo flags runs — what cpu_qdot.dot_isas() asks LLVM
    about the host, answered without LLVM (the kernels built ahead of time load without it; a test holds
    the two equal on the machine that runs it)."""
    flags = set(flags)
    if {"avx512_vnni", "avx512vl"} <= flags:
        return "vnni"
    return "avx2" if "avx2" in flags else "generic"


def host_dot_isa() -> str:
    """dot_isa_of this CPU (no flags line, as on Arm: "generic", LLVM's answer there too)."""
    return dot_isa_of(cpu_info().get("flags", "").split())


ACTIVATIONS = ("16", "8")  # $MXQ_ACTIVATIONS: the compiled kernels' rounding of x (activation_low_part) ...
# ... and its default by the CPU's integer dot product: 8 bits where AVX2 or AVX512-VNNI multiplies (one integer dot
# product per code vector instead of two: on Zen 1 (AVX2) the decode stacks took 0.72-0.88x the time, on Zen 4 (VNNI)
# prefill was 1.28-1.52x as fast, decode level; perplexity +0.04%: README "8-bit activations"), ~16 with LLVM's
# generic lowering (aarch64 and others: not measured)
DEFAULT_ACTIVATIONS = {"vnni": "8", "avx2": "8", "generic": "16"}
ACTIVATION_SETTING = (os.environ.get("MXQ_ACTIVATIONS")  # read once: rounding and kernels agree
                      or DEFAULT_ACTIVATIONS[host_dot_isa()])


def activation_low_part() -> bool:
    """Whether the compiled kernels round activations to ~16 bits — an int8 high and low part per column,
    x̂ = (2^L·high + low)·dx ($MXQ_ACTIVATIONS=16) — or to 8 bits, the low part left zero ($MXQ_ACTIVATIONS=8:
    llama.cpp's Q8 activations); unset, DEFAULT_ACTIVATIONS for this CPU. 8 bits halve the integer multiplies
    (what that buys: DEFAULT_ACTIVATIONS' comment, README "8-bit activations") at a cost in exactness: SmolLM2's
    perplexity +0.05%, but the tiny random models' logits moved by 2-4% of their largest against transformers
    instead of < 0.1%. Read once per process (ACTIVATION_SETTING); the kernels are compiled for one setting
    (cpu_aot.key includes it; cpu_jit rejects values not in ACTIVATIONS)."""
    return ACTIVATION_SETTING != "8"


def quantize_activations(x: np.ndarray, low_part: bool) -> np.ndarray:
    """x (T, in) float32 rounded as the compiled affine kernels use it: per token and block of
    ACTIVATION_BLOCK columns, v = x·127/max|x| is split into high = round(v) and low = round((v − high)·2^L)
    (L = ACTIVATION_LOW_BITS; int8 each, round half to even), x̂ = (2^L·high + low)·max|x|/127/2^L: ~16-bit
    steps; without the low part (low_part False: low = 0) 8-bit steps. The kernels compute W·x̂ with this x̂
    (integer dot products of codes and int8 activations, cpu_qdot.py); activation_low_part() says which rounding
    the kernels use."""
    T, n_in = x.shape
    n_blocks = -(-n_in // ACTIVATION_BLOCK)
    padded = np.zeros((T, n_blocks * ACTIVATION_BLOCK), np.float32)
    padded[:, :n_in] = x
    blocks = padded.reshape(T, n_blocks, ACTIVATION_BLOCK)
    amax = np.abs(blocks).max(axis=2, keepdims=True)  # (T, n_blocks, 1)
    safe = np.where(amax > 0, amax, np.float32(1.0))
    fine = np.float32(1 << ACTIVATION_LOW_BITS)
    v = blocks * (np.float32(127.0) / safe)
    high = np.clip(np.rint(v), -127, 127)
    low = np.clip(np.rint((v - high) * fine), -127, 127) if low_part else np.zeros_like(high)
    step = np.where(amax > 0, amax / np.float32(127.0) / fine, np.float32(0.0))
    x_hat = (high * fine + low) * step
    return x_hat.reshape(T, -1)[:, :n_in].astype(np.float32)


def add_bias_residual(y: np.ndarray, bias, residual) -> np.ndarray:
    if bias is not None:
        y += bias
    if residual is not None:
        y += residual
    return y


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


class ThreadChoice:
    """Whether a matrix's compiled product runs on the calling thread or on all threads: whichever was
    faster lately — measured, not guessed. Numba's OpenMP workers sleep between kernels (cpu_jit.py);
    waking one costs microseconds on an idle machine but can take a scheduler period on a busy one,
    where SmolLM2 decoded 0.77x as fast on 2 threads as on 1 with every big product parallel (measured).
    Matrices of one shape and kind share a choice (the 30 gate projections of a 30-layer model: one).
    Each way runs on PROBE of the first calls; then the faster one (wall time, moving average), the
    other once every RETRY calls (the machine's load changes). Both ways give the same numbers."""

    PROBE, RETRY, SMOOTHING = 3, 256, 0.25

    def __init__(self):
        self.seconds = [0.0, 0.0]  # moving average of a call's wall time: serial, parallel
        self.calls = 0

    def parallel(self) -> bool:
        n, self.calls = self.calls, self.calls + 1
        if n < 2 * self.PROBE:
            return n % 2 == 1
        faster = self.seconds[1] < self.seconds[0]
        return faster != (n % self.RETRY == 0)

    def record(self, parallel: bool, seconds: float) -> None:
        old = self.seconds[parallel]
        self.seconds[parallel] = seconds if old == 0.0 else old + self.SMOOTHING * (seconds - old)


class Matrix:
    """What both weight kinds share: `cache()` makes a float32 copy once (--cache-dequantized, or a tied
    embedding when it is first used as the lm_head); without one, a product runs the compiled kernel
    for decode-sized inputs and the NumPy path otherwise (or when the kernel is unavailable).
    Subclasses give shape, backend, cache(), lean_rows(ids), kernel_matmul(...) and numpy_matmul(x)."""

    dense = None  # float32 (out, in) once cached
    kernel_tokens = KERNEL_MAX_TOKENS  # the compiled kernel multiplies up to this many rows of x

    def rows(self, ids):
        """Rows `ids` as float32 (T, in): the embedding gather."""
        return self.dense[ids] if self.dense is not None else self.lean_rows(ids)

    def matmul(self, x, bias=None, residual=None):
        """x (T, in) float32 C-contiguous → x @ Wᵀ + bias + residual (T, out)."""
        if self.dense is None and self.backend.cache_dequantized:
            self.cache()  # a tied embedding, first used as lm_head
        if self.dense is not None:
            return add_bias_residual(dense_matmul(self.backend, self.dense, x), bias, residual)
        kernels = self.backend.kernels_for(x.shape[0], self.kernel_tokens)
        if kernels is not None:
            y = np.empty((x.shape[0], self.shape[0]), dtype=np.float32)
            if self.kernel_matmul(kernels, x, bias, residual, y):
                return y
        return add_bias_residual(self.numpy_matmul(x), bias, residual)

    @cached_property
    def threads_choice(self) -> ThreadChoice | None:
        """The backend's ThreadChoice for this kind and shape; None: always the calling thread (one
        thread, serial-only kernels, or a small matrix)."""
        if (self.backend.threads < 2 or not self.backend.kernels.parallel
                or self.shape[0] * self.shape[1] < KERNEL_PARALLEL_MIN_WEIGHTS):
            return None
        return self.backend.thread_choices.setdefault((type(self).__name__, self.shape), ThreadChoice())

    @cached_property
    def team_parts(self) -> int:
        """How many parts this product is cut into on the backend's team (cpu_team.py); 0: it never runs there
        (no team, or fewer than TEAM_MIN_WEIGHTS weights)."""
        be = self.backend
        if be.team is None or self.shape[0] * self.shape[1] < TEAM_MIN_WEIGHTS:
            return 0
        return be.team_parts(self.shape[0])

    def run_product(self, serial, parallel, *args, team=None) -> bool:
        """The product on the backend's team (cpu_team.py) with the `team` kernel when there is one and the
        matrix is big enough; else backend.run_kernel of the serial or the parallel kernel, as
        threads_choice picks (and times)."""
        if team is not None and self.team_parts and self.backend.team is not None:
            done = self.backend.run_team(team, *args, self.team_parts)
            if done is not None:
                return done  # (None: another thread's product holds the team; this one runs below)
        choice = self.threads_choice
        if choice is None:
            return self.backend.run_kernel(serial, *args)
        use_parallel = choice.parallel()
        t0 = time.perf_counter()
        done = self.backend.run_kernel(parallel if use_parallel else serial, *args)
        choice.record(use_parallel, time.perf_counter() - t0)
        return done


def _mapping_of(view: np.ndarray):
    """(the mmap a C-contiguous view of the mapped file lies in, its byte offset there), or (None, 0)."""
    mapping = view
    while mapping is not None and not isinstance(mapping, mmap.mmap):  # view → ... → memoryview → the mmap
        mapping = mapping.obj if isinstance(mapping, memoryview) else getattr(mapping, "base", None)
    if mapping is None or not hasattr(mmap, "MADV_DONTNEED") or not view.flags.c_contiguous:
        return None, 0
    start = view.__array_interface__["data"][0] - np.frombuffer(mapping, np.uint8, count=1).__array_interface__["data"][0]
    return mapping, start


def release(view: np.ndarray) -> None:
    """Drop the pages a view of the mapped file touches from this process (MADV_DONTNEED; the file stays in
    the page cache, and whatever is read there later — the view or a neighbouring blob — faults back in): for
    bytes kept elsewhere from now on."""
    mapping, start = _mapping_of(view)
    if mapping is None:
        return
    first, last = start // mmap.PAGESIZE, -(-(start + view.nbytes) // mmap.PAGESIZE)  # every page it touches
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first * mmap.PAGESIZE, (last - first) * mmap.PAGESIZE)


def off_the_mapping(view: np.ndarray) -> np.ndarray:
    """A read-only copy of a view of the mmapped file in anonymous memory, made chunk by chunk; after
    each chunk its whole pages of the mapping are dropped from this process (MADV_DONTNEED: the file
    stays in the page cache; resident memory does not grow by the copy). Why: NumPy gives arrays this
    big 2 MiB pages (transparent huge pages) where the kernel allows it, and streaming the fp16 lm_head
    from those decodes faster than from the file's 4 KiB pages (SmolLM2's 54 MiB: 2.3 vs 3.3 ms per
    token on one thread, measured). The view itself when it does not come from a releasable mmap."""
    mapping, start = _mapping_of(view)
    if mapping is None:
        return view
    out = np.empty(view.shape, view.dtype)
    flat_in, flat_out = view.reshape(-1).view(np.uint8), out.reshape(-1).view(np.uint8)
    for c0 in range(0, flat_in.size, COPY_CHUNK_BYTES):
        c1 = min(flat_in.size, c0 + COPY_CHUNK_BYTES)
        flat_out[c0:c1] = flat_in[c0:c1]
        first, last = -(-(start + c0) // mmap.PAGESIZE), (start + c1) // mmap.PAGESIZE  # whole pages only
        if last > first:
            mapping.madvise(mmap.MADV_DONTNEED, first * mmap.PAGESIZE, (last - first) * mmap.PAGESIZE)
    out.flags.writeable = False
    return out


class DenseWeight(Matrix):
    """An fp16 matrix (out, in): multiplied from the fp16 file bytes (lean: compiled kernel for few
    tokens, else converted to float32 chunk by chunk), or from a float32 copy made once (cached).
    Lean mode streams a big one (≥ PRIVATE_COPY_MIN_BYTES, e.g. a tied embedding / lm_head) from a copy
    in anonymous memory instead of the mapping (off_the_mapping: faster, same resident memory)."""

    def __init__(self, name, data: np.ndarray, backend: NumpyBackend):
        if not backend.cache_dequantized and backend.kernels is not None and data.nbytes >= PRIVATE_COPY_MIN_BYTES:
            data = off_the_mapping(data)
        self.name, self.data, self.backend = name, data, backend
        self.shape = data.shape
        self.half_bits = readonly(data.view(np.uint16))  # (out, in) fp16 bit patterns, zero-copy

    def cache(self):
        if self.dense is None:
            self.dense = self.data.astype(np.float32)

    def lean_rows(self, ids):
        return self.data[ids].astype(np.float32)  # (T, in)

    def kernel_matmul(self, kernels, x, bias, residual, y) -> bool:
        return self.run_product(kernels.fp16_matmul_serial, kernels.fp16_matmul, x, self.half_bits,
                                *kernel_extras(bias, residual), y, team=kernels.fp16_matmul_team)

    def numpy_matmul(self, x):
        """x (T, in) @ Wᵀ, converting fp16 rows to float32 chunk by chunk."""
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


def kernel_extras(bias, residual) -> tuple:
    """(bias, residual) as the kernels take them: the NO_* stand-ins when absent."""
    return (NO_FLOAT if bias is None else bias,
            NO_RESIDUAL if residual is None else np.ascontiguousarray(residual, dtype=np.float32))


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


class AffineWeight(Matrix):
    """A packed `affine` matrix (out, in), multiplied straight from the mmapped file bytes (lean), or
    dequantized once to float32 (cached). Lean mode keeps only views of the file plus the metadata
    runs' (step, min) as float32 (one pair per 128 groups): scales and zeros are decoded when used."""

    def __init__(self, entry, blobs: dict, backend: NumpyBackend):
        self.name, self.shape, self.backend = entry.name, tuple(entry.shape), backend
        self.bits, self.group_size = entry.config.bits, entry.config.group_size
        out_features, in_features = self.shape
        self.n_groups = -(-in_features // self.group_size)
        self.packed = readonly(blobs["qweight"].view(np.uint8))  # (out, G·g·b/8), zero-copy
        self._meta_codes = [readonly(blobs["scale_codes"]), readonly(blobs["zero_codes"])]  # (out, G) uint8 each
        self._meta_unpacked = entry.config.meta_bits != 8  # 6-bit codes: unpacked copies (format_spec.loaded_blobs)
        self.scale_meta = blobs["scale_meta"].astype(np.float32)  # (runs, 2): step, min
        self.zero_meta = blobs["zero_meta"].astype(np.float32)
        self.columns = column_order(in_features, self.bits, self.group_size)  # (G·g,)
        self.csr = None  # (row_ptr uint32 (out+1,), cols uint16 (nnz,), fp16 bits uint16 (nnz,)), zero-copy
        if entry.config.outliers:
            self.csr = (readonly(blobs["outlier_row_ptr"]), readonly(blobs["outlier_cols"]),
                        readonly(blobs["outlier_values"].view(np.uint16)))
        self._tiles = None
        if entry.role != "embedding":  # (an embedding gets its tiles only if it serves as the lm_head: tiles())
            self.tiles()

    def tiles(self):
        """The codes in tiles of 16 rows (cpu_tiles.py) that decode's kernels read, made at the first call, or
        None (no kernels, or --cache-dequantized). The file's pages of the codes they replace are released, a
        chunk of rows at a time as the tiles fill (an embedding with tiles — the tied lm_head — is looked up
        from them too: dequantize_rows)."""
        kernels = self.backend.kernels
        if self._tiles is None and kernels is not None and not self.backend.cache_dequantized:
            from .cpu_tiles import build

            self._tiles = build(self.packed, self.scale_codes, self.zero_codes, self.scale_meta, self.zero_meta,
                                self.bits, kernels.repack, release)
            for which, codes in enumerate(self._meta_codes):
                if self._meta_unpacked:  # 6-bit codes unpacked at load: the tiles hold them now
                    self._meta_codes[which] = None
                else:  # 8-bit codes: views of the file, whose pages go (they fault back in if read)
                    release(codes)
        return self._tiles

    @property
    def scale_codes(self) -> np.ndarray:
        """(out, G) uint8 scale codes: a view of the file, or read back from the tiles (6-bit codes, which
        lean mode keeps unpacked once: in the tiles)."""
        return self._codes_of(0)

    @property
    def zero_codes(self) -> np.ndarray:
        return self._codes_of(1)

    def _codes_of(self, which: int) -> np.ndarray:
        codes = self._meta_codes[which]
        if codes is None:
            from .cpu_tiles import TILE_ROWS

            lanes = (self._tiles.scale_codes, self._tiles.zero_codes)[which]  # (n_tiles, G · 16)
            codes = lanes.reshape(-1, self.n_groups, TILE_ROWS).transpose(0, 2, 1).reshape(-1, self.n_groups)
            return readonly(codes[:self.shape[0]])
        return codes

    @cached_property
    def outliers(self):
        """The NumPy path's outliers: (rows that have some, their first index, cols, float32 values,
        row_ptr), or None."""
        if self.csr is None:
            return None
        row_ptr = self.csr[0].astype(np.int64)
        rows = np.flatnonzero(np.diff(row_ptr))
        return rows, row_ptr[rows], self.csr[1].astype(np.intp), self.csr[2].view(np.float16).astype(np.float32), row_ptr

    def meta_rows(self, r: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray]:
        """Decoded (scale, zero), each (R, G) float32, of rows r (SPEC.md §6.2; = decode_meta)."""
        rows = np.arange(self.shape[0])[r]
        run = (rows[:, None] * self.n_groups + np.arange(self.n_groups)[None, :]) // META_GROUP_SIZE  # (R, G)
        scale = self.scale_codes[r].astype(np.float32) * self.scale_meta[run, 0] + self.scale_meta[run, 1]
        zero = self.zero_codes[r].astype(np.float32) * self.zero_meta[run, 0] + self.zero_meta[run, 1]
        return scale, zero

    def _codes(self, packed, scratch):
        """Codes of packed rows (R, n_bytes) as (U, R, G, g/U) uint8 (see unpack_planes)."""
        U, _ = UNITS[self.bits]
        return unpack_planes(packed, self.bits, scratch).reshape(U, packed.shape[0], self.n_groups, -1)

    def _dequantize_into(self, codes, r, w):
        """w (R, G, U, g/U) float32 = (codes − zero)·scale (SPEC.md §6.1) for rows r."""
        scale, zero = self.meta_rows(r)
        np.subtract(codes.transpose(1, 2, 0, 3), zero[:, :, None, None], out=w)
        np.multiply(w, scale[:, :, None, None], out=w)
        return w

    # -- full dequantization --------------------------------------------------------------------------
    def dequantize_rows(self, r: np.ndarray | slice) -> np.ndarray:
        """Float32 rows of W in the natural column order, outliers included: (R, in). Read from the tiles
        when the codes live there (an embedding that is also the lm_head): the file's pages stay released."""
        in_features, kernels = self.shape[1], self.backend.kernels
        row_ids = np.arange(self.shape[0])[r]  # (R,): out-of-range ids raise here, before any kernel
        R = row_ids.size
        if self._tiles is not None and kernels is not None:
            out = np.empty((R, self.n_groups * self.group_size), np.float32)
            t = self._tiles
            kernels.tile_dequantize(t.codes, t.scale_codes, t.zero_codes, t.meta, row_ids, self.bits, self.group_size,
                                    out)
            out = out[:, :in_features]
        else:
            packed = np.ascontiguousarray(self.packed[r])
            U, _ = UNITS[self.bits]
            codes = self._codes(packed, _fresh)
            w = self._dequantize_into(codes, r, np.empty((R, self.n_groups, U, self.group_size // U), np.float32))
            out = np.empty((R, in_features + 1), dtype=np.float32)
            out[:, self.columns] = w.reshape(R, -1)  # the padding positions all land in column in_features
            out = out[:, :in_features]
        if self.outliers is not None:
            _, _, cols, values, row_ptr = self.outliers
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

    def lean_rows(self, ids):
        return self.dequantize_rows(ids)

    # -- products -------------------------------------------------------------------------------------
    def kernel_matmul(self, kernels, x, bias, residual, y) -> bool:
        csr = self.csr or (NO_ROWS, NO_COLS, NO_VALUES)
        return self.run_product(kernels.affine_matmul_serial, kernels.affine_matmul, x, self.packed, self.scale_codes,
                                self.scale_meta, self.zero_codes, self.zero_meta, self.bits, self.group_size, *csr,
                                *kernel_extras(bias, residual), y)

    def numpy_matmul(self, x):
        """The NumPy path's x (T, in) @ Wᵀ (the reference for the kernels); for more than
        DECODE_MAX_TOKENS rows with the compiled kernels loaded, their one-pass dequantization
        (cpu_kernels.affine_dequantize) replaces NumPy's before each sgemm."""
        T, in_features = x.shape
        out_features = self.shape[0]
        y = np.empty((T, out_features), dtype=np.float32)
        kernels = self.backend.kernels
        if T > DECODE_MAX_TOKENS and kernels is not None:
            part = lambda r0, r1, scratch: self._prefill_rows_compiled(kernels, x, y, r0, r1, scratch)
            self.backend.parallel_rows(out_features, out_features * in_features >= PARALLEL_MIN_WORK, part)
            if self._tiles is not None:  # the pages where the parts' chunks met
                release(self.packed)
            return self._add_outliers(x, y)
        x_perm = np.take(x, np.minimum(self.columns, in_features - 1), axis=1)  # (T, G·g) in unpack order ...
        x_perm[:, self.columns == in_features] = 0.0  # ... zeros at padding
        if T <= DECODE_MAX_TOKENS:
            G, g = self.n_groups, self.group_size
            xg = np.ascontiguousarray(x_perm.reshape(T, G, g).transpose(1, 2, 0))  # (G, g, T)
            x_sum = x_perm.reshape(T, G, g).sum(axis=2)  # (T, G)
            part = lambda r0, r1, scratch: self._decode_rows(xg, x_sum, y, r0, r1, scratch)
        else:
            part = lambda r0, r1, scratch: self._prefill_rows(x_perm, y, r0, r1, scratch)
        self.backend.parallel_rows(out_features, out_features * in_features >= PARALLEL_MIN_WORK, part)
        return self._add_outliers(x, y)

    def _add_outliers(self, x, y):
        """y (T, out) += x @ (CSR outliers)ᵀ."""
        if self.outliers is not None:
            rows, starts, cols, values, _ = self.outliers
            y[:, rows] += np.add.reduceat(x[:, cols] * values, starts, axis=1)  # (T, rows with outliers)
        return y

    def _prefill_rows_compiled(self, kernels, x, y, r0, r1, scratch):
        """y[:, r0:r1] for many tokens: the compiled kernel dequantizes a chunk of rows, then sgemm."""
        in_features, padded = self.shape[1], self.n_groups * self.group_size
        chunk = _chunk_rows(x.shape[0], padded)
        for c0 in range(r0, r1, chunk):
            c1 = min(r1, c0 + chunk)
            w = scratch("weight", (c1 - c0, padded), np.float32)  # (rows, G·g), natural column order
            kernels.affine_dequantize(self.packed, self.scale_codes, self.scale_meta, self.zero_codes, self.zero_meta,
                                      self.bits, self.group_size, c0, w)
            if self._tiles is not None:  # decode reads the tiles: these rows' pages of the file go again
                release(self.packed[c0:c1])
            y[:, c0:c1] = x @ w[:, :in_features].T  # (T, rows)

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
            scale, zero = self.meta_rows(slice(c0, c1))  # (R, G)
            partial *= scale.T[:, :, None]
            y[:, c0:c1] = partial.sum(axis=0).T - x_sum @ (zero * scale).T

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


class RowDequantized(Matrix):
    """A codebook matrix (lut, vq, trellis) whose NumPy path and cached copy come from `dequantize_rows(r, scratch)`:
    float32 rows r (R, in), outliers included, possibly a view of scratch's reused buffer."""

    def dequantize_rows(self, r, scratch=_fresh) -> np.ndarray:
        raise NotImplementedError

    def cache(self):
        if self.dense is None:
            self.dense = np.empty(self.shape, dtype=np.float32)
            chunk = max(1, (64 << 20) // (4 * self.shape[1]))
            for r0 in range(0, self.shape[0], chunk):
                self.dense[r0:r0 + chunk] = self.dequantize_rows(slice(r0, r0 + chunk))

    def lean_rows(self, ids):
        return np.ascontiguousarray(self.dequantize_rows(ids))

    def numpy_matmul(self, x):
        """x (T, in) @ Wᵀ, dequantizing chunks of rows to float32 (the reference for the kernel)."""
        T = x.shape[0]
        out_features, in_features = self.shape
        y = np.empty((T, out_features), dtype=np.float32)
        chunk = _chunk_rows(T, in_features)

        def part(r0, r1, scratch):
            for c0 in range(r0, r1, chunk):
                c1 = min(r1, c0 + chunk)
                y[:, c0:c1] = x @ self.dequantize_rows(slice(c0, c1), scratch).T  # (T, rows)

        self.backend.parallel_rows(out_features, out_features * in_features >= PARALLEL_MIN_WORK, part)
        return y


def _chunk_rows(T: int, row_elements: int) -> int:
    budget = DECODE_CHUNK_BYTES if T <= DECODE_MAX_TOKENS else PREFILL_CHUNK_BYTES
    return max(8, budget // (4 * row_elements))

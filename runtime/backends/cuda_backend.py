"""The CUDA backend: the forward pass on an NVIDIA GPU with CuPy arrays and mxq's raw CUDA kernels.

One class, two bindings (ARCHITECTURE.md, "Backends share one shape"):

    CudaBackend()                        # the product: xp = cupy, kernels = kernels.nvrtc.load_module()
    CudaBackend(xp=numpy, module=M)      # host arrays and a CPU launcher M with the same get_function
                                         # interface — the tests inject the emulator's (the same .cu
                                         # kernels compiled by g++); this module never imports it

Everything else — buffer layout, launch geometry, kernel arguments, dtypes, the KV cache — is the
same code on both. The CuPy-specific part is `_CupyBinding` (host↔device copies, pointer addresses,
NULL pointers, the memory pool) and the choice of `xp`: `xp.matmul` is cuBLAS on a GPU, BLAS on the
host.

What runs where (T = tokens in the call: the prompt length at prefill, 1 at decode):
  weights     `prepare` uploads the mmapped blobs as stored (packed codes, uint8 scale/zero codes +
              fp16 run metadata, CSR outliers): the device holds the file's bytes, nothing is expanded.
              The GEMVs load packs / fp16 rows with 16-byte vector loads, so qweight and fp16 matrices
              must be 16-byte aligned: the file aligns blobs to 64 bytes and CuPy allocations are
              256-byte aligned; anything else is copied into an aligned buffer.
  linear      affine, T == 1: fused dequant + GEMV (gemv_affine_b*_g*), outliers fused, bias (and an
              optional residual) fused through the kernel's `residual` argument; lut likewise with
              gemv_lut_b* (codebooks widened into shared memory, one lookup per weight), vq with
              gemv_vq_b*_d* (the tensor's codebook in shared memory, one lookup per dim-vector, the
              double-quantized scales decoded like affine's; qweight's row width in words — rows padded to
              whole packs up to format 1.7, to whole words from 1.8 — and the group size are kernel arguments).
              A vq codebook is uploaded once per distinct content (`_codebook`): the tensors and row blocks that
              use a file's shared codebook (format 1.7, e.g. v3d4's 4096 points, 32 KiB) all get one device array.
              trellis (format 1.9) with gemv_trellis_b* (the file's 4096-level fp16 table for the tensor's bits in
              shared memory, each lane walking its 32-column chunks of the rows' bit streams; scales as vq's); its
              table is uploaded once per distinct content too (`_codebook`), so every tensor with the same bits
              shares one device array.
              affine / lut / vq / trellis, T > 1: dequantize the matrix on the device
              (dequant_{affine,lut,vq,trellis}_*_f32, in row chunks of at most `prefill_chunk_bytes`) and one GEMM
              per chunk (cuBLAS sgemm) — never T GEMVs.
              fp16, T == 1: gemv_f16 on the stored fp16 data (2 bytes per weight, read once; bias and
              residual fused as above) — no fp32 copy of the matrix exists for decode.
              fp16, T > 1: converted to float32 on the device in row chunks of at most
              `prefill_chunk_bytes` (a reused scratch buffer), one GEMM per chunk.
  embedding   fp16 table: embedding_f16; affine / lut / vq / trellis table: dequant_*_f32 with row_ids = the ids.
  rows        a `rows` matrix (SPEC.md §8) is a RowBlocks (row_blocks.py) of the handles above, one per
              block: linear and embedding run per block as above, the outputs scattered to the logical
              rows by a device index (bias and residual added after, not fused).
  rms_norm, rope, silu_mul, gelu_mul, add, scale: rmsnorm_f32 (per-head q/k norms: the same kernel on
              a (T·n, head_dim) view), rope_f32 (partial rotary: the tail dims pass through),
              silu_mul_f32, gelu_mul_f32, add_f32 (in place), scale_f32.
  attention   kv_store_{f16,f32} writes k, v into the cache; attention_{f16,f32}kv (+ attention_combine
              when the keys are split, flash-decoding), with the attention scale and an optional sliding
              window (only the keys some query can see are split). The KV cache lives on the device in fp16 by
              default (`kv_cache="f16"`: half the memory and bandwidth); `kv_cache="f32"` matches the
              numpy backend's float32 cache exactly.
  token_nll   on the host (logits are copied once).

`cache_dequantized=True` (the runtime's memory option) additionally keeps every quantized and fp16 matrix
as float32 on the device (a tied embedding once it is first used as the lm_head, as in the numpy
backend), so prefill skips the conversion (4 bytes per weight more GPU memory); decode still uses the
GEMVs, which read about b/8 (affine, lut, vq, trellis) or 2 (fp16) bytes per weight instead of 4.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

from ...kernels.registry import (AFFINE_CONFIGS, GEMV_F16, LUT_BITS, TRELLIS_KERNEL_BITS, VQ_CONFIGS, attention_launch,
                                 dequant_launch, dequant_lut_name, dequant_name, dequant_trellis_name, dequant_vq_name,
                                 elementwise_launch, gemv_launch, gemv_lut_name, gemv_name, gemv_trellis_name,
                                 gemv_vq_name, rope_items, rowwise_launch)
from ..errors import ModelError
from .base import Backend, KVCache, LayerCache
from .row_blocks import RowBlocks

i32, f32 = np.int32, np.float32
KV_DTYPES = {"f16": np.float16, "f32": np.float32}
PREFILL_CHUNK_BYTES = 64 << 20  # largest float32 block of a dequantized matrix at prefill
QWEIGHT_ALIGNMENT = 16  # the GEMVs' widest vector load (uint4): qweight and fp16 matrices
CODEBOOK_ALIGNMENT = 16  # gemv_vq_b3_d4 and gemv_trellis_b* stage their fp16 codebook / table with uint4 loads
                         # (2-byte loads otherwise)
CUDA_HINT = "use --device cpu"


# ---- bindings: what differs between CuPy on a GPU and NumPy arrays on the host -----------------------

class _NumpyBinding:
    """Host numpy arrays, for a CPU launcher (the tests' emulator) that takes numpy arrays and None for NULL."""

    null = None

    def __init__(self, xp):
        self.xp = xp

    def to_device(self, array: np.ndarray):
        return np.ascontiguousarray(array)  # zero-copy for the mmapped blobs

    def to_host(self, x) -> np.ndarray:
        return np.asarray(x)

    @staticmethod
    def address(x) -> int:
        return x.__array_interface__["data"][0]

    def close(self) -> None:
        pass


class _CupyBinding:
    """CuPy device arrays; RawKernel arguments are cupy arrays, NULL is a pointer-sized zero."""

    null = np.uint64(0)

    def __init__(self, cupy):
        self.xp = cupy

    def to_device(self, array: np.ndarray):
        return self.xp.asarray(np.ascontiguousarray(array))  # host → device copy (pool memory: 256-aligned)

    def to_host(self, x) -> np.ndarray:
        return self.xp.asnumpy(x)

    @staticmethod
    def address(x) -> int:
        return int(x.data.ptr)

    def close(self) -> None:
        self.xp.get_default_memory_pool().free_all_blocks()


def _load_cupy():
    """CuPy with at least one GPU, or a ModelError that says which is missing."""
    try:
        import cupy
    except ImportError:
        raise ModelError(f"device 'cuda': CuPy is not installed (pip install 'mxq[cuda]'); {CUDA_HINT}") from None
    except Exception as error:  # a broken install (missing CUDA libraries ...)
        detail = " ".join(str(error).split())
        raise ModelError(f"device 'cuda': CuPy failed to import ({type(error).__name__}: {detail}); "
                         f"{CUDA_HINT}") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # no driver, driver too old, no device node ...
        detail = " ".join(str(error).split())  # one line
        raise ModelError(f"device 'cuda': no CUDA GPU found ({detail}); {CUDA_HINT}") from None
    if count < 1:
        raise ModelError(f"device 'cuda': no CUDA GPU found; {CUDA_HINT}")
    return cupy


def _load_gpu_module():
    from ...kernels import nvrtc

    try:
        return nvrtc.load_module()
    except (nvrtc.NvrtcUnavailable, nvrtc.KernelCompileError) as error:
        raise ModelError(f"device 'cuda': cannot load mxq's CUDA kernels: {error}") from None


# ---- weight handles ---------------------------------------------------------------------------------

class DenseHandle:
    """An fp16 matrix (out, in) on the device, as stored. `dense` is a float32 copy, kept only with
    cache_dequantized (decode runs gemv_f16 on `data`; prefill converts row chunks into scratch)."""

    def __init__(self, name, data):
        self.name, self.data, self.shape = name, data, tuple(data.shape)
        self.dense = None

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


class QuantizedHandle:
    """A packed matrix (out, in) on the device, exactly as stored in the file: `blobs` are the kernels'
    leading pointer arguments, `tail` their trailing scheme parameters (after the shape arguments);
    `gemv` and `dequant` name its decode GEMV and its row dequantization (prefill, embedding gather)."""

    def __init__(self, name, shape, bits, blobs: tuple, outliers: bool, gemv: str, dequant: str, tail: tuple = ()):
        self.name, self.shape, self.bits = name, tuple(shape), bits
        self.blobs, self.outliers = blobs, outliers
        self.gemv, self.dequant, self.tail = gemv, dequant, tail
        self.dense = None  # float32 (out, in) on the device with cache_dequantized
        self.chunk_ids = {}  # (r0, r1) → device int32 row ids of a prefill chunk

    @property
    def nbytes(self) -> int:
        return sum(int(b.nbytes) for b in self.blobs if b is not None and hasattr(b, "nbytes"))


class AffineHandle(QuantizedHandle):
    """blobs: (qweight, scale_codes, scale_meta, zero_codes, zero_meta, row_ptr, cols, vals)."""

    def __init__(self, name, shape, bits, group_size, blobs: tuple, outliers: bool):
        super().__init__(name, shape, bits, blobs, outliers, gemv_name(bits, group_size),
                         dequant_name(bits, group_size, "f32"))
        self.group_size = group_size


class LutHandle(QuantizedHandle):
    """blobs: (qweight, codebook, row_ptr, cols, vals); the kernels take codebook_rows last."""

    def __init__(self, name, shape, bits, codebook_rows, blobs: tuple, outliers: bool):
        super().__init__(name, shape, bits, blobs, outliers, gemv_lut_name(bits), dequant_lut_name(bits),
                         (i32(codebook_rows),))
        self.codebook_rows = codebook_rows


class VqHandle(QuantizedHandle):
    """blobs: (qweight, codebook, scale_codes, scale_meta, row_ptr, cols, vals); the kernels take words_per_row
    (qweight's width as stored: rows padded to whole packs up to format 1.7, to whole words from 1.8, SPEC.md
    §12.1) and group_size last. The codebook is the backend's one device array for its content
    (CudaBackend._codebook), so handles whose codebook is the file's shared one (`shared`) hold the same array;
    nbytes counts it in each (the bytes a launch reads)."""

    def __init__(self, name, shape, bits, dim, group_size, blobs: tuple, outliers: bool, shared: bool = False):
        words_per_row = int(blobs[0].shape[1])  # qweight (out, words_per_row)
        super().__init__(name, shape, bits, blobs, outliers, gemv_vq_name(bits, dim), dequant_vq_name(bits, dim),
                         (i32(words_per_row), i32(group_size)))
        self.dim, self.group_size, self.shared = dim, group_size, shared


class TrellisHandle(QuantizedHandle):
    """blobs: (qweight, codebook, scale_codes, scale_meta) — codebook is the file's table for the tensor's bits
    (fp16 (4096, 1)), the backend's one device array for its content (CudaBackend._codebook), so every trellis
    tensor and row block with those bits holds the same array; nbytes counts it in each (the bytes a launch
    reads). The kernels take words_per_row (qweight's width: ceil((12 + (in − 1)·bits) / 32), SPEC.md §13) and
    group_size last. No outliers."""

    def __init__(self, name, shape, bits, group_size, blobs: tuple):
        words_per_row = int(blobs[0].shape[1])  # qweight (out, words_per_row)
        super().__init__(name, shape, bits, blobs, False, gemv_trellis_name(bits), dequant_trellis_name(bits),
                         (i32(words_per_row), i32(group_size)))
        self.group_size = group_size


# ---- the KV cache with a chosen dtype ----------------------------------------------------------------

# ---- the backend --------------------------------------------------------------------------------------

class CudaBackend(Backend):
    """The forward pass through mxq's CUDA kernels.

    xp        array module: None → cupy (a ModelError if CuPy or a GPU is missing); numpy → host arrays
              (then `module` is required).
    module    kernel launcher with .get_function(name)(grid, block, args): None → kernels.nvrtc.load_module()
              on the GPU; with xp=numpy a CPU launcher (the tests pass the emulator's EmulatedModule).
    kv_cache  "f16" (default: the GPU cache) or "f32" (exactly the numpy backend's cache).
    cache_dequantized  also keep quantized and fp16 matrices as float32 on the device (faster prefill).
    prefill_chunk_bytes  largest float32 block of a matrix dequantized / converted at once for a prefill GEMM.
    gemv_warps  warps per GEMV block (None: kernels.registry.gemv_launch's choice).
    """

    name = "cuda"
    schemes = ("fp16", "affine", "lut", "vq", "trellis")  # the 2-D storage schemes prepare_matrix handles
    fuses_residual = True  # linear(x, W, bias, residual=r) adds r inside the decode GEMV (see linear)

    def __init__(self, xp=None, module=None, *, kv_cache: str = "f16", cache_dequantized: bool = False,
                 prefill_chunk_bytes: int = PREFILL_CHUNK_BYTES, gemv_warps: int | None = None):
        if kv_cache not in KV_DTYPES:
            raise ModelError(f"kv_cache must be one of {', '.join(KV_DTYPES)}, got {kv_cache!r}")
        if xp is np and module is None:
            raise ValueError("CudaBackend(xp=numpy) needs a CPU kernel launcher: pass module=")
        if xp is None:
            xp = _load_cupy()
        self.xp = xp
        self.binding = _NumpyBinding(xp) if xp is np else _CupyBinding(xp)
        if module is None:
            module = _load_gpu_module()
        self.module = module
        self.kv_cache, self.kv_dtype = kv_cache, KV_DTYPES[kv_cache]
        self.cache_dequantized = bool(cache_dequantized)
        self.prefill_chunk_bytes = int(prefill_chunk_bytes)
        self.gemv_warps = gemv_warps
        self._functions: dict = {}
        self._scratch: dict = {}
        self._codebooks: dict = {}  # (sha1 of the bytes, shape, dtype) → device vq codebook, trellis table
        self._positions = (None, None)  # (host int64, device int32) of the last rope call
        if xp is not np:  # compile/load every source now, so a kernel problem is a load-time error
            try:
                for name in ("gemv_affine_b4_g64", "dequant_affine_b4_g64_f32", "gemv_lut_b4", "gemv_vq_b2_d4",
                             "gemv_trellis_b4", GEMV_F16, "add_f32"):
                    self._fn(name)
            except ModelError:
                raise
            except Exception as error:
                raise ModelError(f"device 'cuda': cannot load mxq's CUDA kernels: {error}") from None

    # -- plumbing ---------------------------------------------------------------------------------------
    def _fn(self, name: str):
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = self.module.get_function(name)
        return fn

    def _launch(self, name: str, grid, block, args) -> None:
        self._fn(name)(grid, block, args)

    def _ptr(self, x):
        """A pointer argument: the array, or NULL for None."""
        return self.binding.null if x is None else x

    def _f32(self, x):
        """x as a C-contiguous float32 device array (no copy when it already is one)."""
        return self.xp.ascontiguousarray(x, dtype=self.xp.float32)

    def _i32(self, values: np.ndarray):
        """Host integers (ids, positions) → device int32 array."""
        return self.binding.to_device(np.asarray(values, dtype=np.int64).astype(np.int32).reshape(-1))

    def scratch(self, name: str, shape, dtype):
        """A reused device buffer for intermediates that never leave an op (dequantized blocks,
        attention partials). Kernels and GEMMs run in stream order, so reuse is safe."""
        n, dt = math.prod(shape), np.dtype(dtype)
        buf = self._scratch.get((name, dt))
        if buf is None or buf.size < n:
            buf = self._scratch[(name, dt)] = self.xp.empty(max(n, 1), dtype=dt)
        return buf[:n].reshape(shape)

    def _positions_on_device(self, positions: np.ndarray):
        """Device int32 positions; the q and k rotations of every layer share one upload (on a GPU
        a host → device copy also waits for the queued kernels)."""
        host, device = self._positions
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if host is None or host.shape != positions.shape or not np.array_equal(host, positions):
            host, device = positions.copy(), self._i32(positions)
            self._positions = (host, device)
        return device

    def _device_blob(self, array: np.ndarray, alignment: int = 1):
        """Upload a blob as stored; copy into an `alignment`-aligned buffer if it is not aligned."""
        device = self.binding.to_device(array)
        if alignment > 1 and self.binding.address(device) % alignment:
            raw = self.xp.empty(device.nbytes + alignment, dtype=self.xp.uint8)
            offset = (-self.binding.address(raw)) % alignment
            aligned = raw[offset: offset + device.nbytes].view(device.dtype).reshape(device.shape)
            aligned[...] = device
            device = aligned
        return device

    def _codebook(self, array: np.ndarray):
        """A vq codebook or trellis table on the device, uploaded once per distinct content: every tensor (or row
        block) with a file's shared codebook or table gets a view of the same file bytes, so all of them share one
        device array instead of one upload each. Keyed by the content (sha1 of the bytes, shape, dtype), not the
        host address: equal content is interchangeable, and a closed file's addresses may be reused by another's
        bytes."""
        array = np.ascontiguousarray(array)
        key = (hashlib.sha1(array.reshape(-1).view(np.uint8)).digest(), array.shape, array.dtype.str)
        device = self._codebooks.get(key)
        if device is None:
            device = self._codebooks[key] = self._device_blob(array, CODEBOOK_ALIGNMENT)
        return device

    def close(self) -> None:
        self._scratch.clear()
        self._codebooks.clear()
        self._functions.clear()
        self._positions = (None, None)
        self.binding.close()

    def synchronize(self) -> None:
        """Wait for queued kernels (timing on a GPU); a no-op under emulation."""
        if self.xp is not np:
            self.xp.cuda.get_current_stream().synchronize()

    # -- weights ----------------------------------------------------------------------------------------
    def prepare_matrix(self, entry, blobs: dict):
        if entry.config.scheme == "fp16":
            handle = DenseHandle(entry.name, self._device_blob(blobs["data"], QWEIGHT_ALIGNMENT))
            if self.cache_dequantized and entry.role != "embedding":
                self._dense_f32(handle)
            return handle
        config = entry.config
        bits, outliers = config.bits, bool(config.outliers)
        if config.scheme == "lut" and bits not in LUT_BITS or \
                config.scheme == "affine" and (bits, config.group_size) not in AFFINE_CONFIGS or \
                config.scheme == "vq" and (bits, config.dim) not in VQ_CONFIGS or \
                config.scheme == "trellis" and bits not in TRELLIS_KERNEL_BITS:
            raise ModelError(f"tensor '{entry.name}': {config.scheme} {config.label} has no CUDA kernel")
        qweight = self._device_blob(blobs["qweight"], QWEIGHT_ALIGNMENT)
        csr = (self._device_blob(blobs["outlier_row_ptr"], 4), self._device_blob(blobs["outlier_cols"], 2),
               self._device_blob(blobs["outlier_values"], 2)) if outliers else (None, None, None)
        if config.scheme == "lut":
            device = (qweight, self._device_blob(blobs["codebook"], 2)) + csr
            handle = LutHandle(entry.name, entry.shape, bits, config.codebook_rows, device, outliers)
        elif config.scheme == "vq":
            device = (qweight, self._codebook(blobs["codebook"]), self._device_blob(blobs["scale_codes"]),
                      self._device_blob(blobs["scale_meta"], 4)) + csr
            handle = VqHandle(entry.name, entry.shape, bits, config.dim, config.group_size, device, outliers,
                              config.shared)
        elif config.scheme == "trellis":
            device = (qweight, self._codebook(blobs["codebook"]), self._device_blob(blobs["scale_codes"]),
                      self._device_blob(blobs["scale_meta"], 4))
            handle = TrellisHandle(entry.name, entry.shape, bits, config.group_size, device)
        else:
            device = (qweight, self._device_blob(blobs["scale_codes"]), self._device_blob(blobs["scale_meta"], 4),
                      self._device_blob(blobs["zero_codes"]), self._device_blob(blobs["zero_meta"], 4)) + csr
            handle = AffineHandle(entry.name, entry.shape, bits, config.group_size, device, outliers)
        if self.cache_dequantized and entry.role != "embedding":
            handle.dense = self._dequantize(handle, 0, handle.shape[0], self.xp.empty(handle.shape, self.xp.float32))
        return handle

    def upload(self, array):
        return self.binding.to_device(np.ascontiguousarray(array, dtype=np.float32))

    def to_host(self, x):
        return np.asarray(self.binding.to_host(x), dtype=np.float32)

    def new_cache(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int) -> KVCache:
        return KVCache(self.xp, n_layers, n_kv_heads, head_dim, capacity, self.kv_dtype)

    # -- packed-matrix helpers (affine, lut, vq, trellis) -------------------------------------------------
    def _blob_args(self, w: QuantizedHandle) -> tuple:
        return tuple(self._ptr(b) for b in w.blobs)

    def _dequantize(self, w: QuantizedHandle, r0: int, r1: int, out, row_ids=None):
        """Rows [r0, r1) of W (outliers included) into out (r1 − r0, in) float32 on the device.
        row_ids: device int32 ids of those rows (needed unless r0 == 0)."""
        out_features, in_features = w.shape
        n_rows = r1 - r0
        if r0 != 0 and row_ids is None:
            row_ids = self._i32(np.arange(r0, r1))
        grid, block = dequant_launch(n_rows)
        self._launch(w.dequant, grid, block,
                     self._blob_args(w) + (self._ptr(row_ids), out, i32(n_rows), i32(out_features),
                                           i32(in_features), i32(in_features)) + w.tail)
        return out

    def _dense_f32(self, w: DenseHandle):
        """The permanent float32 copy of an fp16 matrix (cache_dequantized only)."""
        if w.dense is None:
            w.dense = w.data.astype(self.xp.float32)
        return w.dense

    def _gemv(self, w, x, add=None):
        """y (1, out) = x (1, in) @ Wᵀ (+ add (out,)), fused in one kernel: gemv_affine_b*_g* / gemv_lut_b* /
        gemv_vq_b*_d* / gemv_trellis_b* on the packed blobs, gemv_f16 on the fp16 data."""
        out_features, in_features = w.shape
        y = self.xp.empty((1, out_features), dtype=self.xp.float32)
        grid, block = gemv_launch(out_features, self.gemv_warps)
        if isinstance(w, DenseHandle):
            self._launch(GEMV_F16, grid, block,
                         (w.data, x, self._ptr(add), y, i32(out_features), i32(in_features)))
        else:
            self._launch(w.gemv, grid, block,
                         self._blob_args(w) + (x, self._ptr(add), y, i32(out_features), i32(in_features)) + w.tail)
        return y

    def _chunked_matmul(self, shape, x, fill):
        """y (T, out) = x (T, in) @ Wᵀ, with W produced in float32 row blocks of at most
        prefill_chunk_bytes by fill(r0, r1, out) (into a reused scratch buffer), one GEMM per block."""
        out_features, in_features = shape
        rows = max(1, min(out_features, self.prefill_chunk_bytes // (4 * in_features)))
        if rows >= out_features:
            return x @ fill(0, out_features, self.scratch("dequant", shape, np.float32)).T
        y = self.xp.empty((x.shape[0], out_features), dtype=self.xp.float32)
        for r0 in range(0, out_features, rows):
            r1 = min(out_features, r0 + rows)
            y[:, r0:r1] = x @ fill(r0, r1, self.scratch("dequant", (r1 - r0, in_features), np.float32)).T
        return y

    def _quantized_matmul(self, w: QuantizedHandle, x):
        """y (T, out) = x (T, in) @ Wᵀ for T > 1: dequantize on the device, then GEMM (cuBLAS)."""
        if w.dense is not None:
            return x @ w.dense.T

        def fill(r0, r1, out):
            ids = None
            if r1 - r0 < w.shape[0]:  # a chunk: its row ids, uploaded once per matrix
                ids = w.chunk_ids.get((r0, r1))
                if ids is None:
                    ids = w.chunk_ids[(r0, r1)] = self._i32(np.arange(r0, r1))
            return self._dequantize(w, r0, r1, out, ids)

        return self._chunked_matmul(w.shape, x, fill)

    def _dense_matmul(self, w: DenseHandle, x):
        """y (T, out) = x (T, in) @ Wᵀ for T > 1 and an fp16 W: fp16 → fp32 on the device row chunk by
        row chunk (exact), then GEMM; the permanent float32 copy only with cache_dequantized."""
        if w.dense is None and self.cache_dequantized:
            self._dense_f32(w)  # a tied embedding, first used as lm_head
        if w.dense is not None:
            return x @ w.dense.T

        def fill(r0, r1, out):
            out[...] = w.data[r0:r1]
            return out

        return self._chunked_matmul(w.shape, x, fill)

    # -- operations -------------------------------------------------------------------------------------
    def embedding(self, weight, ids):
        if isinstance(weight, RowBlocks):  # a `rows` table: each block through this method
            return weight.rows(ids)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        T = ids.shape[0]
        ids_dev = self._i32(ids)
        vocab, dim = weight.shape
        out = self.xp.empty((T, dim), dtype=self.xp.float32)
        if isinstance(weight, DenseHandle):
            grid, block = rowwise_launch(T, _threads(dim))
            self._launch("embedding_f16", grid, block, (ids_dev, weight.data, out, i32(T), i32(dim), i32(vocab)))
            return out
        grid, block = dequant_launch(T)
        self._launch(weight.dequant, grid, block,
                     self._blob_args(weight) + (ids_dev, out, i32(T), i32(vocab), i32(dim), i32(dim)) + weight.tail)
        return out

    def linear(self, x, weight, bias=None, residual=None):
        """The interface's linear, plus an optional `residual` (T, out) added to the result
        (fused into the GEMV at decode: y = W·x + bias + residual in one kernel)."""
        x = self._f32(x)
        if isinstance(weight, RowBlocks):  # a `rows` matrix: each block through this method
            return weight.linear(x, bias, None if residual is None else self._f32(residual))
        T = x.shape[0]
        if T == 1:  # decode: one fused GEMV reads the stored weights once (affine, lut, vq, trellis or fp16)
            add = bias
            if residual is not None:
                add = self._f32(residual).reshape(-1)
                if bias is not None:
                    add = self.add(add.copy(), bias)
            return self._gemv(weight, x, add)
        if isinstance(weight, QuantizedHandle):
            y = self._quantized_matmul(weight, x)
        else:
            y = self._dense_matmul(weight, x)
        y = self._f32(y)
        if bias is not None:
            y += bias
        if residual is not None:
            y = self.add(y, self._f32(residual))
        return y

    def rms_norm(self, x, weight, eps):
        x = self._f32(x)
        rows, dim = x.shape
        out = self.xp.empty_like(x)
        grid, block = rowwise_launch(rows, _threads(dim))
        self._launch("rmsnorm_f32", grid, block, (x, weight, out, i32(dim), f32(eps)))
        return out

    def rope(self, x, positions, inv_freq, head_dim=None):
        """The interface's rope; head_dim > 2·len(inv_freq) rotates only the first 2·len(inv_freq) dims
        of each head (partial rotary), the rest pass through."""
        x = self._f32(x)
        T, width = x.shape
        rotary_dim = 2 * int(inv_freq.shape[0])
        head_dim = rotary_dim if head_dim is None else int(head_dim)
        if not 0 < rotary_dim <= head_dim or width % head_dim:
            raise ValueError(f"rope: rotary dims {rotary_dim} and head_dim {head_dim} do not fit rows of {width}")
        n_heads = width // head_dim
        out = self.xp.empty_like(x)
        grid, block = elementwise_launch(rope_items(T, n_heads, head_dim, rotary_dim))
        self._launch("rope_f32", grid, block,
                     (x, out, self._positions_on_device(positions), inv_freq, i32(T), i32(n_heads), i32(head_dim),
                      i32(rotary_dim), i32(width), i32(width)))
        return out

    def attention(self, q, k, v, cache: LayerCache, start, scale=None, window=None):
        """The interface's attention: scores scaled by `scale` (None: 1/sqrt(head_dim)); window None
        is full causal, else a query at position p sees keys p − window < j ≤ p."""
        q, k, v = self._f32(q), self._f32(k), self._f32(v)
        T = q.shape[0]
        n_kv, capacity, head_dim = cache.k.shape
        n_heads = q.shape[1] // head_dim
        scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        if window is not None and int(window) < 1:
            raise ValueError(f"attention: window must be None or ≥ 1, got {window}")
        window = 0 if window is None else int(window)  # the kernels' "no window"
        kv = "f16" if cache.k.dtype == np.float16 else "f32"
        grid, block = elementwise_launch(T * n_kv * head_dim)
        self._launch(f"kv_store_{kv}", grid, block,
                     (k, v, cache.k, cache.v, i32(T), i32(n_kv), i32(head_dim), i32(n_kv * head_dim), i32(start),
                      i32(capacity)))
        plan = attention_launch(n_heads, T, start + T, head_dim, window=window)
        out = self.xp.empty((T, n_heads * head_dim), dtype=self.xp.float32)
        part = self.scratch("attention_part", plan.part_shape, np.float32) if plan.n_splits > 1 else None
        self._launch(f"attention_{kv}kv", plan.grid, plan.block,
                     (q, cache.k, cache.v, out, self._ptr(part), i32(n_heads), i32(n_kv), i32(head_dim), i32(T),
                      i32(start + T), i32(capacity), i32(plan.keys_per_split), f32(scale), i32(window)))
        if plan.n_splits > 1:
            self._launch("attention_combine", plan.combine_grid, plan.combine_block,
                         (part, out, i32(T * n_heads), i32(plan.n_splits), i32(head_dim)))
        return out

    def _gated(self, kernel: str, gate, up):
        """act(gate) * up for a gated-MLP kernel (silu_mul_f32, gelu_mul_f32); both (T, I) → (T, I)."""
        gate, up = self._f32(gate), self._f32(up)
        rows, cols = gate.shape
        out = self.xp.empty_like(gate)
        grid, block = elementwise_launch(rows * cols)
        self._launch(kernel, grid, block, (gate, up, out, i32(rows), i32(cols), i32(cols), i32(cols)))
        return out

    def silu_mul(self, gate, up):
        return self._gated("silu_mul_f32", gate, up)

    def gelu_mul(self, gate, up):
        return self._gated("gelu_mul_f32", gate, up)

    def scale(self, x, s):
        """x * float32(s) as a new array (x is left alone)."""
        x = self._f32(x)
        out = self.xp.empty_like(x)
        grid, block = elementwise_launch(x.size)
        self._launch("scale_f32", grid, block, (x, out, i32(x.size), f32(s)))
        return out

    def add(self, a, b):
        """a += b in place (a's memory is reused, as the interface allows); b may be a row (n,)
        only when a has one row."""
        a, b = self._f32(a), self._f32(b)
        if a.size != b.size:
            raise ValueError(f"add: shapes {a.shape} and {b.shape} differ")
        grid, block = elementwise_launch(a.size)
        self._launch("add_f32", grid, block, (a, b, a, i32(a.size)))
        return a

    def token_nll(self, logits, targets):
        logits = self.to_host(logits)
        peak = logits.max(axis=-1, keepdims=True)  # (T, 1)
        lse = np.log(np.exp(logits - peak).sum(axis=-1, dtype=np.float64)) + peak[:, 0]  # (T,)
        return lse - logits[np.arange(len(targets)), targets].astype(np.float64)


def _threads(dim: int) -> int:
    """Threads for a row-per-block kernel: enough warps to cover the row, at most 256."""
    return min(256, 32 * max(1, -(-dim // 32)))

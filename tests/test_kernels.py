"""The CUDA kernels: NVRTC compiles every source for every target GPU, and the same sources, run on
the CPU through the emulation harness (kernels/cuda_emu.h + emulator.py), match the NumPy references:
format_spec.affine.dequantize for the weight math, the numpy backend for every other op.

Every emulated test runs in both of the emulator's modes (real std::threads; deterministic fibers).

Tolerances (and why):
  * dequant_affine_*: bit-exact. The kernel decodes s, z and W = (q − z)·s with the same separately
    rounded fp32 operations as the reference (__fmul_rn/__fadd_rn on the GPU; the emulator is built
    without FMA contraction), and rounds an outlier position once, after adding v in fp32.
  * gemv_affine_*: compared with dequantize(blobs) @ x accumulated in float64. The kernel reorders
    the fp32 arithmetic (Σ q·x and Σ x per 32-code pack, s·(Σqx − z·Σx) per pack, lanes, then a
    shuffle tree), so its rounding error is bounded by the magnitudes it sums, not by |y|:
        |y − y64| ≤ 2⁻¹⁷ · ( Σ_c |s|·(q + |z|)·|x_c| + Σ_outliers |v·x_c| + Σ_c |W_rc·x_c| )
    i.e. fp32's unit roundoff 2⁻²⁴ times a chain of ≤ 128 roundings (32-code pack sums, ≤ 64 packs
    per lane, 5 shuffle levels, the reference's own rounding of W); we also check the error is
    ≤ 2e-6 · Σ_c |W_rc·x_c| on these random matrices (measured: ≤ 1.4e-7, about one ulp).
  * gemv_f16: compared with W.astype(float64) @ x. fp16 → fp32 is exact and each product is fused
    into its fp32 FMA, so the only error is the accumulation: a lane sums n = 8·⌈⌈in/8⌉/32⌉ terms in
    sequence (8 weights of each of its chunks), then 5 shuffle levels add lane sums, so by the
    standard recursive-summation bound
        |y − y64| ≤ (n + 5)·2⁻²⁴·Σ_c |W_rc·x_c|  (+ 2⁻²⁴·|y| for the residual's add)
    (n + 5 ≤ 141 for the largest shape here). Measured: ≤ 9e-8·Σ|W·x| (1.5·2⁻²⁴; errors grow like a
    random walk, not like n); we also check ≤ 2e-6·Σ_c |W_rc·x_c| as for gemv_affine. The vector (16-byte)
    and scalar (unaligned or in % 8 ≠ 0) load paths do the same arithmetic in the same order, so they
    are compared bit for bit.
  * rmsnorm, rope, attention: fp32 reductions in a different order and expf/sinf/cosf from a
    different math library: |err| ≤ 1e-5 · max|input| (measured ≤ 4% of that: a few ulp; any
    indexing, masking or softmax bug shows up at O(1)). silu·mul: rtol 1e-6 (expf vs np.exp, 1 ulp).
    gelu(tanh)·mul: ≤ 1e-6 · (|g·u| + 1e-30) per element against the float64 formula (tanhf and the
    fp32 cubic: a few ulp of g·u; near the gate's zero crossing gelu(g) ≈ g/2, so the bound is
    relative to |g·u|, not to the result).
  * rope with partial rotary: the rotated dims as above; the pass-through dims are copied exactly.
  * The new ops (gelu·mul, scale, partial rotary, attention scale and window) are checked against the
    float64 formulas written out below (rope_reference, attention_reference, gelu_mul_reference: the
    interface's semantics, BRIEF/base.py), not against the numpy backend.
  * embedding, kv store, add, scale: exact (scale: one fp32 product, as x * float32(s) in numpy).
"""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from conftest import random_affine_blobs
from mxq.format_spec import StorageConfig, decode_meta, dequantize, unpack_codes
from mxq.format_spec.affine import csr_entries
from mxq.kernels import nvrtc
from mxq.kernels.emulator import MODES, Emulator, get_emulator
from mxq.kernels.registry import (AFFINE_CONFIGS, GEMV_F16, KERNELS, SOURCES, attention_first_key, attention_launch,
                                  dequant_launch, dequant_name, elementwise_launch, gemv_launch, gemv_name, kernels_in,
                                  rope_items, rowwise_launch)
from mxq.runtime.backends.base import LayerCache
from mxq.runtime.backends.numpy_backend import NumpyBackend

i32, f32 = np.int32, np.float32


@pytest.fixture(scope="module", params=MODES)
def emu(request):
    """The emulator in both execution modes: real threads per CUDA thread, and fibers (thread order,
    reversed on odd blocks)."""
    return Emulator(get_emulator().path, mode=request.param)


@pytest.fixture(scope="module")
def ref():
    return NumpyBackend()


# ---- NVRTC ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", nvrtc.ARCHS)
def test_nvrtc_compiles_every_kernel_for(arch):
    for source in SOURCES:
        result = nvrtc.compile_source(source, arch)
        assert result.ok, f"{source} for {arch}:\n{result.log}"
        assert "warning" not in result.log.lower(), result.log
        assert sorted(result.entries) == sorted(kernels_in(source))
        assert result.cubin[:4] == b"\x7fELF"


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="ptxas (CUDA toolkit) not on PATH")
def test_no_gemv_kernel_spills():
    """tools/kernel_report.py's check: ptxas on the NVRTC PTX, every target arch."""
    import kernel_report
    for arch in nvrtc.ARCHS:
        for source in ("gemv_affine.cu", "gemv_f16.cu"):
            for name, u in kernel_report.usage(source, arch, "ptxas").items():
                assert u["spill_stores"] == u["spill_loads"] == 0, f"{name} spills on {arch}: {u}"
                assert u["stack"] == 0, f"{name} uses local memory on {arch}: {u}"


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="ptxas (CUDA toolkit) not on PATH")
def test_no_ops_kernel_spills():
    """The non-GEMV kernels (attention with head_dim up to 256 keeps 2 × 8 floats per lane in
    registers) never spill on any target. rope_f32's 32-byte stack frame is sincosf's slow-path
    argument reduction (|angle| > 105615), not a spill."""
    import kernel_report
    for arch in nvrtc.ARCHS:
        for name, u in kernel_report.usage("ops.cu", arch, "ptxas").items():
            assert u["spill_stores"] == u["spill_loads"] == 0, f"{name} spills on {arch}: {u}"
            assert u["stack"] == 0 or name == "rope_f32", f"{name} uses local memory on {arch}: {u}"


def test_registry_matches_compiled_signatures(emu):
    assert set(emu.names()) == set(KERNELS)
    for name, kernel in KERNELS.items():
        assert emu.signature(name) == list(kernel.arg_types), name


# ---- affine GEMV ------------------------------------------------------------------------------------

def affine_args(blobs):
    return (blobs["qweight"], blobs["scale_codes"], blobs["scale_meta"], blobs["zero_codes"], blobs["zero_meta"],
            blobs.get("outlier_row_ptr"), blobs.get("outlier_cols"), blobs.get("outlier_values"))


def run_gemv(emu, blobs, shape, config, x, residual=None, y=None, warps=None):
    out_features, in_features = shape
    y = np.full(out_features, np.nan, f32) if y is None else y
    grid, block = gemv_launch(out_features, warps)
    emu.launch(gemv_name(config.bits, config.group_size), grid, block,
               affine_args(blobs) + (x, residual, y, i32(out_features), i32(in_features)))
    return y


def gemv_bound(blobs, shape, config, x):
    """Per-row error bound of the module docstring, and Σ_c |W_rc·x_c|."""
    out_features, in_features = shape
    g = config.group_size
    n_groups = -(-in_features // g)
    q = unpack_codes(blobs["qweight"], config.bits).reshape(out_features, n_groups * g)[:, :in_features]
    s = np.repeat(decode_meta(blobs["scale_codes"], blobs["scale_meta"]), g, axis=1)[:, :in_features]
    z = np.repeat(decode_meta(blobs["zero_codes"], blobs["zero_meta"]), g, axis=1)[:, :in_features]
    ax = np.abs(x.astype(np.float64))
    magnitude = (np.abs(s.astype(np.float64)) * (q + np.abs(z.astype(np.float64)))) @ ax
    if config.outliers:
        rows, cols, values = csr_entries(blobs)
        magnitude += np.bincount(rows, np.abs(values) * ax[cols], minlength=out_features)
    w_abs_x = np.abs(dequantize(blobs, shape, config).astype(np.float64)) @ ax
    return 2.0 ** -17 * (magnitude + w_abs_x), w_abs_x


def check_gemv(y, blobs, shape, config, x, residual=None):
    w = dequantize(blobs, shape, config).astype(np.float64)
    want = w @ x.astype(np.float64)
    if residual is not None:
        want += residual
    bound, w_abs_x = gemv_bound(blobs, shape, config, x)
    err = np.abs(y.astype(np.float64) - want)
    assert np.all(np.isfinite(y))
    assert np.all(err <= bound + (np.abs(residual) * 2.0 ** -23 if residual is not None else 0)), \
        f"max err {err.max():.3g}, bound {bound[np.argmax(err - bound)]:.3g}"
    assert np.all(err <= 2e-6 * w_abs_x + (np.abs(residual) * 2.0 ** -23 if residual is not None else 0))


@pytest.mark.parametrize("outliers", [0, 23], ids=["plain", "outliers"])
@pytest.mark.parametrize("bits,group_size", AFFINE_CONFIGS, ids=[f"b{b}g{g}" for b, g in AFFINE_CONFIGS])
def test_gemv_matches_dequantize(emu, bits, group_size, outliers):
    # in_features not a multiple of the group (padded last group); 37 rows = 2 blocks of 16 + 5
    shape = (37, 2 * group_size + 7)
    rng = np.random.default_rng(bits * 1000 + group_size + outliers)
    config = StorageConfig.affine(bits, group_size, outliers)
    blobs = random_affine_blobs(rng, shape, config)
    x = rng.standard_normal(shape[1]).astype(f32)
    check_gemv(run_gemv(emu, blobs, shape, config, x), blobs, shape, config, x)


@pytest.mark.parametrize("bits,group_size,shape,outliers,warps", [
    (3, 128, (5, 4200), 7, None),  # 132 packs: two activation tiles, 5 packs on some lanes
    (4, 32, (9, 4099), 0, 2),  # 129 packs: a one-pack second tile; warps=2
    (6, 64, (3, 1100), 5, 1),  # 36 packs: lanes 0-3 take two packs; a one-warp block
    (2, 32, (1, 40), 2, None),  # a single row, two packs, the second mostly padding
    (8, 64, (70, 20), 0, 3),  # in < 32: one pack, 44 padding codes; 3-warp blocks (12 rows each)
    (5, 32, (1030, 65), 9, None),  # ≥ 1024 rows: 8-warp blocks, 32 rows each, last block 6 rows
])
def test_gemv_odd_shapes(emu, bits, group_size, shape, outliers, warps):
    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    config = StorageConfig.affine(bits, group_size, outliers)
    blobs = random_affine_blobs(rng, shape, config)
    x = rng.standard_normal(shape[1]).astype(f32)
    check_gemv(run_gemv(emu, blobs, shape, config, x, warps=warps), blobs, shape, config, x)


def test_gemv_residual_and_in_place(emu):
    shape, config = (21, 100), StorageConfig.affine(4, 64, 4)
    rng = np.random.default_rng(5)
    blobs = random_affine_blobs(rng, shape, config)
    x = rng.standard_normal(shape[1]).astype(f32)
    residual = rng.standard_normal(shape[0]).astype(f32)
    check_gemv(run_gemv(emu, blobs, shape, config, x, residual=residual), blobs, shape, config, x, residual)
    y = residual.copy()  # y += W·x: the residual (or a bias) is the output array itself
    check_gemv(run_gemv(emu, blobs, shape, config, x, residual=y, y=y), blobs, shape, config, x, residual)


def test_gemv_ignores_nonzero_padding_codes(emu):
    """SPEC §5.1: padding codes MUST be ignored by readers: set them to the max code."""
    shape, config = (6, 70), StorageConfig.affine(3, 64)
    rng = np.random.default_rng(11)
    blobs = random_affine_blobs(rng, shape, config)
    x = rng.standard_normal(shape[1]).astype(f32)
    want = run_gemv(emu, blobs, shape, config, x)
    from mxq.format_spec import pack_codes
    codes = unpack_codes(blobs["qweight"], 3)
    codes[:, shape[1]:] = 7
    dirty = dict(blobs, qweight=pack_codes(codes, 3))
    assert np.array_equal(run_gemv(emu, dirty, shape, config, x), want)


# ---- fp16 GEMV -------------------------------------------------------------------------------------

def run_gemv_f16(emu, w, x, residual=None, y=None, warps=None, guard=None):
    out_features, in_features = w.shape
    y = np.full(out_features, np.nan, f32) if y is None else y
    grid, block = gemv_launch(out_features, warps)
    options = {} if guard is None else {"guard": guard}  # (test_kernels_gpu.py's runner takes no guard)
    emu.launch(GEMV_F16, grid, block, (w, x, residual, y, i32(out_features), i32(in_features)), **options)
    return y


def check_gemv_f16(y, w, x, residual=None):
    """The module docstring's bound; returns max err / Σ|W·x| (for the measured figure)."""
    in_features = w.shape[1]
    w64, x64 = w.astype(np.float64), x.astype(np.float64)
    want = w64 @ x64 + (0 if residual is None else residual.astype(np.float64))
    w_abs_x = np.abs(w64) @ np.abs(x64)
    n = 8 * -(-(-(-in_features // 8)) // 32)
    extra = 0 if residual is None else 2.0 ** -24 * (np.abs(residual) + w_abs_x)
    err = np.abs(y.astype(np.float64) - want)
    assert np.all(np.isfinite(y))
    assert np.all(err <= (n + 5) * 2.0 ** -24 * w_abs_x + extra), f"max err {err.max():.3g}"
    assert np.all(err <= 2e-6 * w_abs_x + extra)
    return float((err / np.maximum(w_abs_x, 1e-30)).max())


def unaligned_copy(a: np.ndarray, offset: int) -> np.ndarray:
    """A C-contiguous copy of `a` whose data starts `offset` bytes past a 16-byte boundary."""
    raw = np.zeros(a.nbytes + 64, np.uint8)
    start = (-raw.__array_interface__["data"][0]) % 16 + offset
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


GEMV_F16_SHAPES = [
    # shape, warps: in % 8 == 0 takes 16-byte loads, anything else the bounded 2-byte loads
    ((37, 576), None),  # SmolLM2's hidden size; 37 rows = 2 blocks of 16 + 5
    ((37, 1003), None),  # in % 8 = 3: the scalar path, last chunk 3 columns
    ((5, 4200), None),  # 525 chunks: two activation tiles (512 + 13), 17 chunks on some lanes
    ((3, 4105), 1),  # two tiles on the scalar path, a one-warp block
    ((1030, 64), None),  # ≥ 1024 rows: 8-warp blocks of 32 rows, last block 6 rows; 8 chunks < 32 lanes
    ((70, 20), 3),  # in < 32, in % 8 = 4; 3-warp blocks (12 rows each)
    ((1, 7), None),  # a single row shorter than one chunk
]


@pytest.mark.parametrize("shape,warps", GEMV_F16_SHAPES, ids=[f"{s[0]}x{s[1]}" for s, _ in GEMV_F16_SHAPES])
def test_gemv_f16_matches_numpy(emu, shape, warps):
    rng = np.random.default_rng(shape[0] * 31 + shape[1])
    w = rng.standard_normal(shape).astype(np.float16)
    x = rng.standard_normal(shape[1]).astype(f32)
    check_gemv_f16(run_gemv_f16(emu, w, x, warps=warps), w, x)


def test_gemv_f16_residual_and_in_place(emu):
    rng = np.random.default_rng(12)
    w = rng.standard_normal((21, 100)).astype(np.float16)
    x = rng.standard_normal(100).astype(f32)
    residual = rng.standard_normal(21).astype(f32)
    check_gemv_f16(run_gemv_f16(emu, w, x, residual=residual), w, x, residual)
    y = residual.copy()  # y += W·x: the residual (or a bias) is the output array itself
    check_gemv_f16(run_gemv_f16(emu, w, x, residual=y, y=y), w, x, residual)


@pytest.mark.parametrize("shape", [(37, 576), (9, 1003)], ids=["in576", "in1003"])
def test_gemv_f16_vector_and_scalar_paths_agree(emu, shape):
    """An unaligned W (2 bytes past a 16-byte boundary, unguarded so the address is kept) takes the
    2-byte loads; the result is bit-identical to the aligned launch (same sums in the same order)."""
    rng = np.random.default_rng(shape[1])
    w = rng.standard_normal(shape).astype(np.float16)
    x = rng.standard_normal(shape[1]).astype(f32)
    aligned = unaligned_copy(w, 0)
    want = run_gemv_f16(emu, aligned, x, guard=False)
    got = run_gemv_f16(emu, unaligned_copy(w, 2), x, guard=False)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    check_gemv_f16(got, w, x)


def test_gemv_f16_never_reads_past_a_row(emu):
    """in % 8 ≠ 0: a row's last chunk must not pick up the next row's first columns (an inf there
    times a zero activation would make NaN); the guarded launch also poisons past the matrix."""
    w = np.ones((6, 13), np.float16)
    w[1::2, 0] = np.inf  # rows 1, 3, 5 are inf; rows 0, 2, 4 must stay finite
    x = np.ones(13, f32)
    y = run_gemv_f16(emu, w, x)
    assert np.array_equal(y[0::2], np.full(3, 13, f32)) and np.all(np.isposinf(y[1::2]))


# ---- dequantization (prefill, quantized embeddings) -------------------------------------------------

@pytest.mark.parametrize("outliers", [0, 17], ids=["plain", "outliers"])
@pytest.mark.parametrize("bits,group_size", AFFINE_CONFIGS, ids=[f"b{b}g{g}" for b, g in AFFINE_CONFIGS])
def test_dequant_is_bit_exact(emu, bits, group_size, outliers):
    shape = (13, 2 * group_size + 9)
    rng = np.random.default_rng(bits * 100 + group_size + outliers)
    config = StorageConfig.affine(bits, group_size, outliers)
    blobs = random_affine_blobs(rng, shape, config)
    want = dequantize(blobs, shape, config)
    ld = shape[1] + 3  # a padded leading dimension: columns past in_features stay untouched
    for dtype, tag in ((np.float32, "f32"), (np.float16, "f16")):
        out = np.full((shape[0], ld), np.nan, dtype)
        grid, block = dequant_launch(shape[0])
        emu.launch(dequant_name(bits, group_size, tag), grid, block,
                   affine_args(blobs) + (None, out, i32(shape[0]), i32(shape[0]), i32(shape[1]), i32(ld)))
        assert np.array_equal(out[:, :shape[1]].view(np.uint16 if tag == "f16" else np.uint32),
                              want.astype(dtype).view(np.uint16 if tag == "f16" else np.uint32))
        assert np.isnan(out[:, shape[1]:]).all()


@pytest.mark.parametrize("bits,group_size,shape,threads", [(3, 128, (7, 4200), 32), (6, 32, (4, 3000), 64)])
def test_dequant_many_tiles(emu, bits, group_size, shape, threads):
    """More packs than threads: the row goes through several shared-memory tiles, the last partial."""
    config = StorageConfig.affine(bits, group_size, 40)
    blobs = random_affine_blobs(np.random.default_rng(shape[1]), shape, config)
    want = dequantize(blobs, shape, config)
    for dtype, tag in ((np.float32, "f32"), (np.float16, "f16")):
        out = np.full(shape, np.nan, dtype)
        grid, block = dequant_launch(shape[0], threads)
        emu.launch(dequant_name(bits, group_size, tag), grid, block,
                   affine_args(blobs) + (None, out, i32(shape[0]), i32(shape[0]), i32(shape[1]), i32(shape[1])))
        assert np.array_equal(out, want.astype(dtype))


@pytest.mark.parametrize("tag", ["f32", "f16"])
def test_dequant_gathers_rows(emu, tag):
    """The quantized-embedding path: rows picked by id; ids outside the table give zero rows."""
    shape, config = (40, 96), StorageConfig.affine(5, 32, 30)
    rng = np.random.default_rng(3)
    blobs = random_affine_blobs(rng, shape, config)
    ids = np.array([7, 0, 39, 7, -1, 40], dtype=np.int32)
    dtype = np.float32 if tag == "f32" else np.float16
    out = np.full((ids.size, shape[1]), np.nan, dtype)
    grid, block = dequant_launch(ids.size, threads=64)
    emu.launch(dequant_name(5, 32, tag), grid, block,
               affine_args(blobs) + (ids, out, i32(ids.size), i32(shape[0]), i32(shape[1]), i32(shape[1])))
    want = dequantize(blobs, shape, config)[np.clip(ids, 0, shape[0] - 1)].astype(dtype)
    want[4:] = 0
    assert np.array_equal(out, want)


# ---- float64 references of the interface's semantics (base.py; BRIEF's shared decisions) -----------

def rope_reference(x, positions, inv_freq, head_dim=None):
    """rotate_half RoPE on the first rotary_dim = 2·len(inv_freq) dims of each head; the rest pass
    through. The angle is the float32 product position·inv_freq, as the interface says."""
    half = len(inv_freq)
    rotary = 2 * half
    head_dim = rotary if head_dim is None else head_dim
    T, width = x.shape
    angle = (positions.astype(f32)[:, None] * inv_freq[None, :].astype(f32)).astype(np.float64)  # (T, half)
    c, s = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    xh = x.reshape(T, width // head_dim, head_dim).astype(np.float64)
    out = xh.copy()
    x1, x2 = xh[..., :half], xh[..., half:rotary]
    out[..., :half] = x1 * c - x2 * s
    out[..., half:rotary] = x2 * c + x1 * s
    return out.reshape(T, width)


def attention_reference(q, keys, values, start, scale=None, window=None):
    """softmax(scale·q·kᵀ)·v over keys p − window < j ≤ p (window None: 0 ≤ j ≤ p) for the query at
    position p = start + t; keys, values (n_kv, ≥ start + T, head_dim) are the whole cache."""
    T = q.shape[0]
    n_kv, _, head_dim = keys.shape
    n_heads = q.shape[1] // head_dim
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    L = start + T
    kv_of = np.arange(n_heads) // (n_heads // n_kv)
    k = keys[kv_of, :L].astype(np.float64)  # (n_heads, L, head_dim)
    v = values[kv_of, :L].astype(np.float64)
    qh = q.reshape(T, n_heads, head_dim).astype(np.float64)
    scores = np.einsum("thd,hjd->thj", qh, k) * scale  # (T, n_heads, L)
    p = start + np.arange(T)[:, None]  # (T, 1)
    j = np.arange(L)[None, :]
    visible = (j <= p) & ((j > p - window) if window is not None else True)  # (T, L)
    scores = np.where(visible[:, None, :], scores, -np.inf)
    w = np.exp(scores - scores.max(axis=-1, keepdims=True))
    w /= w.sum(axis=-1, keepdims=True)
    return np.einsum("thj,hjd->thd", w, v).reshape(T, n_heads * head_dim)


def gelu_mul_reference(gate, up):
    """HF "gelu_pytorch_tanh"(gate) · up in float64."""
    g = gate.astype(np.float64)
    return 0.5 * g * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g ** 3))) * up.astype(np.float64)


# ---- the other ops, against the numpy backend ------------------------------------------------------

@pytest.mark.parametrize("rows,dim,threads", [(3, 96, 256), (2, 577, 64), (1, 2048, 1024)])
def test_rmsnorm(emu, ref, rows, dim, threads):
    rng = np.random.default_rng(dim)
    x = (rng.standard_normal((rows, dim)) * 3).astype(f32)
    weight = rng.standard_normal(dim).astype(np.float16).astype(f32)
    out = np.full_like(x, np.nan)
    grid, block = rowwise_launch(rows, threads)
    emu.launch("rmsnorm_f32", grid, block, (x, weight, out, i32(dim), f32(1e-5)))
    want = ref.rms_norm(x, weight, 1e-5)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    emu.launch("rmsnorm_f32", grid, block, (x, weight, x, i32(dim), f32(1e-5)))  # in place
    assert np.array_equal(x, out)


@pytest.mark.parametrize("T,n_heads,head_dim", [(3, 2, 128), (1, 5, 256), (2, 3, 64)],
                         ids=["qwen3-hd128", "gemma3-hd256", "hd64"])
def test_rmsnorm_per_head(emu, T, n_heads, head_dim):
    """The per-head q/k norms (Qwen3, Gemma 3): rms_norm of a (T·n_heads, head_dim) view of (T, n·hd),
    one block of head_dim threads per head; against the float64 formula."""
    rng = np.random.default_rng(head_dim + T)
    x = (rng.standard_normal((T, n_heads * head_dim)) * 3).astype(f32)
    heads = x.reshape(T * n_heads, head_dim)  # a view: the kernel reads x's memory
    assert np.shares_memory(heads, x)
    weight = (1.0 + rng.standard_normal(head_dim) * 0.1).astype(np.float16).astype(f32)  # Gemma's folded 1 + w
    out = np.full_like(heads, np.nan)
    grid, block = rowwise_launch(T * n_heads, min(256, head_dim))
    emu.launch("rmsnorm_f32", grid, block, (heads, weight, out, i32(head_dim), f32(1e-6)))
    h64 = heads.astype(np.float64)
    want = weight * (h64 / np.sqrt((h64 ** 2).mean(axis=1, keepdims=True) + 1e-6))
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * np.abs(want).max())


ROPE_CASES = [
    # n_heads, head_dim, rotary_dim
    (4, 24, 24),  # tiny-llama's head_dim (not a multiple of 32)
    (3, 64, 64),
    (2, 128, 128),  # Qwen3
    (2, 256, 256),  # Gemma 3
    (3, 96, 48),  # partial rotary (Phi-3-style partial_rotary_factor 0.5)
    (2, 64, 16),  # a quarter rotated (GPT-NeoX's 0.25)
    (5, 40, 10),  # odd shapes: 5 rotated pairs, 30 pass-through dims, 5 heads
]


@pytest.mark.parametrize("n_heads,head_dim,rotary_dim", ROPE_CASES, ids=[f"h{c[0]}d{c[1]}r{c[2]}" for c in ROPE_CASES])
def test_rope(emu, n_heads, head_dim, rotary_dim):
    rng = np.random.default_rng(head_dim + rotary_dim)
    T, n_kv = 3, 1
    positions = np.array([5, 6, 4000], dtype=np.int64)
    inv_freq = (1.0 / (500000.0 ** (np.arange(0, rotary_dim, 2) / rotary_dim))).astype(f32)
    fused = rng.standard_normal((T, (n_heads + 2 * n_kv) * head_dim)).astype(f32)  # q | k | v
    q = np.ascontiguousarray(fused[:, : n_heads * head_dim])
    want = rope_reference(q, positions, inv_freq, head_dim)
    tol = 1e-5 * np.abs(q).max()
    tail = (np.arange(q.shape[1]) % head_dim) >= rotary_dim  # the pass-through columns

    def check(got, x, want):
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)
        assert np.array_equal(got[:, tail[:got.shape[1]]], x[:, tail[:x.shape[1]]])  # copied exactly

    # out of place, reading a strided view of the fused buffer
    out = np.full_like(q, np.nan)
    grid, block = elementwise_launch(rope_items(T, n_heads, head_dim, rotary_dim))
    emu.launch("rope_f32", grid, block, (fused, out, positions.astype(np.int32), inv_freq, i32(T), i32(n_heads),
                                         i32(head_dim), i32(rotary_dim), i32(fused.shape[1]), i32(q.shape[1])))
    check(out, q, want)
    # in place on the k block of the fused buffer (a flat view starting at k: token stride = row width)
    k = np.ascontiguousarray(fused[:, n_heads * head_dim:(n_heads + n_kv) * head_dim])
    want_k = rope_reference(k, positions, inv_freq, head_dim)
    buf = fused.copy()
    kview = buf.reshape(-1)[n_heads * head_dim:]
    emu.launch("rope_f32", elementwise_launch(rope_items(T, n_kv, head_dim, rotary_dim))[0], (64, 1, 1),
               (kview, kview, positions.astype(np.int32), inv_freq, i32(T), i32(n_kv), i32(head_dim), i32(rotary_dim),
                i32(fused.shape[1]), i32(fused.shape[1])))
    check(buf[:, n_heads * head_dim:(n_heads + n_kv) * head_dim], k, want_k)
    assert np.array_equal(buf[:, :n_heads * head_dim], fused[:, :n_heads * head_dim])  # q untouched
    assert np.array_equal(buf[:, (n_heads + n_kv) * head_dim:], fused[:, (n_heads + n_kv) * head_dim:])


def test_rope_matches_numpy_backend(emu, ref):
    """Full rotary: the kernel agrees with the numpy backend's rope too (the reference above is the
    interface's formula; this ties the two)."""
    rng = np.random.default_rng(7)
    positions = np.array([0, 9, 31], dtype=np.int64)
    inv_freq = (1.0 / (10000.0 ** (np.arange(0, 64, 2) / 64))).astype(f32)
    x = rng.standard_normal((3, 2 * 64)).astype(f32)
    out = np.full_like(x, np.nan)
    emu.launch("rope_f32", *elementwise_launch(rope_items(3, 2, 64, 64)),
               (x, out, positions.astype(np.int32), inv_freq, i32(3), i32(2), i32(64), i32(64), i32(128), i32(128)))
    np.testing.assert_allclose(out, ref.rope(x, positions, inv_freq), rtol=0, atol=1e-5 * np.abs(x).max())
    np.testing.assert_allclose(out, rope_reference(x, positions, inv_freq), rtol=0, atol=1e-5 * np.abs(x).max())


ATTENTION_CASES = [
    # n_heads, n_kv_heads, head_dim, start, T, keys_per_split, window, scale (None: 1/sqrt(head_dim))
    (4, 2, 24, 37, 1, None, None, None),  # decode, tiny-llama's head_dim (not a multiple of 32), one split
    (4, 2, 24, 37, 1, 8, None, None),  # the same over 5 splits + combine
    (9, 3, 64, 0, 5, None, None, None),  # prefill from an empty cache, GQA 3:1 (SmolLM2's head shape)
    (4, 1, 128, 20, 4, 7, None, None),  # prefill after 20 cached tokens, splits past early queries' causal limit
    (2, 2, 256, 70, 1, 32, None, None),  # the largest head_dim, no grouping
    (2, 1, 256, 300, 1, None, None, 0.3),  # Gemma-3-like decode, long context: the default plan splits (5)
    (2, 1, 256, 300, 1, None, 512, 0.0625),  # a window larger than the context: all 301 keys, 5 splits
    (4, 2, 64, 299, 1, None, 64, None),  # decode, window < context: only the last 64 keys, one split
    (4, 2, 128, 299, 1, 16, 64, None),  # the same window over 4 splits of the window's keys
    (4, 2, 128, 20, 9, 4, 5, 0.3),  # prefill, window 5: each query's first or last splits are empty
    (3, 3, 64, 0, 7, 2, 3, None),  # prefill from empty, window 3, 2 keys per split
    (5, 5, 40, 13, 3, 5, 7, 0.2),  # odd shapes: head_dim 40, 5 heads, window 7
    (2, 1, 64, 10, 1, None, 1, None),  # window 1: a token sees only itself
]


@pytest.mark.parametrize("kv", ["f16", "f32"])
@pytest.mark.parametrize("n_heads,n_kv,head_dim,start,T,kps,window,scale", ATTENTION_CASES,
                         ids=[f"h{c[0]}kv{c[1]}d{c[2]}s{c[3]}T{c[4]}k{c[5]}w{c[6]}" for c in ATTENTION_CASES])
def test_kv_store_and_attention(emu, kv, n_heads, n_kv, head_dim, start, T, kps, window, scale):
    rng = np.random.default_rng(head_dim + start + T + (window or 0))
    capacity = start + T + 3
    kv_dtype = np.float16 if kv == "f16" else np.float32

    def cache_values(shape):  # values the cache dtype holds exactly, so both sides see the same keys
        return (rng.standard_normal(shape) * 2).astype(kv_dtype).astype(f32)

    # the reference's float32 cache and ours, with the same first `start` positions
    keys, values = np.zeros((2, n_kv, capacity, head_dim), f32)
    keys[:, :start], values[:, :start] = cache_values((n_kv, start, head_dim)), cache_values((n_kv, start, head_dim))
    k_cache, v_cache = keys.astype(kv_dtype), values.astype(kv_dtype)
    # this step's q, k, v as the rows of a fused qkv projection output (T, (n_heads + 2·n_kv)·head_dim)
    width = (n_heads + 2 * n_kv) * head_dim
    qkv = np.concatenate([rng.standard_normal((T, n_heads * head_dim)).astype(f32),
                          cache_values((T, n_kv * head_dim)), cache_values((T, n_kv * head_dim))], axis=1)
    q = np.ascontiguousarray(qkv[:, : n_heads * head_dim])
    keys[:, start:start + T] = qkv[:, n_heads * head_dim:(n_heads + n_kv) * head_dim].reshape(T, n_kv, head_dim).transpose(1, 0, 2)
    values[:, start:start + T] = qkv[:, (n_heads + n_kv) * head_dim:].reshape(T, n_kv, head_dim).transpose(1, 0, 2)
    want = attention_reference(q, keys, values, start, scale, window)

    flat = qkv.reshape(-1)
    grid, block = elementwise_launch(T * n_kv * head_dim)
    emu.launch(f"kv_store_{kv}", grid, block,
               (flat[n_heads * head_dim:], flat[(n_heads + n_kv) * head_dim:], k_cache, v_cache, i32(T), i32(n_kv),
                i32(head_dim), i32(width), i32(start), i32(capacity)))
    assert np.array_equal(k_cache[:, :start + T].astype(f32), keys[:, :start + T])
    assert np.array_equal(v_cache[:, :start + T].astype(f32), values[:, :start + T])
    assert not k_cache[:, start + T:].any()

    plan = attention_launch(n_heads, T, start + T, head_dim, window=window or 0, keys_per_split=kps)
    n_keys = start + T - attention_first_key(start + T, T, window or 0)
    assert n_keys == (start + T if window is None else min(start + T, window + T - 1))
    assert plan.n_splits == -(-n_keys // plan.keys_per_split)
    out = np.full((T, n_heads * head_dim), np.nan, f32)
    part = np.full(plan.part_shape, np.nan, f32) if plan.n_splits > 1 else None
    emu.launch(f"attention_{kv}kv", plan.grid, plan.block,
               (q, k_cache, v_cache, out, part, i32(n_heads), i32(n_kv), i32(head_dim), i32(T), i32(start + T),
                i32(capacity), i32(plan.keys_per_split), f32(1.0 / math.sqrt(head_dim) if scale is None else scale),
                i32(window or 0)))
    if plan.n_splits > 1:
        assert not np.isnan(part).any()  # every split wrote its partial, empty ones included
        empty = np.isneginf(part[..., 0])  # splits holding none of a query's keys: max −inf, sum 0, acc 0
        assert not part[..., 1][empty].any() and not part[..., 2:][empty].any()
        if T > 1 and window is not None and window < T + 1:
            assert empty.any()  # the window cases above do have splits outside some query's keys
        emu.launch("attention_combine", plan.combine_grid, plan.combine_block,
                   (part, out, i32(T * n_heads), i32(plan.n_splits), i32(head_dim)))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * np.abs(values[:, :start + T]).max())


def test_attention_matches_numpy_backend(emu, ref):
    """Full causal attention with the default scale: the kernel agrees with the numpy backend too."""
    rng = np.random.default_rng(3)
    n_heads, n_kv, head_dim, T = 4, 2, 32, 6
    layer = LayerCache(np, n_kv, head_dim, T)
    q, k, v = (rng.standard_normal((T, n * head_dim)).astype(f32) for n in (n_heads, n_kv, n_kv))
    want = ref.attention(q, k, v, layer, 0)
    plan = attention_launch(n_heads, T, T, head_dim, keys_per_split=4)
    out = np.full((T, n_heads * head_dim), np.nan, f32)
    part = np.full(plan.part_shape, np.nan, f32)
    emu.launch("attention_f32kv", plan.grid, plan.block,
               (q, layer.k, layer.v, out, part, i32(n_heads), i32(n_kv), i32(head_dim), i32(T), i32(T), i32(T),
                i32(plan.keys_per_split), f32(1.0 / math.sqrt(head_dim)), i32(0)))
    emu.launch("attention_combine", plan.combine_grid, plan.combine_block,
               (part, out, i32(T * n_heads), i32(plan.n_splits), i32(head_dim)))
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * np.abs(v).max())


def test_attention_softmax_is_safe_for_large_scores(emu):
    """Scores near 1250 (exp overflows fp32 past 88.7): a naive softmax gives inf/inf = NaN; the
    running max keeps every exp argument ≤ 0. Three keys share the mass (scores 1250, 1249, 1248)."""
    head_dim, L = 32, 40
    rng = np.random.default_rng(0)
    k_cache = rng.standard_normal((1, L, head_dim)).astype(np.float16)
    k_cache[0, [5, 17, 33], 0] = [10000, 9992, 9984]  # fp16 values 8 apart; scale 1/8 → scores 1 apart
    v_cache = rng.standard_normal((1, L, head_dim)).astype(np.float16)
    q = np.zeros((1, head_dim), f32)
    q[0, 0] = 1.0
    scores = k_cache[0, :, 0].astype(np.float64) / 8
    p = np.exp(scores - scores.max())
    want = (p / p.sum()) @ v_cache[0].astype(np.float64)
    for kps in (None, 8):  # one split; five splits + combine (the big scores land in different splits)
        plan = attention_launch(1, 1, L, head_dim, keys_per_split=kps)
        out = np.full((1, head_dim), np.nan, f32)
        part = np.full(plan.part_shape, np.nan, f32) if plan.n_splits > 1 else None
        emu.launch("attention_f16kv", plan.grid, plan.block, (q, k_cache, v_cache, out, part, i32(1), i32(1),
                                                              i32(head_dim), i32(1), i32(L), i32(L),
                                                              i32(plan.keys_per_split), f32(0.125), i32(0)))
        if part is not None:
            emu.launch("attention_combine", plan.combine_grid, plan.combine_block,
                       (part, out, i32(1), i32(plan.n_splits), i32(head_dim)))
        np.testing.assert_allclose(out[0], want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_silu_mul(emu, ref):
    rng = np.random.default_rng(1)
    T, inter = 3, 160
    gate_up = (rng.standard_normal((T, 2 * inter)) * 4).astype(f32)  # a fused gate|up projection output
    gate_up[0, :4] = [-100.0, -89.0, 89.0, 0.0]  # exp(-g) overflows to inf → silu = -0
    gate, up = np.ascontiguousarray(gate_up[:, :inter]), np.ascontiguousarray(gate_up[:, inter:])
    want = ref.silu_mul(gate, up)
    out = np.full((T, inter), np.nan, f32)
    grid, block = elementwise_launch(T * inter)
    flat = gate_up.reshape(-1)
    emu.launch("silu_mul_f32", grid, block, (flat, flat[inter:], out, i32(T), i32(inter), i32(2 * inter), i32(inter)))
    # A saturated gate gives -0 here (expf overflows to inf); the reference gives -0 too on its NumPy path, but
    # ~1e-36 when its compiled kernels are built (cpu_ops.exp32 clamps to a finite e^x): both are silu's zero.
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-30)
    assert np.all(out[0, :2] == 0.0)


def test_gelu_mul(emu):
    """GeGLU (Gemma): gelu_tanh(gate)·up from a fused gate|up buffer, odd width, saturated gates."""
    rng = np.random.default_rng(6)
    T, inter = 3, 157
    gate_up = (rng.standard_normal((T, 2 * inter)) * 4).astype(f32)
    gate_up[0, :6] = [-100.0, -12.0, 12.0, 100.0, 0.0, -1e20]  # tanh saturates; g³ overflows to -inf → -0
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    want = gelu_mul_reference(gate, up)
    out = np.full((T, inter), np.nan, f32)
    flat = gate_up.reshape(-1)
    emu.launch("gelu_mul_f32", *elementwise_launch(T * inter),
               (flat, flat[inter:], out, i32(T), i32(inter), i32(2 * inter), i32(inter)))
    assert np.all(np.isfinite(out))
    err = np.abs(out.astype(np.float64) - want)
    bound = 1e-6 * np.abs(gate.astype(np.float64) * up) + 1e-30
    assert np.all(err <= bound), f"max err/bound {(err / bound).max():.3g}"
    assert out[0, 0] == 0.0 and out[0, 5] == 0.0


def test_scale(emu):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 67)).astype(f32)
    s = math.sqrt(640)  # Gemma 3 270M's embedding scale, sqrt(hidden)
    out = np.full_like(x, np.nan)
    emu.launch("scale_f32", *elementwise_launch(x.size), (x, out, i32(x.size), f32(s)))
    assert np.array_equal(out, x * f32(s))
    emu.launch("scale_f32", *elementwise_launch(x.size), (x, x, i32(x.size), f32(s)))  # in place
    assert np.array_equal(x, out)


def test_embedding_f16(emu):
    rng = np.random.default_rng(2)
    table = rng.standard_normal((50, 24)).astype(np.float16)
    ids = np.array([3, 0, 49, 3, -1, 50], dtype=np.int32)
    out = np.full((ids.size, 24), np.nan, f32)
    grid, block = rowwise_launch(ids.size, 32)
    emu.launch("embedding_f16", grid, block, (ids, table, out, i32(ids.size), i32(24), i32(50)))
    want = table[np.clip(ids, 0, 49)].astype(f32)
    want[4:] = 0
    assert np.array_equal(out, want)


def test_add(emu):
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 1000)).astype(f32)
    want = a + b
    grid, block = elementwise_launch(a.size)
    emu.launch("add_f32", grid, block, (a, b, a, i32(a.size)))  # in place: out is a
    assert np.array_equal(a, want)

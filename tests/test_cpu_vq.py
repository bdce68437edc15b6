"""The `vq` scheme on the CPU: the compiled fused GEMV of cpu_vq_kernels.py (parallel and serial forms) and the
handle of cpu_vq.py (kernel path, NumPy path, cached mode, embedding rows, vq blocks of a `rows` matrix in a
written file) against format_spec's reference dequantization, every (bits, dim) × group size × 6/8-bit scale
codes × odd shapes, with and without outliers; 12-bit indices (v3d4, a file's shared codebook of 4096 points,
format 1.7) included: with 8-bit ones of dim 4 (v2d4) their own kernel (points_dot), their handles' one widened
codebook per distinct codebook, a written file whose tensors and row blocks share one. Rows of both widths (format
1.8: indices padded to whole words, a row's last pack of 32 possibly partial, v2d4's of every length; ≤ 1.7: to
whole packs), garbage in their padding slots, and rows followed by poisoned memory (a kernel reading past a row's
end would gather a NaN point). A whole model with vq
linears: test_runtime.py (kind "vq").

Tolerance: a product is float32 sums in another order than the float64 reference x·Wᵀ (W = dequantize(blobs),
itself exact in float32): |y − x·Wᵀ| ≤ RTOL·(|x|·|W|ᵀ) + 1e-6·(1 + |x·Wᵀ|) per element, RTOL = 1e-5 (fp32's
worst case for sums of ~300 terms is ~2e-5 of |x|·|W|ᵀ; measured here: below 3e-7). The kernels multiply x as
given (no activation rounding, unlike the affine kernels), but for codebooks on the 8-bit grid (SPEC.md §12.5),
whose integer kernel multiplies the affine kernels' x̂ (|x − x̂|·|W|ᵀ more allowed). Looked-up rows (embedding) are
exact.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import random_vq_blobs
from mxq.format_spec import MxqFile, StorageConfig, dequantize, pack_codes
from mxq.format_spec.layout import VQ_INDEX_BITS, vq_dims
from mxq.runtime.backends.cpu_weights import (KERNEL_MAX_TOKENS, KERNEL_PARALLEL_MIN_WEIGHTS, NO_COLS, NO_FLOAT,
                                              NO_RESIDUAL, NO_ROWS, NO_VALUES, ThreadChoice, activation_low_part,
                                              quantize_activations, readonly)
from mxq.runtime.backends.numpy_backend import NumpyBackend
from test_cpu_kernels import JIT_KERNELS, jit_kernels

pytestmark = pytest.mark.early(*JIT_KERNELS)  # the JIT's kernels compiled while other tests run (conftest: early)

RTOL = 1e-5
KINDS = [(2, 2), (3, 2), (4, 2), (2, 4), (3, 4)]  # (bits, dim): index bits 4, 6, 8, 8, 12 (a shared codebook)
GROUPS = [32, 64, 128]
# (shape, outliers): one weight, in < dim, padded last packs and groups, in = one group + 1, several packs
ODD_SHAPES = [((1, 1), 1), ((7, 33), 3), ((37, 70), 6), ((9, 129), 5), ((20, 256), 7), ((131, 333), 40)]
# in_features whose rows end in a partial pack at format 1.8 (dim 4: 10, 34, 50 and 144 indices, the last
# SmolLM2's 576-wide rows: 4 packs and 16; dim 2: 20, 68, 100), and whole packs (576 at dim 2: 288 indices)
PARTIAL_INPUTS = [40, 136, 200, 576]
MINORS = [7, 8]  # the format minors whose vq rows the runtime reads: padded to whole packs (≤ 1.7), to words (1.8)
POISON_WORDS = 64  # after a test matrix's last row (layout_blobs): more than a pack (12 words at 12 bits)


class _Entry:
    def __init__(self, name, shape, config, role="linear"):
        self.name, self.shape, self.config, self.role = name, tuple(shape), config, role


def assert_close(y, x, weight, bias=None, residual=None, rounded_x=False):
    """y ≈ x @ Wᵀ (+ bias) (+ residual) within the module doc's bound; rounded_x: some rows come from the affine
    kernels, which multiply a rounded x̂ (cpu_weights.quantize_activations): |x − x̂|·|W|ᵀ more allowed."""
    x64, w64 = x.astype(np.float64), weight.astype(np.float64)
    expected = x64 @ w64.T
    allowed = RTOL * (np.abs(x64) @ np.abs(w64).T)
    if rounded_x:
        allowed += np.abs(x64 - quantize_activations(x, activation_low_part())) @ np.abs(w64).T
    if bias is not None:
        expected += bias
    if residual is not None:
        expected += residual
    assert y.shape == expected.shape and y.dtype == np.float32
    assert np.all(np.abs(y - expected) <= allowed + 1e-6 * (1 + np.abs(expected)))


@pytest.fixture(scope="module")
def vq_kernels():
    """cpu_vq_kernels compiled by Numba's JIT (test_cpu_kernels.jit_kernels)."""
    pytest.importorskip("numba")
    return jit_kernels().vq()


@pytest.fixture(scope="module", params=["aot", "jit"])
def backends(request):
    """(compiled, NumPy reference) backends, with the ahead-of-time kernels and with Numba's JIT."""
    pytest.importorskip("numba")
    from test_cpu_kernels import kernels_mode

    with kernels_mode(request.param):
        fast, ref = NumpyBackend(threads=2), NumpyBackend(threads=2, kernels=False)
        if fast.kernels is None or fast.kernels.kind != request.param:
            pytest.fail(f"the {request.param} kernels did not load (see the notice on stderr)")
        yield fast, ref
        fast.close()
        ref.close()


def vq_config(bits, dim, group, outliers=0, meta_bits=0) -> StorageConfig:
    """StorageConfig.vq, with a shared codebook where the index bits need one (12: v3d4)."""
    return StorageConfig.vq(bits, dim, group, outliers, meta_bits, shared=bits * dim not in VQ_INDEX_BITS)


def vq_blobs(rng, shape, config: StorageConfig) -> dict:
    """random_vq_blobs with a random codebook for shared configs too (conftest's shared one is fixed): every test
    matrix its own points, as a file's blobs would give them (the reader's shared `codebook` blob)."""
    blobs = random_vq_blobs(rng, shape, config)
    if config.shared:
        blobs["codebook"] = (rng.standard_normal(blobs["codebook"].shape) * 1.5).astype(np.float16)
    return blobs


def layout_blobs(rng, shape, config: StorageConfig, minor: int) -> dict:
    """vq_blobs with each row's indices padded as format 1.`minor` pads them (layout.vq_dims: 7 whole packs of 32,
    8 whole words), random indices in every slot, padding slots too (what every path must ignore), all below
    2^k − 1, whose codebook point is fp16's largest, 65504 (a NaN point is refused before use, SPEC.md §9):
    `qweight` is a view of the start of a longer buffer whose further words are all ones (index 2^k − 1 in
    every slot), so a kernel reading past the last row's end gathers 65504s and misses the reference."""
    blobs = vq_blobs(rng, shape, config)
    top = (1 << config.index_bits) - 1
    blobs["codebook"][top] = np.float16(65504)
    _, _, n_slots, _ = vq_dims(shape, config, minor)
    words = pack_codes(rng.integers(0, top, (shape[0], n_slots)), config.index_bits)  # (out, n_slots·k / 32)
    buffer = np.full(words.size + POISON_WORDS, 0xFFFFFFFF, np.uint32)
    buffer[:words.size] = words.reshape(-1)
    blobs["qweight"] = buffer[:words.size].reshape(words.shape)
    return blobs


def kernel_codebook(blobs, config: StorageConfig):
    """vq_matmul's codebook argument: float32 coordinate planes (dim, 2^k); for dim 4 the fp16 points' bytes as
    float32 (2^k, 2) (cpu_vq_kernels' module doc)."""
    if config.dim == 4:
        return readonly(blobs["codebook"].view(np.float32))
    return readonly(blobs["codebook"].astype(np.float32).T)


def kernel_args(blobs, config: StorageConfig):
    """vq_matmul's weight arguments as VqWeight passes them."""
    csr = ((readonly(blobs["outlier_row_ptr"]), readonly(blobs["outlier_cols"]),
            readonly(blobs["outlier_values"].view(np.uint16))) if config.outliers else (NO_ROWS, NO_COLS, NO_VALUES))
    return (readonly(blobs["qweight"].view(np.uint8)), kernel_codebook(blobs, config), config.index_bits, config.dim,
            readonly(blobs["scale_codes"]), readonly(blobs["scale_meta"].astype(np.float32)), config.group_size, *csr)


# -- the kernels --------------------------------------------------------------------------------------

@pytest.mark.parametrize("meta_bits", [6, 8])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits,dim", KINDS)
def test_kernels_match_the_reference(vq_kernels, bits, dim, group, meta_bits):
    """vq_matmul (3 parallel parts) and vq_matmul_serial, T = 1 and 5, bias and residual, with and without
    outliers, against the float64 product with dequantize(blobs)."""
    rng = np.random.default_rng(bits * 1000 + dim * 100 + group + meta_bits)
    for (shape, nnz), outliers in itertools.product(ODD_SHAPES, (False, True)):
        config = vq_config(bits, dim, group, nnz if outliers else 0, meta_bits)
        blobs = vq_blobs(rng, shape, config)
        weight = dequantize(blobs, shape, config)
        args = kernel_args(blobs, config)
        for tokens, extras in ((1, False), (5, False), (5, True)):
            x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
            bias = rng.standard_normal(shape[0]).astype(np.float32) if extras else None
            residual = rng.standard_normal((tokens, shape[0])).astype(np.float32) if extras else None
            for kernel in (vq_kernels.vq_matmul, vq_kernels.vq_matmul_serial):
                y = np.full((tokens, shape[0]), np.nan, np.float32)
                kernel(x, *args, NO_FLOAT if bias is None else bias, NO_RESIDUAL if residual is None else residual,
                       y, 3)
                assert_close(y, x, weight, bias, residual)


def test_kernels_read_every_index_position_and_scale(vq_kernels):
    """One nonzero input at a time: y = column c of W exactly as far as fp32 allows, for every column of a
    matrix whose indices, codebook and scales all differ (a wrong shift, plane or group would show)."""
    rng = np.random.default_rng(3)
    for bits, dim in KINDS:
        shape = (5, 160)
        config = vq_config(bits, dim, 32)
        blobs = vq_blobs(rng, shape, config)
        weight = dequantize(blobs, shape, config)
        x = np.eye(shape[1], dtype=np.float32)  # (in, in): token c picks column c
        y = np.empty((shape[1], shape[0]), np.float32)
        vq_kernels.vq_matmul_serial(x, *kernel_args(blobs, config), NO_FLOAT, NO_RESIDUAL, y, 1)
        np.testing.assert_allclose(y, weight.T, rtol=1e-6, atol=0)


@pytest.mark.parametrize("minor", MINORS)
@pytest.mark.parametrize("bits,dim", KINDS)
def test_kernels_take_word_and_pack_padded_rows(vq_kernels, bits, dim, minor):
    """Rows padded to whole words (format 1.8: a partial last pack for most of PARTIAL_INPUTS) or to whole packs
    (≤ 1.7), garbage indices in their padding slots: vq_matmul (3 parallel parts) and vq_matmul_serial, T = 1 and 5,
    every group size (12 bits: 4, 2 or 1 scales a pack), outliers, bias and residual, against the reference."""
    rng = np.random.default_rng(bits * 1000 + dim * 100 + minor)
    for n_in, group in itertools.product(PARTIAL_INPUTS, GROUPS):
        shape = (6, n_in)
        config = vq_config(bits, dim, group, 5)
        blobs = layout_blobs(rng, shape, config, minor)
        if (n_in, dim, minor) == (576, 4, 8):  # SmolLM2's rows: 144 indices, no padding (1.7: 160)
            assert blobs["qweight"].shape == (6, 144 * config.index_bits // 32)
        weight = dequantize(blobs, shape, config)
        args = kernel_args(blobs, config)
        for tokens in (1, 5):
            x = rng.standard_normal((tokens, n_in)).astype(np.float32)
            bias = rng.standard_normal(shape[0]).astype(np.float32)
            residual = rng.standard_normal((tokens, shape[0])).astype(np.float32)
            for kernel in (vq_kernels.vq_matmul, vq_kernels.vq_matmul_serial):
                y = np.full((tokens, shape[0]), np.nan, np.float32)
                kernel(x, *args, bias, residual, y, 3)
                assert_close(y, x, weight, bias, residual)


@pytest.mark.parametrize("minor", MINORS)
@pytest.mark.parametrize("bits,dim", KINDS)
def test_kernels_never_read_past_a_row(vq_kernels, bits, dim, minor):
    """A matrix of one row and of 5, cut exactly from a buffer whose words after them decode to the codebook's NaN
    point (layout_blobs): every output finite and as the reference says, one token and several (12 bits: the
    partial last pack's masked load and gather), serial and parallel."""
    rng = np.random.default_rng(bits * 100 + dim * 10 + minor)
    for n_in, rows in itertools.product(PARTIAL_INPUTS, (1, 5)):
        shape, config = (rows, n_in), vq_config(bits, dim, 64)
        blobs = layout_blobs(rng, shape, config, minor)
        weight = dequantize(blobs, shape, config)
        assert np.isfinite(weight).all()
        for tokens in (1, 4):
            x = rng.standard_normal((tokens, n_in)).astype(np.float32)
            for kernel in (vq_kernels.vq_matmul, vq_kernels.vq_matmul_serial):
                y = np.full((tokens, rows), np.nan, np.float32)
                kernel(x, *kernel_args(blobs, config), NO_FLOAT, NO_RESIDUAL, y, 2)
                assert np.isfinite(y).all()
                assert_close(y, x, weight)


@pytest.mark.parametrize("group", GROUPS)
def test_points_kernel_takes_every_partial_pack_of_8_bit_indices(vq_kernels, group):
    """8-bit indices, dim 4 (points_dot's packs of 32 bytes): rows of 0 or 1 whole packs and a partial last pack of
    every length, 1 … 7 words (4 … 28 indices; in_features 16·words − 1 + 128·packs: the last vector short by one
    input), format 1.8, poisoned memory past the last row: serial and parallel, T = 1 and 5, against the reference."""
    rng = np.random.default_rng(group)
    for whole_packs, tail_words in itertools.product((0, 1), range(1, 8)):
        n_in = 16 * tail_words - 1 + 128 * whole_packs
        shape, config = (5, n_in), vq_config(2, 4, group, 3)
        blobs = layout_blobs(rng, shape, config, 8)
        assert blobs["qweight"].shape == (5, 8 * whole_packs + tail_words)
        weight = dequantize(blobs, shape, config)
        for tokens in (1, 5):
            x = rng.standard_normal((tokens, n_in)).astype(np.float32)
            for kernel in (vq_kernels.vq_matmul, vq_kernels.vq_matmul_serial):
                y = np.full((tokens, shape[0]), np.nan, np.float32)
                kernel(x, *kernel_args(blobs, config), NO_FLOAT, NO_RESIDUAL, y, 2)
                assert_close(y, x, weight)



# -- codebooks on the 8-bit grid (SPEC.md §12.5): the integer kernel ---------------------------------------------------
GRID_KINDS = [(2, 4), (3, 4)]


def grid_blobs(rng, shape, config: StorageConfig, minor: int = 8) -> dict:
    """layout_blobs with the codebook on the 8-bit grid (format_spec.snap_to_int8_grid), its poison point 0 (65504
    would set the grid's scale)."""
    from mxq.format_spec import snap_to_int8_grid

    blobs = layout_blobs(rng, shape, config, minor)
    blobs["codebook"][(1 << config.index_bits) - 1] = 0
    blobs["codebook"] = snap_to_int8_grid(blobs["codebook"])
    return blobs


def grid_args(blobs, config: StorageConfig):
    """vq_grid_matmul's weight arguments as VqWeight passes them: the codes + 128 as bytes and the step 2^e."""
    from mxq.format_spec import int8_grid

    codes, e = int8_grid(blobs["codebook"])
    args = kernel_args(blobs, config)
    book = readonly((codes.astype(np.int16) + 128).astype(np.uint8))
    return (args[0], book, config.index_bits, np.float32(2.0 ** e), *args[4:])


@pytest.mark.parametrize("minor", MINORS)
@pytest.mark.parametrize("meta_bits", [6, 8])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits,dim", GRID_KINDS)
def test_grid_kernels_match_the_reference(vq_kernels, bits, dim, group, meta_bits, minor):
    """vq_grid_matmul (3 parallel parts) and vq_grid_matmul_serial against the float64 product with
    dequantize(blobs): T = 1 and 5, bias and residual, with and without outliers, rows padded to words (1.8, a last
    pack possibly partial: PARTIAL_INPUTS) and to packs (1.7), garbage indices in the padding slots. They multiply x̂,
    the affine kernels' rounding of x (rounded_x)."""
    rng = np.random.default_rng(bits * 1000 + group + meta_bits + minor)
    shapes = ODD_SHAPES + [((5, n), 2) for n in PARTIAL_INPUTS]
    for (shape, nnz), outliers in itertools.product(shapes, (False, True)):
        config = vq_config(bits, dim, group, nnz if outliers else 0, meta_bits)
        blobs = grid_blobs(rng, shape, config, minor)
        if outliers:
            blobs.update({k: v for k, v in vq_blobs(rng, shape, config).items() if k.startswith("outlier")})
        weight = dequantize(blobs, shape, config)
        args = grid_args(blobs, config)
        for tokens, extras in ((1, False), (5, False), (5, True)):
            x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
            bias = rng.standard_normal(shape[0]).astype(np.float32) if extras else None
            residual = rng.standard_normal((tokens, shape[0])).astype(np.float32) if extras else None
            for kernel in (vq_kernels.vq_grid_matmul, vq_kernels.vq_grid_matmul_serial):
                y = np.full((tokens, shape[0]), np.nan, np.float32)
                kernel(x, *args, NO_FLOAT if bias is None else bias, NO_RESIDUAL if residual is None else residual,
                       y, 3)
                assert_close(y, x, weight, bias, residual, rounded_x=True)


def test_grid_kernel_reads_every_index_position_and_scale(vq_kernels):
    """One nonzero input (a power of two: x̂ = x) at a time: y = column c of W, for every column of rows with 12- and
    8-bit indices and a partial last pack, up to the zero point's cancellation ((c + 128)·s − 128·s in float32: a
    few ulps of 128·s·step, ≤ 1e-5 of the row's largest weight)."""
    rng = np.random.default_rng(11)
    for bits, group in ((3, 32), (2, 64), (3, 128)):
        shape = (4, 200)
        config = vq_config(bits, 4, group)
        blobs = grid_blobs(rng, shape, config)
        weight = dequantize(blobs, shape, config)
        args = grid_args(blobs, config)
        for c in range(shape[1]):
            x = np.zeros((1, shape[1]), np.float32)
            x[0, c] = 0.5
            y = np.empty((1, shape[0]), np.float32)
            vq_kernels.vq_grid_matmul_serial(x, *args, NO_FLOAT, NO_RESIDUAL, y, 1)
            assert np.all(np.abs(y[0] - 0.5 * weight[:, c]) <= 1e-5 * 0.5 * np.abs(weight).max(1))


@pytest.mark.parametrize("bits,dim", GRID_KINDS)
def test_handles_of_grid_codebooks_take_the_integer_kernel(backends, bits, dim, monkeypatch):
    """A 4-D codebook on the grid: the handle's widened codebook carries the grid (one per distinct codebook); its
    products of 1 and 3 tokens (the integer kernel, on the team where big enough) and 20 (dequantize + sgemm: x
    itself) match the reference; a codebook off the grid keeps the float kernel (x itself, RTOL)."""
    from mxq.format_spec import int8_grid

    fast, ref = backends
    rng = np.random.default_rng(bits)
    for (shape, nnz), group in itertools.product(ODD_SHAPES + [((300, 576), 9), ((64, 1536), 0)], GROUPS):
        config = vq_config(bits, dim, group, nnz)
        blobs = grid_blobs(rng, shape, config)
        blobs.update({k: v for k, v in vq_blobs(rng, shape, config).items() if k.startswith("outlier")})
        weight = dequantize(blobs, shape, config)
        w_fast, w_ref = (backend.prepare(_Entry("w", shape, config), blobs) for backend in (fast, ref))
        codes, e = int8_grid(blobs["codebook"])
        assert np.array_equal(w_fast.codebook.grid_book.astype(np.int16) - 128, codes)
        assert w_fast.codebook.grid_step == 2.0 ** e
        for tokens in (1, 3, 20):
            x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
            assert_close(fast.linear(x, w_fast), x, weight, rounded_x=tokens <= KERNEL_MAX_TOKENS)
            assert_close(ref.linear(x, w_ref), x, weight)
    off = vq_blobs(rng, (40, 136), vq_config(bits, dim, 32))
    w_off = fast.prepare(_Entry("w", (40, 136), vq_config(bits, dim, 32)), off)
    assert w_off.codebook.grid_book is None
    x = rng.standard_normal((1, 136)).astype(np.float32)
    assert_close(fast.linear(x, w_off), x, dequantize(off, (40, 136), vq_config(bits, dim, 32)))
    assert fast.kernels is not None  # no kernel failed (a failure switches them off: the NumPy path)

# -- the handle ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,dim", KINDS)
def test_handle_kernel_and_numpy_path_match_the_reference(backends, bits, dim, monkeypatch):
    """Products of 1, 3 (the kernel) and 20 tokens (> KERNEL_MAX_TOKENS: dequantize + sgemm, in chunks of 8 rows)
    on the compiled and the NumPy backend, bias and residual; embedding rows exact."""
    from mxq.runtime.backends import cpu_weights

    monkeypatch.setattr(cpu_weights, "_chunk_rows", lambda tokens, row_elements: 8)  # several chunks per matrix
    fast, ref = backends
    rng = np.random.default_rng(bits * 10 + dim)
    assert 20 > KERNEL_MAX_TOKENS
    for (shape, nnz), group, meta_bits in itertools.product(ODD_SHAPES, GROUPS, (6, 8)):
        config = vq_config(bits, dim, group, nnz if group != 64 else 0, meta_bits)
        blobs = vq_blobs(rng, shape, config)
        weight = dequantize(blobs, shape, config)
        w_fast, w_ref = (backend.prepare(_Entry("w", shape, config), blobs) for backend in (fast, ref))
        bias = rng.standard_normal(shape[0]).astype(np.float32)
        for tokens in (1, 3, 20):
            x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
            residual = rng.standard_normal((tokens, shape[0])).astype(np.float32)
            assert_close(fast.linear(x, w_fast), x, weight)
            assert_close(ref.linear(x, w_ref), x, weight)
            assert_close(fast.linear(x, w_fast, bias, residual.copy()), x, weight, bias, residual)
        ids = np.array([0, shape[0] - 1, 0, shape[0] // 2])
        np.testing.assert_array_equal(fast.embedding(w_fast, ids), weight[ids])
        np.testing.assert_array_equal(ref.embedding(w_ref, ids), weight[ids])
    assert fast.kernels is not None  # no kernel failed (a failure switches them off: the NumPy path)


@pytest.mark.parametrize("minor", MINORS)
@pytest.mark.parametrize("bits,dim", KINDS)
def test_handle_takes_word_and_pack_padded_rows(backends, bits, dim, minor, monkeypatch):
    """VqWeight on rows of either width (layout_blobs: garbage padding, poisoned memory past the last row), compiled
    and NumPy backends: products of 1, 3 (the kernel) and 20 tokens (dequantize_rows in chunks of 8 rows, then
    sgemm), dequantize_rows of every row and embedding rows exactly the reference's."""
    from mxq.runtime.backends import cpu_weights

    monkeypatch.setattr(cpu_weights, "_chunk_rows", lambda tokens, row_elements: 8)  # several chunks per matrix
    fast, ref = backends
    rng = np.random.default_rng(bits * 10 + dim + minor)
    for n_in in PARTIAL_INPUTS:
        shape, config = (19, n_in), vq_config(bits, dim, 32, 4)
        blobs = layout_blobs(rng, shape, config, minor)
        weight = dequantize(blobs, shape, config)
        for backend in (fast, ref):
            handle = backend.prepare(_Entry("w", shape, config), blobs)
            for tokens in (1, 3, 20):
                x = rng.standard_normal((tokens, n_in)).astype(np.float32)
                assert_close(backend.linear(x, handle), x, weight)
            np.testing.assert_array_equal(handle.dequantize_rows(slice(None)), weight)
            ids = np.array([shape[0] - 1, 0, 7, shape[0] - 1])
            np.testing.assert_array_equal(backend.embedding(handle, ids), weight[ids])
    assert fast.kernels is not None  # no kernel failed (a failure switches them off: the NumPy path)


def test_the_kernel_serves_decode_and_sgemm_serves_prefill(backends, monkeypatch):
    """Up to KERNEL_MAX_TOKENS tokens the compiled kernel multiplies (the NumPy path is not called), above it
    the NumPy path."""
    from mxq.runtime.backends.cpu_vq import VqWeight

    fast, _ = backends
    rng = np.random.default_rng(11)
    shape, config = (40, 96), StorageConfig.vq(3, 2, 32, 4)
    blobs = random_vq_blobs(rng, shape, config)
    weight = dequantize(blobs, shape, config)
    handle = fast.prepare(_Entry("w", shape, config), blobs)
    calls = []
    original = VqWeight.numpy_matmul
    monkeypatch.setattr(VqWeight, "numpy_matmul", lambda self, x: calls.append(x.shape[0]) or original(self, x))
    for tokens in (1, KERNEL_MAX_TOKENS, KERNEL_MAX_TOKENS + 1):
        x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
        assert_close(fast.linear(x, handle), x, weight)
    assert calls == [KERNEL_MAX_TOKENS + 1]


@pytest.mark.parametrize("bits,dim", [(2, 4), (3, 4)])
def test_parallel_parts_and_cached_mode_match(bits, dim):
    """A matrix big enough for ThreadChoice (Numba's JIT): its first calls alternate the serial and the parallel
    kernel — identical numbers; the cached mode (float32 copy, BLAS) matches too."""
    pytest.importorskip("numba")
    from test_cpu_kernels import kernels_mode

    rng = np.random.default_rng(7)
    shape, config = (600, 1000), vq_config(bits, dim, 64, 50)
    assert shape[0] * shape[1] >= KERNEL_PARALLEL_MIN_WEIGHTS
    blobs = vq_blobs(rng, shape, config)
    weight = dequantize(blobs, shape, config)
    x = rng.standard_normal((2, shape[1])).astype(np.float32)
    with kernels_mode("jit"):
        lean, cached = NumpyBackend(threads=2), NumpyBackend(threads=2, cache_dequantized=True)
    handle = lean.prepare(_Entry("w", shape, config), blobs)
    assert lean.kernels.parallel and handle.threads_choice is not None
    results = [lean.linear(x, handle) for _ in range(2 * ThreadChoice.PROBE)]
    for y in results:
        np.testing.assert_array_equal(y, results[0])
    assert_close(results[0], x, weight)
    cached_handle = cached.prepare(_Entry("w", shape, config), blobs)
    assert cached_handle.dense is not None
    assert_close(cached.linear(x, cached_handle), x, weight)
    np.testing.assert_array_equal(cached_handle.dense, weight)
    lean.close()
    cached.close()


def test_a_written_file_with_vq_tensors_and_vq_row_blocks(tmp_path, backends):
    """write → MxqFile → the backend's handles: plain vq matrices and a `rows` matrix with vq blocks next to
    affine, lut and fp16 ones; products (kernel and sgemm sizes) and embedding lookups."""
    from test_rows_scheme import write_rows_file

    fast, ref = backends
    parse = StorageConfig.parse
    tensors = [("a", (37, 70), parse("v3d2g64+o6")), ("b", (50, 40), parse("v2d4g32m8")),
               ("c", (96, 130), parse("v4d2g128")),
               ("r", (40, 64), parse("rows(10:v2d2g32+o3,10:b4g32,12:v2d4g64m8,4:l3,4:fp16)"))]
    path = tmp_path / "vq.mxq"
    written = write_rows_file(path, tensors)
    rng = np.random.default_rng(5)
    with MxqFile.open(path) as f:
        assert f.version == (1, 8) and f.verify() == []  # (1.8: vq rows padded to whole words)
        for name, shape, config in tensors:
            blobs = f.blobs(name)
            for blob_name, array in written[name].items():
                np.testing.assert_array_equal(blobs[blob_name], array)
            weight = dequantize(blobs, shape, config)
            affine_rows = config.scheme == "rows"  # its affine block's kernels (stacks: prefill pieces too) round x
            for backend in (fast, ref):
                handle = backend.prepare(f.tensors[name], blobs)
                for tokens in (1, 20):
                    x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
                    rounded = affine_rows and backend.kernels is not None
                    assert_close(backend.linear(x, handle), x, weight, rounded_x=rounded)
                ids = np.array([shape[0] - 1, 0, 3, 3])
                np.testing.assert_array_equal(backend.embedding(handle, ids), weight[ids])
    assert fast.kernels is not None


@pytest.mark.parametrize("bits,dim", [(2, 4), (3, 4)])
def test_bad_outliers_are_a_model_error_and_any_codebook_gives_numbers(backends, bits, dim):
    """Content the reader cannot judge: unsound CSR outliers and non-finite codebook or scale bytes are a
    ModelError naming the tensor; indices always fall inside the codebook (k bits, 2^k points), so any finite
    codebook or scale bytes (fp16's extremes) give numbers on every path, never an out-of-bounds read."""
    from mxq.runtime.errors import ModelError

    fast, ref = backends
    rng = np.random.default_rng(13)
    shape, config = (6, 40), vq_config(bits, dim, 32, 4)
    blobs = vq_blobs(rng, shape, config)
    with pytest.raises(ModelError, match="tensor 'w': bad outliers"):
        fast.prepare(_Entry("w", shape, config), dict(blobs, outlier_cols=np.array([0, 0, 0, 99], np.uint16)))
    for bad in (np.inf, np.nan):
        for name in ("codebook", "scale_meta"):
            with pytest.raises(ModelError, match=f"tensor 'w': blob '{name}' holds NaN or infinity"):
                fast.prepare(_Entry("w", shape, config), dict(blobs, **{name: np.full_like(blobs[name], bad)}))
    wild_points = np.where(rng.random(blobs["codebook"].shape) < 0.5, 65504, -65504).astype(np.float16)
    wild = dict(blobs, codebook=wild_points, scale_meta=np.full_like(blobs["scale_meta"], 65504))
    with np.errstate(over="ignore", invalid="ignore"):  # float32 products may overflow to inf, inf − inf
        for backend in (fast, ref):
            handle = backend.prepare(_Entry("w", shape, config), wild)
            for tokens in (1, 20):
                y = backend.linear(np.ones((tokens, shape[1]), np.float32), handle)
                assert y.shape == (tokens, shape[0]) and y.dtype == np.float32


# -- 12-bit indices: one widened codebook per distinct codebook -----------------------------------------------

def test_a_written_file_whose_tensors_and_blocks_share_a_codebook(tmp_path, backends):
    """Format 1.7's shared codebooks (the file written as 1.8): vq tensors and `rows` blocks that use the file's
    shared 12-bit codebook (v3d4…s), beside a block with a codebook of its own: products (kernel and sgemm sizes) and
    embedding rows as the reference says; the shared codebook widened once for every handle of a backend (one
    Widened), each kernel reading the file's own fp16 bytes (a view of the codebook tensor, no copy). Opened twice:
    the second file's handles are right too."""
    from test_rows_scheme import write_rows_file

    from mxq.runtime.backends.cpu_vq import VqWeight

    fast, ref = backends
    parse = StorageConfig.parse
    tensors = [("a", (37, 70), parse("v3d4g64s+o6")), ("b", (50, 40), parse("v3d4g32m8s")),
               ("c", (96, 130), parse("v3d4g128s")),
               ("r", (40, 64), parse("rows(10:v3d4g32s+o3,10:b4g32,12:v2d4g64m8,8:v3d4g128m8s)"))]
    path = tmp_path / "shared.mxq"
    write_rows_file(path, tensors)
    rng = np.random.default_rng(17)
    for _ in range(2):
        with MxqFile.open(path) as f:
            assert f.version == (1, 8) and f.verify() == []
            book = f.blobs("codebook.v3d4")["data"]  # (4096, 4) fp16: the file's shared codebook tensor
            for backend in (fast, ref):
                shared = []  # the backend's handles of 12-bit matrices and blocks
                for name, shape, config in tensors:
                    blobs = f.blobs(name)
                    weight = dequantize(blobs, shape, config)
                    handle = backend.prepare(f.tensors[name], blobs)
                    parts = handle.blocks if config.scheme == "rows" else [handle]
                    shared += [w for w in parts if isinstance(w, VqWeight) and w.index_bits == 12]
                    for tokens in (1, 4, 20):
                        x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
                        rounded = config.scheme == "rows" and backend.kernels is not None  # its affine block
                        assert_close(backend.linear(x, handle), x, weight, rounded_x=rounded)
                    ids = np.array([shape[0] - 1, 0, 3, 3])
                    np.testing.assert_array_equal(backend.embedding(handle, ids), weight[ids])
                assert len(shared) == 5
                assert all(w.codebook is shared[0].codebook for w in shared)  # widened once
                np.testing.assert_array_equal(shared[0].points, book.astype(np.float32))
                for w in shared:  # the kernel's codebook: the codebook tensor's bytes themselves
                    assert w.kernel_codebook.__array_interface__["data"][0] == book.__array_interface__["data"][0]
                    assert w.kernel_codebook.nbytes == book.nbytes
    assert fast.kernels is not None


def test_widened_codebooks_are_found_by_content_not_address():
    """cpu_vq.widened: equal codebook bytes (the same blob, or a copy) give the same Widened; other bytes at the
    same address (a buffer rewritten, as a file reopened at the same place could be) give their own; a Widened
    lives while a handle holds it."""
    import gc
    import weakref

    from mxq.runtime.backends.cpu_vq import widened

    rng = np.random.default_rng(19)
    shape, config = (24, 200), vq_config(3, 4, 64, 5)
    blobs = vq_blobs(rng, shape, config)
    backend = NumpyBackend(threads=1, kernels=False)
    first = backend.prepare(_Entry("w", shape, config), blobs)
    assert widened(blobs["codebook"]) is first.codebook
    assert widened(blobs["codebook"].copy()) is first.codebook
    buffer = blobs["codebook"]  # rewritten in place: same address, new content
    old_points = first.points.copy()
    buffer[...] = (rng.standard_normal(buffer.shape) * 1.5).astype(np.float16)
    second = backend.prepare(_Entry("w", shape, config), blobs)
    assert second.codebook is not first.codebook
    np.testing.assert_array_equal(first.points, old_points)  # the first handle's copy is untouched
    np.testing.assert_array_equal(second.points, buffer.astype(np.float32))
    x = rng.standard_normal((20, shape[1])).astype(np.float32)
    assert_close(backend.linear(x, second), x, dequantize(blobs, shape, config))
    alive = weakref.ref(second.codebook)
    del second
    gc.collect()
    assert alive() is None
    backend.close()

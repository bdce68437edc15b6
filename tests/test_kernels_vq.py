"""The `vq` CUDA kernels (kernels/gemv_vq.cu): NVRTC compiles them for every target GPU without
warnings or spills, within 48 KiB of static shared memory, and the same source run on the CPU through the
emulation harness matches format_spec.vq.dequantize_vq for every (bits, dim) × group size × odd shapes,
with and without outliers, in both emulator modes. (3, 4) — 12-bit indices into a 4096-point codebook,
which only a shared codebook (format 1.7) may have — is tested with the file's shared codebook as the
reader hands it over (the `codebook` blob; blob_specs of the config has none). Both row layouts run the
same kernels (words_per_row = qweight's width): a row's indices padded to whole words (format 1.8, whose
last pack may be partial: fewer than k words) and to whole packs of 32 (1.6, 1.7); the kernels never read
past a row's words nor load a vector from a misaligned row (the emulator faults on both: poisoned margins
past the matrix, `misaligned address` in __ldg).

Tolerances (as in test_kernels_lut.py, and why):
  * dequant_vq_b*_d*_f32: bit-exact (a codebook coordinate is an fp16 widened exactly, times the scale
    decoded with separately rounded fp32 multiply and add: one fp32 rounding, as in the reference;
    an outlier is one fp32 add more).
  * gemv_vq_b*_d*: against dequantize(blobs) @ x in float64. Per 32-column chunk and row the kernel
    sums the points · x in two FMA chains of 16, adds them, and FMAs the scaled sum into the lane's
    accumulator; a lane adds ≤ 5 chunks here (in ≤ 4200), then the outliers and 5 shuffle levels, and
    the reference rounds W = scale · point once: far fewer than 128 fp32 roundings, so
    |y − y64| ≤ 2⁻¹⁷·(Σ_c |W_rc·x_c| + Σ_outliers |v·x_c|) (W without outliers); we also check
    ≤ 2e-6 · the same, as for gemv_affine and gemv_lut. A residual adds one rounding (2⁻²³·|residual|).
"""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from conftest import random_vq_blobs
from mxq.format_spec import StorageConfig, blob_specs, dequantize, pack_codes, unpack_codes
from mxq.format_spec.affine import csr_entries
from mxq.format_spec.header import SHARED_CODEBOOK_MINOR, WORD_PADDED_VQ_MINOR
from mxq.format_spec.layout import VQ_BITS, VQ_DIMS, VQ_INDEX_BITS, vq_dims
from mxq.kernels import nvrtc
from mxq.kernels.emulator import MODES, EmulationError, Emulator, get_emulator
from mxq.kernels.registry import (VQ_CONFIGS, dequant_launch, dequant_vq_name, gemv_launch, gemv_vq_name,
                                  kernels_in)

i32, f32 = np.int32, np.float32
GROUPS = (32, 64, 128)
VQ_IDS = [f"b{b}d{d}" for b, d in VQ_CONFIGS]
# a vq row's index padding (vq_dims) by format minor: whole words from 1.8, whole packs in 1.7 (and 1.6)
LAYOUTS = {"words": WORD_PADDED_VQ_MINOR, "packs": SHARED_CODEBOOK_MINOR}


STATIC_SMEM_LIMIT = 48 * 1024  # static shared memory per block on every target (no opt-in)


@pytest.fixture(scope="module", params=MODES)
def emu(request):
    return Emulator(get_emulator().path, mode=request.param)


def vq_config(bits, dim, group_size, outliers=0, meta_bits=0):
    """The config the kernels are tested with: the tensor's own codebook where the format allows one, else
    (12-bit indices) the file's shared codebook (random_vq_blobs then gives conftest.shared_codebook)."""
    shared = bits * dim not in VQ_INDEX_BITS
    return StorageConfig.vq(bits, dim, group_size, outliers, meta_bits, shared=shared)


def test_vq_configs_are_the_formats():
    """One kernel pair per (bits, dim) the format accepts, with a codebook of its own — (2,2) (3,2) (4,2)
    (2,4) — or a shared one, which also allows (3,4)."""
    accepted = {False: [], True: []}
    for shared in accepted:
        for d in VQ_DIMS:
            for b in VQ_BITS:
                try:
                    StorageConfig.vq(b, d, 32, shared=shared)
                except ValueError:
                    continue
                accepted[shared].append((b, d))
    assert sorted(accepted[False]) == [(2, 2), (2, 4), (3, 2), (4, 2)]
    assert sorted(VQ_CONFIGS) == sorted(accepted[True]) == [(2, 2), (2, 4), (3, 2), (3, 4), (4, 2)]
    config = vq_config(3, 4, 64)
    assert config.shared and config.index_bits == 12 and config.label == "v3d4g64s"
    assert "codebook" not in blob_specs((8, 64), config)  # the reader passes the file's codebook


@pytest.mark.parametrize("arch", nvrtc.ARCHS)
def test_nvrtc_compiles_the_vq_kernels_for(arch):
    result = nvrtc.compile_source("gemv_vq.cu", arch)
    assert result.ok, result.log
    assert "warning" not in result.log.lower(), result.log
    assert sorted(result.entries) == sorted(kernels_in("gemv_vq.cu"))
    assert len(result.entries) == 2 * len(VQ_CONFIGS)
    assert {"gemv_vq_b3_d4", "dequant_vq_b3_d4_f32"} <= set(result.entries)


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="ptxas (CUDA toolkit) not on PATH")
def test_no_vq_kernel_spills():
    """No spills or local memory, and the static shared memory within the 48 KiB every target allows without
    an opt-in: b3d4's fp16 codebook (32 KiB) and its x tile of 64 chunks (8 KiB) are 40 KiB; its dequant
    stages nothing."""
    import kernel_report
    for arch in nvrtc.ARCHS:
        usage = kernel_report.usage("gemv_vq.cu", arch, "ptxas")
        assert sorted(usage) == sorted(kernels_in("gemv_vq.cu"))
        for name, u in usage.items():
            assert u["spill_stores"] == u["spill_loads"] == 0, f"{name} spills on {arch}: {u}"
            assert u["stack"] == 0, f"{name} uses local memory on {arch}: {u}"
            assert u["smem"] < STATIC_SMEM_LIMIT, f"{name} on {arch}: {u}"
        assert usage["gemv_vq_b3_d4"]["smem"] == 4096 * 4 * 2 + 64 * 32 * 4, (arch, usage["gemv_vq_b3_d4"])
        assert usage["dequant_vq_b3_d4_f32"]["smem"] == 0, (arch, usage["dequant_vq_b3_d4_f32"])


def vq_args(blobs):
    return (blobs["qweight"], blobs["codebook"], blobs["scale_codes"], blobs["scale_meta"],
            blobs.get("outlier_row_ptr"), blobs.get("outlier_cols"), blobs.get("outlier_values"))


def vq_tail(blobs, config):
    """The kernels' last arguments: words_per_row (qweight's width, either layout) and group_size."""
    return i32(blobs["qweight"].shape[1]), i32(config.group_size)


def run_gemv_vq(emu, blobs, shape, config, x, residual=None, y=None, warps=None):
    out_features, in_features = shape
    y = np.full(out_features, np.nan, f32) if y is None else y
    grid, block = gemv_launch(out_features, warps)
    emu.launch(gemv_vq_name(config.bits, config.dim), grid, block,
               vq_args(blobs) + (x, residual, y, i32(out_features), i32(in_features)) + vq_tail(blobs, config))
    return y


def check_gemv_vq(y, blobs, shape, config, x, residual=None):
    out_features, _ = shape
    ax = np.abs(x.astype(np.float64))
    plain = {k: v for k, v in blobs.items() if not k.startswith("outlier_")}
    plain_config = dataclasses.replace(config, outliers=0)
    magnitude = np.abs(dequantize(plain, shape, plain_config).astype(np.float64)) @ ax  # Σ |W·x|
    if config.outliers:
        rows, cols, values = csr_entries(blobs)
        magnitude += np.bincount(rows, np.abs(values) * ax[cols], minlength=out_features)
    want = dequantize(blobs, shape, config).astype(np.float64) @ x.astype(np.float64)
    extra = 0.0
    if residual is not None:
        want += residual
        extra = np.abs(residual) * 2.0 ** -23
    err = np.abs(y.astype(np.float64) - want)
    assert np.all(np.isfinite(y))
    assert np.all(err <= 2.0 ** -17 * magnitude + extra), f"max err {err.max():.3g}"
    assert np.all(err <= 2e-6 * magnitude + extra)


@pytest.mark.parametrize("minor", LAYOUTS.values(), ids=LAYOUTS)
@pytest.mark.parametrize("outliers", [0, 23], ids=["plain", "outliers"])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits,dim", VQ_CONFIGS, ids=VQ_IDS)
def test_gemv_vq_matches_dequantize(emu, bits, dim, group_size, outliers, minor):
    shape = (37, 2 * group_size + 7)  # a partial last chunk, group and (dim 2, 4) vector; 37 rows = 2 blocks of 16 + 5
    rng = np.random.default_rng(bits * 1000 + dim * 100 + group_size + outliers)
    config = vq_config(bits, dim, group_size, outliers)
    blobs = random_vq_blobs(rng, shape, config, minor)
    x = rng.standard_normal(shape[1]).astype(f32)
    check_gemv_vq(run_gemv_vq(emu, blobs, shape, config, x), blobs, shape, config, x)


GEMV_ODD = [
    # bits, dim, group, shape, outliers, warps
    (3, 2, 128, (5, 4200), 7, None),  # 132 chunks: two activation tiles, lanes 0-3 take 5 chunks
    (2, 4, 64, (9, 4099), 0, 2),  # a one-chunk second tile (3 columns: a partial 4-vector); warps=2
    (4, 2, 32, (3, 1100), 5, 1),  # a one-warp block
    (2, 2, 64, (1, 40), 2, None),  # a single row, the second chunk mostly padding
    (2, 4, 128, (70, 20), 0, 3),  # in < 32: one chunk, one group; 3-warp blocks
    (3, 2, 32, (1030, 65), 9, None),  # ≥ 1024 rows: 8-warp blocks of 32 rows, last block 6 rows
    (4, 2, 128, (6, 1), 1, None),  # in = 1: one column of one vector
    # b3d4 stages x in tiles of 64 chunks (its fp16 codebook takes 32 KiB of shared memory)
    (3, 4, 128, (5, 4200), 7, None),  # 132 chunks: tiles of 64, 64 and 4; lanes 0-3 take 3 chunks
    (3, 4, 64, (9, 4099), 0, 2),  # 129 chunks: a one-chunk third tile (3 columns: a partial 4-vector)
    (3, 4, 32, (1030, 65), 9, None),  # 8-warp blocks, last block 6 rows
    (3, 4, 128, (70, 20), 0, 3),  # in < 32: one chunk, one group; 3-warp blocks
    (3, 4, 32, (6, 1), 1, 1),  # in = 1: one column of one vector; a one-warp block
]


@pytest.mark.parametrize("bits,dim,group_size,shape,outliers,warps", GEMV_ODD,
                         ids=[f"b{c[0]}d{c[1]}g{c[2]}-{c[3][0]}x{c[3][1]}" for c in GEMV_ODD])
def test_gemv_vq_odd_shapes(emu, bits, dim, group_size, shape, outliers, warps):
    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    config = vq_config(bits, dim, group_size, outliers)
    blobs = random_vq_blobs(rng, shape, config)
    x = rng.standard_normal(shape[1]).astype(f32)
    check_gemv_vq(run_gemv_vq(emu, blobs, shape, config, x, warps=warps), blobs, shape, config, x)


@pytest.mark.parametrize("bits,dim", VQ_CONFIGS, ids=VQ_IDS)
def test_gemv_vq_residual_in_place_and_padding_indices(emu, bits, dim):
    """y += W·x with the residual as the output array; nonzero padding indices (SPEC §5.1) are ignored;
    8-bit scale codes (m8) run the same kernel."""
    group_size = GROUPS[(bits + dim) % 3]
    shape, config = (21, 101), vq_config(bits, dim, group_size, 4, meta_bits=8)
    rng = np.random.default_rng(5 + bits * dim)
    blobs = random_vq_blobs(rng, shape, config)
    assert blobs["scale_codes"].max() > 63  # the full 8-bit range of codes
    x = rng.standard_normal(shape[1]).astype(f32)
    residual = rng.standard_normal(shape[0]).astype(f32)
    check_gemv_vq(run_gemv_vq(emu, blobs, shape, config, x, residual=residual), blobs, shape, config, x, residual)
    y = residual.copy()
    check_gemv_vq(run_gemv_vq(emu, blobs, shape, config, x, residual=y, y=y), blobs, shape, config, x, residual)
    k, n_vectors = config.index_bits, -(-shape[1] // dim)
    index = unpack_codes(blobs["qweight"], k)
    index[:, n_vectors:] = (1 << k) - 1
    dirty = dict(blobs, qweight=pack_codes(index, k))
    assert np.array_equal(run_gemv_vq(emu, dirty, shape, config, x), run_gemv_vq(emu, blobs, shape, config, x))


def run_dequant_vq(emu, blobs, shape, config, n_rows, row_ids=None, ld=None, threads=128):
    ld = shape[1] if ld is None else ld
    out = np.full((n_rows, ld), np.nan, f32)
    grid, block = dequant_launch(n_rows, threads)
    emu.launch(dequant_vq_name(config.bits, config.dim), grid, block,
               vq_args(blobs) + (row_ids, out, i32(n_rows), i32(shape[0]), i32(shape[1]), i32(ld))
               + vq_tail(blobs, config))
    return out


DEQUANT_SHAPES = [
    # shape, outliers, threads, meta bits
    ((13, 73), 17, 128, 6),
    ((7, 4200), 40, 32, 8),  # 132 chunks: five tiles of 32 chunks, the last one 4 chunks
    ((33, 31), 0, 64, 6),  # in < 32 and odd: a partial vector for both dims
    ((5, 1), 1, 32, 6),  # one column, an outlier on it in one row
]


@pytest.mark.parametrize("minor", LAYOUTS.values(), ids=LAYOUTS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits,dim", VQ_CONFIGS, ids=VQ_IDS)
def test_dequant_vq_is_bit_exact(emu, bits, dim, group_size, minor):
    for shape, outliers, threads, meta_bits in DEQUANT_SHAPES:
        config = vq_config(bits, dim, group_size, outliers, meta_bits)
        blobs = random_vq_blobs(np.random.default_rng(bits * dim + shape[1] + group_size), shape, config, minor)
        want = dequantize(blobs, shape, config)
        ld = shape[1] + 3  # columns past in_features stay untouched
        out = run_dequant_vq(emu, blobs, shape, config, shape[0], ld=ld, threads=threads)
        assert np.array_equal(out[:, :shape[1]].view(np.uint32), want.view(np.uint32)), (shape, outliers)
        assert np.isnan(out[:, shape[1]:]).all()


@pytest.mark.parametrize("bits,dim", VQ_CONFIGS, ids=VQ_IDS)
def test_dequant_vq_gathers_rows(emu, bits, dim):
    """The quantized-embedding path: rows picked by id; ids outside the table give zero rows."""
    shape, config = (40, 101), vq_config(bits, dim, 64, 30)
    blobs = random_vq_blobs(np.random.default_rng(3 + bits * dim), shape, config)
    ids = np.array([7, 0, 39, 7, -1, 40], dtype=np.int32)
    out = run_dequant_vq(emu, blobs, shape, config, ids.size, row_ids=ids, threads=64)
    want = dequantize(blobs, shape, config)[np.clip(ids, 0, shape[0] - 1)]
    want[4:] = 0
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))


# ---- row layouts: whole words (format 1.8) and whole packs (1.6, 1.7) -----------------------------------

LAYOUT_INPUTS = (40, 136, 200, 576)  # odd widths: partial last packs and chunks, odd word counts; 576: V = 144 at dim 4


def test_layout_widths():
    """qweight's width W per layout, the SPEC's example (576-wide rows, dim 4, 12-bit indices: 54 words, were 60),
    and the word-padded rows of LAYOUT_INPUTS that the kernels load one word at a time (B = bits words per chunk
    does not divide W: k = 4, 8 with in % 32 ≠ 0)."""
    config = vq_config(3, 4, 32)
    assert [blob_specs((1, 576), config, minor)["qweight"].shape for minor in LAYOUTS.values()] == [(1, 54), (1, 60)]
    word_loads = {(b, d): [n for n in LAYOUT_INPUTS
                           if blob_specs((1, n), vq_config(b, d, 32))["qweight"].shape[1] % b] for b, d in VQ_CONFIGS}
    assert word_loads == {(2, 2): [40, 136, 200], (3, 2): [], (4, 2): [40, 136, 200], (2, 4): [40, 136, 200],
                          (3, 4): []}


@pytest.mark.parametrize("minor", LAYOUTS.values(), ids=LAYOUTS)
@pytest.mark.parametrize("bits,dim", VQ_CONFIGS, ids=VQ_IDS)
def test_both_row_layouts_match_dequantize(emu, bits, dim, minor):
    """Rows padded to whole words (every (bits, dim) has a partial last pack among these widths) and to whole packs:
    the GEMV within its bound, the dequantization bit-exact, outliers included."""
    partial_packs = 0
    for in_features in LAYOUT_INPUTS:
        shape = (11, in_features)  # 3 warps of 4 rows, the last one 3
        config = vq_config(bits, dim, GROUPS[in_features % 3], 5, meta_bits=8 if in_features % 2 else 6)
        rng = np.random.default_rng(in_features + 10 * bits + dim)
        blobs = random_vq_blobs(rng, shape, config, minor)
        words = blobs["qweight"].shape[1]
        assert words == vq_dims(shape, config, minor)[2] * config.index_bits // 32
        partial_packs += words % config.index_bits != 0
        x = rng.standard_normal(in_features).astype(f32)
        check_gemv_vq(run_gemv_vq(emu, blobs, shape, config, x, warps=3), blobs, shape, config, x)
        out = run_dequant_vq(emu, blobs, shape, config, shape[0], threads=64)
        assert np.array_equal(out.view(np.uint32), dequantize(blobs, shape, config).view(np.uint32)), in_features
    assert (partial_packs > 0) == (minor == WORD_PADDED_VQ_MINOR)


@pytest.mark.parametrize("n_rows", [1, 3])
@pytest.mark.parametrize("bits,dim", VQ_CONFIGS, ids=VQ_IDS)
def test_word_padded_rows_are_read_within_their_words(emu, bits, dim, n_rows):
    """Word-padded rows (partial last chunks for k = 4, 8): qweight exactly (out, W) between the guarded launch's
    poisoned margins (0xA5 bytes), every index in {0 .. 3} and every other codebook point NaN, so that a GEMV chunk
    load past the last row's W words reads poison indices (5, 0xA, 0xA5, …) whose NaN points, times the padding
    columns' zero activations, make the row's y NaN; a vector load of either kernel from a row that starts off its
    alignment (B not dividing W, 3 rows) is a `misaligned address` in the emulator, as on the GPU. Both stay exact."""
    for in_features in LAYOUT_INPUTS[:3]:
        shape = (n_rows, in_features)
        config = vq_config(bits, dim, 32, 2)
        rng = np.random.default_rng(in_features * n_rows + bits * dim)
        blobs = random_vq_blobs(rng, shape, config)
        n_vectors = -(-in_features // dim)
        index = np.zeros((n_rows, vq_dims(shape, config)[2]), np.int64)
        index[:, :n_vectors] = rng.integers(0, 4, (n_rows, n_vectors))
        codebook = np.full((1 << config.index_bits, dim), np.nan, np.float16)
        codebook[:4] = rng.standard_normal((4, dim))
        blobs.update(qweight=pack_codes(index, config.index_bits), codebook=codebook)
        x = rng.standard_normal(in_features).astype(f32)
        check_gemv_vq(run_gemv_vq(emu, blobs, shape, config, x, warps=1), blobs, shape, config, x)
        out = run_dequant_vq(emu, blobs, shape, config, n_rows, threads=32)
        assert np.array_equal(out.view(np.uint32), dequantize(blobs, shape, config).view(np.uint32)), in_features


# ---- b3d4: 12-bit indices into a shared 4096-point codebook -----------------------------------------

def every_point_blobs(rng, shape, config):
    """vq_blobs with the indices replaced by 0, 1, …, 2^k − 1, 0, … in row-major vector order, so that
    every codebook point is read, at every position of a pack (a 12-bit index straddles two words at
    positions 2, 5, 10, 13, …)."""
    blobs = random_vq_blobs(rng, shape, config)
    k, n_vectors = config.index_bits, -(-shape[1] // config.dim)
    index = unpack_codes(blobs["qweight"], k).astype(np.int64)
    index[:, :n_vectors] = np.arange(shape[0] * n_vectors).reshape(shape[0], n_vectors) % (1 << k)
    return dict(blobs, qweight=pack_codes(index, k))


@pytest.mark.parametrize("group_size,meta_bits", [(32, 8), (64, 6), (128, 6)])
def test_b3d4_reads_every_point_at_every_pack_position(emu, group_size, meta_bits):
    """4096 distinct indices, each of the 32 pack positions seen with many of them: dequant bit-exact, the
    GEMV within its bound."""
    shape = (129, 4 * 32 + 4)  # 33 vectors a row (a second pack with one index): 4257 indices
    config = vq_config(3, 4, group_size, 5, meta_bits)
    blobs = every_point_blobs(np.random.default_rng(group_size), shape, config)
    assert len(np.unique(unpack_codes(blobs["qweight"], 12)[:, :33])) == 4096
    want = dequantize(blobs, shape, config)
    out = run_dequant_vq(emu, blobs, shape, config, shape[0], threads=96)
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))
    x = np.random.default_rng(1).standard_normal(shape[1]).astype(f32)
    check_gemv_vq(run_gemv_vq(emu, blobs, shape, config, x), blobs, shape, config, x)


def test_b3d4_tensors_share_one_codebook_array(emu):
    """Two tensors (different shapes, group sizes) given the same codebook array, as the reader gives every
    tensor of a shared codebook a view of the same file bytes: each matches its reference; the codebook is
    only read."""
    book = None
    for shape, group_size in (((40, 300), 64), ((17, 96), 128)):
        config = vq_config(3, 4, group_size, 3)
        blobs = random_vq_blobs(np.random.default_rng(shape[1]), shape, config)
        book = blobs["codebook"] if book is None else book
        blobs["codebook"] = book  # the same array object for both
        before = book.copy()
        x = np.random.default_rng(shape[0]).standard_normal(shape[1]).astype(f32)
        check_gemv_vq(run_gemv_vq(emu, blobs, shape, config, x), blobs, shape, config, x)
        out = run_dequant_vq(emu, blobs, shape, config, shape[0], threads=32)
        assert np.array_equal(out.view(np.uint32), dequantize(blobs, shape, config).view(np.uint32))
        assert np.array_equal(book.view(np.uint16), before.view(np.uint16))


def test_b3d4_codebook_only_2_byte_aligned(emu):
    """The GEMV stages the fp16 codebook with 16-byte loads when it is 16-byte aligned (as the file's and the
    device's are), else with 2-byte loads: same results (unguarded launches keep the misaligned address)."""
    shape, config = (37, 135), vq_config(3, 4, 32, 6)
    blobs = random_vq_blobs(np.random.default_rng(4), shape, config)
    raw = np.zeros(blobs["codebook"].nbytes + 64, np.uint8)
    start = (-raw.ctypes.data) % 16 + 2
    book = raw[start: start + blobs["codebook"].nbytes].view(np.float16).reshape(blobs["codebook"].shape)
    book[...] = blobs["codebook"]
    assert book.ctypes.data % 16 == 2
    x = np.random.default_rng(5).standard_normal(shape[1]).astype(f32)
    want = run_gemv_vq(emu, blobs, shape, config, x)
    y = np.full(shape[0], np.nan, f32)
    grid, block = gemv_launch(shape[0])
    args = vq_args(dict(blobs, codebook=book)) + (x, None, y, i32(shape[0]), i32(shape[1])) + vq_tail(blobs, config)
    emu.launch(gemv_vq_name(3, 4), grid, block, args, guard=False)
    assert np.array_equal(y.view(np.uint32), want.view(np.uint32))

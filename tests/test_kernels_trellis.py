"""The `trellis` CUDA kernels (kernels/gemv_trellis.cu): NVRTC compiles them for every target GPU without
warnings or spills, within 16 KiB of static shared memory, and the same source run on the CPU through the
emulation harness matches format_spec.trellis.dequantize_trellis for every K (bits per weight, 2–5) × group
size × awkward shapes (in = 1, 7, 63, 64, 65, 200; out not a multiple of a block's rows), in both emulator
modes (and, marked `gpu`, on a real GPU through test_kernels_gpu's runner). A row's stream has no padding word
(W = ceil((12 + (in − 1)·K) / 32)), so the GEMV's last chunk of a row may reach past it: the kernels never let
such a read count (the emulator's poisoned margins past the matrix, and a table NaN wherever a stray window
could land, make one visible) nor load a vector off its alignment. (A read past the row whose bits a kernel
then masks off is invisible here; gemv_trellis.cu guards every such word by its index.)

Tolerances (as in test_kernels_vq.py, and why):
  * dequant_trellis_b*_f32: bit-exact (a level is an fp16 widened exactly, times the scale decoded with
    separately rounded fp32 multiply and add: one fp32 rounding, as in the reference).
  * gemv_trellis_b*: against dequantize(blobs) @ x in float64. Per 32-column chunk and row the kernel sums
    level · x in two FMA chains of 16, adds them, and FMAs the scaled sum into the lane's accumulator; a lane
    adds ≤ 3 chunks here (in ≤ 2100), then 5 shuffle levels, and the reference rounds W = scale · level once:
    far fewer than 128 fp32 roundings, so |y − y64| ≤ 2⁻¹⁷·Σ_c |W_rc·x_c|; we also check ≤ 2e-6 · the same,
    as for the other GEMVs. A residual adds one rounding (2⁻²³·|residual|).
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import random_trellis_blobs, trellis_table
from test_kernels_gpu import GpuRunner, _have_gpu
from mxq.format_spec import StorageConfig, blob_specs
from mxq.format_spec.layout import TRELLIS_BITS, trellis_dims
from mxq.format_spec.trellis import dequantize_trellis, pack_windows, trellis_windows
from mxq.kernels import nvrtc
from mxq.kernels.emulator import MODES, Emulator, get_emulator
from mxq.kernels.registry import (TRELLIS_KERNEL_BITS, dequant_launch, dequant_trellis_name, gemv_launch,
                                  gemv_trellis_name, kernels_in)

i32, f32 = np.int32, np.float32
GROUPS = (32, 64, 128)
# (out, in): in = 1 (a one-word row for K ≤ 5), 7, 63, 64, 65 (a one-column last chunk), 200; out not a
# multiple of the 16 rows of a 4-warp block, nor always of a warp's 4 rows
AWKWARD = ((5, 1), (9, 7), (6, 63), (3, 64), (13, 65), (37, 200))
GEMV_SMEM = 64 * 32 * 4 + 4096 * 2  # an x tile of 64 chunks and the fp16 table
STATIC_SMEM_LIMIT = 48 * 1024


@pytest.fixture(scope="module", params=MODES)
def emu(request):
    return Emulator(get_emulator().path, mode=request.param)


def test_trellis_kernel_bits_are_the_formats():
    """One kernel pair per K the format accepts; a trellis tensor's blobs are the kernels' pointer arguments."""
    assert TRELLIS_KERNEL_BITS == TRELLIS_BITS == (2, 3, 4, 5)
    assert kernels_in("gemv_trellis.cu") == [name for b in TRELLIS_BITS
                                             for name in (gemv_trellis_name(b), dequant_trellis_name(b))]
    config = StorageConfig.trellis(4, 64)
    assert list(blob_specs((8, 65), config)) == ["qweight", "scale_codes", "scale_meta"]  # + the file's table
    assert blob_specs((8, 65), config)["qweight"].shape == (8, trellis_dims((8, 65), config)[2]) == (8, 9)


@pytest.mark.parametrize("arch", nvrtc.ARCHS)
def test_nvrtc_compiles_the_trellis_kernels_for(arch):
    result = nvrtc.compile_source("gemv_trellis.cu", arch)
    assert result.ok, result.log
    assert "warning" not in result.log.lower(), result.log
    assert sorted(result.entries) == sorted(kernels_in("gemv_trellis.cu"))
    assert len(result.entries) == 2 * len(TRELLIS_BITS)


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="ptxas (CUDA toolkit) not on PATH")
def test_no_trellis_kernel_spills():
    """No spills or local memory on any target (K = 5 gets 2 blocks per SM's registers, the others 3); the GEMV's
    static shared memory is the x tile and the fp16 table, 16 KiB; the dequant stages nothing."""
    import kernel_report
    for arch in nvrtc.ARCHS:
        usage = kernel_report.usage("gemv_trellis.cu", arch, "ptxas")
        assert sorted(usage) == sorted(kernels_in("gemv_trellis.cu"))
        for name, u in usage.items():
            assert u["spill_stores"] == u["spill_loads"] == 0, f"{name} spills on {arch}: {u}"
            assert u["stack"] == 0, f"{name} uses local memory on {arch}: {u}"
            assert u["smem"] == (GEMV_SMEM if name.startswith("gemv") else 0) < STATIC_SMEM_LIMIT, (name, arch, u)


def trellis_args(blobs):
    return blobs["qweight"], blobs["codebook"], blobs["scale_codes"], blobs["scale_meta"]


def trellis_tail(blobs, config):
    """The kernels' last arguments: words_per_row (qweight's width) and group_size."""
    return i32(blobs["qweight"].shape[1]), i32(config.group_size)


def run_gemv(emu, blobs, shape, config, x, residual=None, y=None, warps=None, guard=None):
    out_features, in_features = shape
    y = np.full(out_features, np.nan, f32) if y is None else y
    grid, block = gemv_launch(out_features, warps)
    emu.launch(gemv_trellis_name(config.bits), grid, block,
               trellis_args(blobs) + (x, residual, y, i32(out_features), i32(in_features))
               + trellis_tail(blobs, config), **({} if guard is None else {"guard": guard}))
    return y


def check_gemv(y, blobs, shape, config, x, residual=None):
    weight = dequantize_trellis(blobs, shape, config).astype(np.float64)
    magnitude = np.abs(weight) @ np.abs(x.astype(np.float64))  # Σ |W·x|
    want = weight @ x.astype(np.float64)
    extra = 0.0
    if residual is not None:
        want += residual
        extra = np.abs(residual) * 2.0 ** -23
    err = np.abs(y.astype(np.float64) - want)
    assert np.all(np.isfinite(y))
    assert np.all(err <= 2.0 ** -17 * magnitude + extra), f"max err {err.max():.3g}"
    assert np.all(err <= 2e-6 * magnitude + extra)


def run_dequant(emu, blobs, shape, config, n_rows, row_ids=None, ld=None, threads=128):
    ld = shape[1] if ld is None else ld
    out = np.full((n_rows, ld), np.nan, f32)
    grid, block = dequant_launch(n_rows, threads)
    emu.launch(dequant_trellis_name(config.bits), grid, block,
               trellis_args(blobs) + (row_ids, out, i32(n_rows), i32(shape[0]), i32(shape[1]), i32(ld))
               + trellis_tail(blobs, config))
    return out


def same_bits(a, b) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", TRELLIS_BITS)
def test_kernels_match_dequantize(emu, bits, group_size):
    """Every awkward shape: the GEMV within its bound; the dequantization bit-exact, of all rows (columns past
    in_features untouched) and of rows picked by id (ids outside the matrix: zero rows)."""
    for i, shape in enumerate(AWKWARD):
        config = StorageConfig.trellis(bits, group_size, meta_bits=(6, 8)[i % 2])
        rng = np.random.default_rng(100 * bits + group_size + shape[1])
        blobs = random_trellis_blobs(rng, shape, config)
        want = dequantize_trellis(blobs, shape, config)
        x = rng.standard_normal(shape[1]).astype(f32)
        check_gemv(run_gemv(emu, blobs, shape, config, x), blobs, shape, config, x)
        ld = shape[1] + 3
        out = run_dequant(emu, blobs, shape, config, shape[0], ld=ld, threads=(32, 64, 128)[i % 3])
        assert same_bits(out[:, :shape[1]], want), shape
        assert np.isnan(out[:, shape[1]:]).all()
        ids = np.array([shape[0] - 1, 0, -1, shape[0], shape[0] // 2], np.int32)
        out = run_dequant(emu, blobs, shape, config, ids.size, row_ids=ids, threads=32)
        gathered = want[np.clip(ids, 0, shape[0] - 1)]
        gathered[2:4] = 0
        assert same_bits(out, gathered), shape


GEMV_ODD = [
    # bits, group, shape, warps
    (3, 128, (5, 2100), None),  # 66 chunks: x tiles of 64 and 2 chunks; lanes 0, 1 take 3 chunks
    (5, 64, (9, 2049), 2),  # a one-chunk second tile with one column; 2-warp blocks
    (2, 32, (3, 300), 1),  # a one-warp block
    (4, 128, (1030, 33), None),  # ≥ 1024 rows: 8-warp blocks of 32 rows, the last block 6 rows
    (4, 32, (70, 20), 3),  # in < 32: one chunk, one group; 3-warp blocks
]


@pytest.mark.parametrize("bits,group_size,shape,warps", GEMV_ODD,
                         ids=[f"t{c[0]}g{c[1]}-{c[2][0]}x{c[2][1]}" for c in GEMV_ODD])
def test_gemv_odd_launches(bits, group_size, shape, warps):
    """Several x tiles, 1–8 warps per block (fibers: the 1030-row launch is too slow with a thread each)."""
    emu = Emulator(get_emulator().path, mode="fibers")
    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    config = StorageConfig.trellis(bits, group_size)
    blobs = random_trellis_blobs(rng, shape, config)
    x = rng.standard_normal(shape[1]).astype(f32)
    check_gemv(run_gemv(emu, blobs, shape, config, x, warps=warps), blobs, shape, config, x)


@pytest.mark.parametrize("bits", TRELLIS_BITS)
def test_gemv_residual_in_place(emu, bits):
    """y = W·x + residual, also with the residual as the output array."""
    shape, config = (21, 101), StorageConfig.trellis(bits, GROUPS[bits % 3], meta_bits=8)
    rng = np.random.default_rng(5 + bits)
    blobs = random_trellis_blobs(rng, shape, config)
    assert blobs["scale_codes"].max() > 63  # the full 8-bit range of codes
    x = rng.standard_normal(shape[1]).astype(f32)
    residual = rng.standard_normal(shape[0]).astype(f32)
    check_gemv(run_gemv(emu, blobs, shape, config, x, residual=residual), blobs, shape, config, x, residual)
    y = residual.copy()
    check_gemv(run_gemv(emu, blobs, shape, config, x, residual=y, y=y), blobs, shape, config, x, residual)


def block_walks(rng, shape, bits):
    """(out, in) windows of walks whose K-bit steps are all 0s or all 1s, from window 0: the windows of such
    a stream, zero bits past its end included, are few (e.g. 8 for K = 4), and almost no other bits — the
    0xA5 poison past a guarded array, a neighbouring row's stream read at the wrong offset — form one."""
    windows = np.zeros(shape, np.int64)
    heads = rng.integers(0, 2, shape) * ((1 << bits) - 1) << (12 - bits)
    for c in range(1, shape[1]):
        windows[:, c] = (windows[:, c - 1] >> bits) | heads[:, c]
    return windows


def reachable_windows(qweight, in_features, bits):
    """Every window a kernel may read from these rows: those of every column of the rows' whole 32-column
    chunks (padding columns included), the stream continued with zero bits."""
    padded_in = -(-in_features // 32) * 32
    words = np.zeros((qweight.shape[0], padded_in * bits // 32 + 2), np.uint32)  # ≥ W + 1 words
    words[:, :qweight.shape[1]] = qweight
    return np.unique(trellis_windows(words, padded_in, bits))


@pytest.mark.parametrize("n_rows", [1, 3])
@pytest.mark.parametrize("bits", TRELLIS_BITS)
def test_rows_are_read_within_their_words(emu, bits, n_rows):
    """qweight exactly (out, W) between the guarded launch's poisoned margins (0xA5 bytes), the rows' streams
    made of all-0 / all-1 steps, and every table level NaN but those of the windows a kernel reading only the
    rows' words (and zeros past them) can see: a GEMV chunk load past a row's W words, or a window taken at the
    wrong bit, reads a NaN level, which even times a padding column's zero activation makes the row's y NaN;
    the dequantization would write a NaN. Both stay exact."""
    for in_features in (1, 7, 63, 64, 65, 200):
        shape = (n_rows, in_features)
        config = StorageConfig.trellis(bits, GROUPS[in_features % 3])
        rng = np.random.default_rng(in_features * n_rows + bits)
        blobs = random_trellis_blobs(rng, shape, config)
        qweight = pack_windows(block_walks(rng, shape, bits), bits)
        table = np.full((4096, 1), np.nan, np.float16)
        reachable = reachable_windows(qweight, in_features, bits)
        assert reachable.size <= 64
        table[reachable, 0] = rng.standard_normal(reachable.size)
        blobs.update(qweight=qweight, codebook=table)
        x = rng.standard_normal(in_features).astype(f32)
        check_gemv(run_gemv(emu, blobs, shape, config, x, warps=1), blobs, shape, config, x)
        out = run_dequant(emu, blobs, shape, config, n_rows, threads=32)
        assert same_bits(out, dequantize_trellis(blobs, shape, config)), in_features


def test_every_level(emu):
    """Rows whose windows run through almost all 4096 levels, at every position of a chunk (K = 5: a window
    straddles two words at 12 of the 32): dequant bit-exact, the GEMV within its bound."""
    shape, config = (16, 1100), StorageConfig.trellis(5, 64)
    rng = np.random.default_rng(11)
    blobs = random_trellis_blobs(rng, shape, config)
    assert np.unique(trellis_windows(blobs["qweight"], shape[1], 5)).size > 4000
    out = run_dequant(emu, blobs, shape, config, shape[0], threads=128)
    assert same_bits(out, dequantize_trellis(blobs, shape, config))
    x = rng.standard_normal(shape[1]).astype(f32)
    check_gemv(run_gemv(emu, blobs, shape, config, x), blobs, shape, config, x)


def test_tensors_share_one_table_array(emu):
    """Tensors of one K (different shapes, group sizes) given the same table array, as the reader gives each a
    view of the file's table: each matches its reference; the table is only read."""
    table = trellis_table(3)
    before = table.copy()
    for shape, group_size in (((40, 300), 64), ((17, 96), 128)):
        config = StorageConfig.trellis(3, group_size)
        blobs = dict(random_trellis_blobs(np.random.default_rng(shape[1]), shape, config), codebook=table)
        x = np.random.default_rng(shape[0]).standard_normal(shape[1]).astype(f32)
        check_gemv(run_gemv(emu, blobs, shape, config, x), blobs, shape, config, x)
        out = run_dequant(emu, blobs, shape, config, shape[0], threads=32)
        assert same_bits(out, dequantize_trellis(blobs, shape, config))
    assert np.array_equal(table.view(np.uint16), before.view(np.uint16))


def test_table_only_2_byte_aligned(emu):
    """The GEMV stages the table with 16-byte loads when it is 16-byte aligned (as the file's and the device's
    are), else with 2-byte loads: same results (unguarded launches keep the misaligned address)."""
    shape, config = (37, 135), StorageConfig.trellis(4, 32)
    blobs = random_trellis_blobs(np.random.default_rng(4), shape, config)
    raw = np.zeros(blobs["codebook"].nbytes + 64, np.uint8)
    start = (-raw.ctypes.data) % 16 + 2
    table = raw[start: start + blobs["codebook"].nbytes].view(np.float16).reshape(blobs["codebook"].shape)
    table[...] = blobs["codebook"]
    assert table.ctypes.data % 16 == 2
    x = np.random.default_rng(5).standard_normal(shape[1]).astype(f32)
    want = run_gemv(emu, blobs, shape, config, x)
    y = run_gemv(emu, dict(blobs, codebook=table), shape, config, x, guard=False)
    assert same_bits(y, want)


@pytest.mark.gpu
@pytest.mark.skipif(not _have_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", TRELLIS_BITS)
def test_kernels_on_a_gpu(bits):
    """The awkward shapes, every group size, and the fused residual, with the same checks on the device."""
    gpu = GpuRunner()
    for group_size in GROUPS:
        test_kernels_match_dequantize(gpu, bits, group_size)
    test_gemv_residual_in_place(gpu, bits)

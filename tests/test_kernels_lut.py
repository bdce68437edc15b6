"""The `lut` CUDA kernels (kernels/gemv_lut.cu): NVRTC compiles them for every target GPU without
spills, and the same source run on the CPU through the emulation harness matches
format_spec.lut.dequantize_lut for every bit width × odd shapes × codebooks per 1/4/32 channels, with
and without outliers, in both emulator modes.

Tolerances (as in test_kernels.py, and why):
  * dequant_lut_b*_f32: bit-exact (a level is an fp16 widened exactly; an outlier is one fp32 add).
  * gemv_lut_b*: against dequantize(blobs) @ x in float64. The kernel sums each 32-code pack in two
    FMA chains of 16, adds ≤ 64 pack sums per lane, then 5 shuffle levels: a chain of ≤ 128 fp32
    roundings, so |y − y64| ≤ 2⁻¹⁷·(Σ_c |level_rc·x_c| + Σ_outliers |v·x_c|); we also check
    ≤ 2e-6·Σ_c |level_rc·x_c| (+ outliers), as for gemv_affine.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import random_lut_blobs
from mxq.format_spec import StorageConfig, dequantize, unpack_codes
from mxq.format_spec.affine import csr_entries
from mxq.kernels import nvrtc
from mxq.kernels.emulator import MODES, Emulator, get_emulator
from mxq.kernels.registry import (LUT_BITS, dequant_launch, dequant_lut_name, gemv_launch, gemv_lut_name,
                                  kernels_in)

i32, f32 = np.int32, np.float32


@pytest.fixture(scope="module", params=MODES)
def emu(request):
    return Emulator(get_emulator().path, mode=request.param)


@pytest.mark.parametrize("arch", nvrtc.ARCHS)
def test_nvrtc_compiles_the_lut_kernels_for(arch):
    result = nvrtc.compile_source("gemv_lut.cu", arch)
    assert result.ok, result.log
    assert "warning" not in result.log.lower(), result.log
    assert sorted(result.entries) == sorted(kernels_in("gemv_lut.cu"))
    assert len(result.entries) == 2 * len(LUT_BITS)


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="ptxas (CUDA toolkit) not on PATH")
def test_no_lut_kernel_spills():
    import kernel_report
    for arch in nvrtc.ARCHS:
        for name, u in kernel_report.usage("gemv_lut.cu", arch, "ptxas").items():
            assert u["spill_stores"] == u["spill_loads"] == 0, f"{name} spills on {arch}: {u}"
            assert u["stack"] == 0, f"{name} uses local memory on {arch}: {u}"


def lut_args(blobs):
    return (blobs["qweight"], blobs["codebook"], blobs.get("outlier_row_ptr"), blobs.get("outlier_cols"),
            blobs.get("outlier_values"))


def run_gemv_lut(emu, blobs, shape, config, x, residual=None, y=None, warps=None):
    out_features, in_features = shape
    y = np.full(out_features, np.nan, f32) if y is None else y
    grid, block = gemv_launch(out_features, warps)
    emu.launch(gemv_lut_name(config.bits), grid, block,
               lut_args(blobs) + (x, residual, y, i32(out_features), i32(in_features), i32(config.codebook_rows)))
    return y


def check_gemv_lut(y, blobs, shape, config, x, residual=None):
    out_features, in_features = shape
    ax = np.abs(x.astype(np.float64))
    codes = unpack_codes(blobs["qweight"], config.bits)[:, :in_features].astype(np.intp)
    books = blobs["codebook"].astype(np.float64)[np.arange(out_features) // config.codebook_rows]
    magnitude = np.abs(np.take_along_axis(books, codes, 1)) @ ax  # Σ |level·x|
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


@pytest.mark.parametrize("outliers", [0, 23], ids=["plain", "outliers"])
@pytest.mark.parametrize("codebook_rows", [1, 4, 32])
@pytest.mark.parametrize("bits", LUT_BITS)
def test_gemv_lut_matches_dequantize(emu, bits, codebook_rows, outliers):
    shape = (37, 2 * 32 + 7)  # a padded last pack; 37 rows = 2 blocks of 16 + 5
    rng = np.random.default_rng(bits * 1000 + codebook_rows + outliers)
    config = StorageConfig.lut(bits, codebook_rows, outliers)
    blobs = random_lut_blobs(rng, shape, config)
    x = rng.standard_normal(shape[1]).astype(f32)
    check_gemv_lut(run_gemv_lut(emu, blobs, shape, config, x), blobs, shape, config, x)


@pytest.mark.parametrize("bits,codebook_rows,shape,outliers,warps", [
    (3, 1, (5, 4200), 7, None),  # 132 packs: two activation tiles
    (4, 2, (9, 4099), 0, 2),  # a one-pack second tile; warps=2
    (6, 8, (3, 1100), 5, 1),  # lanes 0-3 take two packs; a one-warp block
    (2, 16, (1, 40), 2, None),  # a single row, the second pack mostly padding
    (8, 4, (70, 20), 0, 3),  # in < 32: one pack; 3-warp blocks; 8-bit: 32 KiB of levels per block
    (5, 32, (1030, 65), 9, None),  # ≥ 1024 rows: 8-warp blocks of 32 rows, last block 6 rows
    (8, 1, (1030, 33), 3, None),  # 8-bit with 32 rows per block: the largest shared-memory use
])
def test_gemv_lut_odd_shapes(emu, bits, codebook_rows, shape, outliers, warps):
    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    config = StorageConfig.lut(bits, codebook_rows, outliers)
    blobs = random_lut_blobs(rng, shape, config)
    x = rng.standard_normal(shape[1]).astype(f32)
    check_gemv_lut(run_gemv_lut(emu, blobs, shape, config, x, warps=warps), blobs, shape, config, x)


def test_gemv_lut_residual_in_place_and_padding_codes(emu):
    """y += W·x with the residual as the output array; nonzero padding codes (SPEC §5.1) are ignored."""
    from mxq.format_spec import pack_codes

    shape, config = (21, 100), StorageConfig.lut(3, 2, 4)
    rng = np.random.default_rng(5)
    blobs = random_lut_blobs(rng, shape, config)
    x = rng.standard_normal(shape[1]).astype(f32)
    residual = rng.standard_normal(shape[0]).astype(f32)
    check_gemv_lut(run_gemv_lut(emu, blobs, shape, config, x, residual=residual), blobs, shape, config, x, residual)
    y = residual.copy()
    check_gemv_lut(run_gemv_lut(emu, blobs, shape, config, x, residual=y, y=y), blobs, shape, config, x, residual)
    codes = unpack_codes(blobs["qweight"], 3)
    codes[:, shape[1]:] = 7
    dirty = dict(blobs, qweight=pack_codes(codes, 3))
    assert np.array_equal(run_gemv_lut(emu, dirty, shape, config, x), run_gemv_lut(emu, blobs, shape, config, x))


@pytest.mark.parametrize("bits", LUT_BITS)
def test_dequant_lut_is_bit_exact(emu, bits):
    for shape, codebook_rows, outliers, threads in (((13, 73), 1, 17, 128), ((7, 4200), 4, 40, 32),
                                                   ((33, 31), 32, 0, 64)):
        config = StorageConfig.lut(bits, codebook_rows, outliers)
        blobs = random_lut_blobs(np.random.default_rng(bits + shape[1]), shape, config)
        want = dequantize(blobs, shape, config)
        ld = shape[1] + 3  # columns past in_features stay untouched
        out = np.full((shape[0], ld), np.nan, f32)
        grid, block = dequant_launch(shape[0], threads)
        emu.launch(dequant_lut_name(bits), grid, block,
                   lut_args(blobs) + (None, out, i32(shape[0]), i32(shape[0]), i32(shape[1]), i32(ld),
                                      i32(codebook_rows)))
        assert np.array_equal(out[:, :shape[1]].view(np.uint32), want.view(np.uint32))
        assert np.isnan(out[:, shape[1]:]).all()


def test_dequant_lut_gathers_rows(emu):
    """The quantized-embedding path: rows picked by id; ids outside the table give zero rows."""
    shape, config = (40, 96), StorageConfig.lut(4, 4, 30)
    blobs = random_lut_blobs(np.random.default_rng(3), shape, config)
    ids = np.array([7, 0, 39, 7, -1, 40], dtype=np.int32)
    out = np.full((ids.size, shape[1]), np.nan, f32)
    grid, block = dequant_launch(ids.size, threads=64)
    emu.launch(dequant_lut_name(4), grid, block,
               lut_args(blobs) + (ids, out, i32(ids.size), i32(shape[0]), i32(shape[1]), i32(shape[1]), i32(4)))
    want = dequantize(blobs, shape, config)[np.clip(ids, 0, shape[0] - 1)]
    want[4:] = 0
    assert np.array_equal(out, want)

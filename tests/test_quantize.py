import itertools

import numpy as np
import pytest
import torch

from mxq.converter.quantize import quantize
from mxq.format_spec import (GROUP_SIZES, SUPPORTED_BITS, StorageConfig, blob_specs, dequantize, loaded_blobs,
                             stored_blobs, unpack_codes)


def _weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[:: 97] *= 12  # a few large weights
    return w


@pytest.mark.parametrize("bits,group", list(itertools.product(SUPPORTED_BITS, GROUP_SIZES)))
@pytest.mark.parametrize("quantizer", ["hqq", "rtn", "wls"])
def test_reported_error_is_the_error_of_the_stored_bytes(bits, group, quantizer):
    shape = (37, 200)  # 200 is not a multiple of any group size: the last group is padded
    weight = _weight(shape, bits * group)
    config = StorageConfig.affine(bits, group, outliers=11 if bits < 5 else 0)
    result = quantize(weight, config, quantizer)
    specs, stored = blob_specs(shape, config), stored_blobs(result.blobs, shape, config)
    assert {k: (v.dtype.name, v.shape) for k, v in stored.items()} == {k: (s.dtype, s.shape) for k, s in specs.items()}
    assert all(np.array_equal(v, result.blobs[k]) for k, v in loaded_blobs(stored, shape, config).items())
    restored = torch.from_numpy(dequantize(result.blobs, shape, config))
    assert float(((restored - weight).double() ** 2).sum()) == pytest.approx(result.error_sq, rel=1e-6)
    codes = unpack_codes(result.blobs["qweight"], bits)
    assert (codes[:, 200:] == 0).all()  # padding codes are 0 (SPEC §5.1)
    assert quantize(weight, config, quantizer, pack=False).error_sq == pytest.approx(result.error_sq, rel=1e-12)


def test_more_bits_and_smaller_groups_mean_less_error():
    weight = _weight((64, 256))
    errors = {(b, g): quantize(weight, StorageConfig.affine(b, g), "hqq").error_sq
              for b in SUPPORTED_BITS for g in GROUP_SIZES}
    for g in GROUP_SIZES:
        series = [errors[(b, g)] for b in SUPPORTED_BITS]
        assert series == sorted(series, reverse=True)
    for b in SUPPORTED_BITS:
        assert errors[(b, 32)] < errors[(b, 128)]


def test_hqq_beats_rtn_on_average():
    weight = _weight((128, 256), 7)
    for bits in (2, 3, 4):
        config = StorageConfig.affine(bits, 64)
        assert quantize(weight, config, "hqq").error_sq < quantize(weight, config, "rtn").error_sq


def test_outliers_remove_the_largest_errors():
    weight = _weight((64, 256), 9)
    plain = quantize(weight, StorageConfig.affine(3, 64), "hqq").error_sq
    with_outliers = quantize(weight, StorageConfig.affine(3, 64, 200), "hqq").error_sq
    assert with_outliers < 0.8 * plain


def test_constant_and_zero_rows_quantize_exactly():
    weight = torch.zeros(4, 64)
    weight[1] = 0.5
    result = quantize(weight, StorageConfig.affine(4, 32), "hqq")
    restored = dequantize(result.blobs, (4, 64), StorageConfig.affine(4, 32))
    assert np.abs(restored - weight.numpy()).max() < 1e-3

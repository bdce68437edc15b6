"""The kernel tests of test_kernels.py again, on a real GPU (marked `gpu`; skipped without one).

The kernels are loaded with kernels/nvrtc.py's load_module() (NVRTC → CUBIN for the device →
cupy.RawModule), and a small runner with the emulator's launch(name, grid, block, args) interface
uploads the NumPy arguments, launches, and copies written arrays back, so every check and
tolerance is literally the emulated one.
"""
from __future__ import annotations

import numpy as np
import pytest

import test_kernels as K
from mxq.kernels.registry import AFFINE_CONFIGS, KERNELS


def _have_gpu() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, or no device
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _have_gpu(), reason="needs a CUDA GPU")]


class GpuRunner:
    """launch(name, grid, block, args) on the device, with NumPy arrays in and out."""

    def __init__(self, via: str = "cubin"):
        import cupy

        from mxq.kernels import nvrtc
        self.cupy = cupy
        self.module = nvrtc.load_module(via=via)

    def signature(self, name):
        return list(KERNELS[name].arg_types)

    def names(self):
        return list(KERNELS)

    def launch(self, name, grid, block, args):
        cp = self.cupy
        types = KERNELS[name].arg_types
        assert len(args) == len(types), f"{name} takes {len(types)} arguments"
        device, written = {}, []
        dev_args = []
        for value, t in zip(args, types):
            if value is None:
                dev_args.append(np.uint64(0))  # NULL (a pointer-sized zero)
            elif isinstance(value, np.ndarray):
                key = (value.__array_interface__["data"][0], value.nbytes)
                if key not in device:
                    device[key] = cp.asarray(value)
                    if not t.startswith("const"):
                        written.append((value, device[key]))
                dev_args.append(device[key])
            else:
                dev_args.append(value)
        grid = tuple(grid) if not isinstance(grid, int) else (grid,)
        block = tuple(block) if not isinstance(block, int) else (block,)
        self.module.get_function(name)(grid, block, tuple(dev_args))
        cp.cuda.runtime.deviceSynchronize()
        for host, dev in written:
            host[...] = dev.get()


@pytest.fixture(scope="module")
def gpu():
    return GpuRunner()


@pytest.fixture(scope="module")
def ref():
    from mxq.runtime.backends.numpy_backend import NumpyBackend
    return NumpyBackend()


@pytest.mark.parametrize("outliers", [0, 23], ids=["plain", "outliers"])
@pytest.mark.parametrize("bits,group_size", AFFINE_CONFIGS, ids=[f"b{b}g{g}" for b, g in AFFINE_CONFIGS])
def test_gpu_gemv(gpu, bits, group_size, outliers):
    K.test_gemv_matches_dequantize(gpu, bits, group_size, outliers)


@pytest.mark.parametrize("outliers", [0, 17], ids=["plain", "outliers"])
@pytest.mark.parametrize("bits,group_size", AFFINE_CONFIGS, ids=[f"b{b}g{g}" for b, g in AFFINE_CONFIGS])
def test_gpu_dequant_is_bit_exact(gpu, bits, group_size, outliers):
    K.test_dequant_is_bit_exact(gpu, bits, group_size, outliers)


def test_gpu_gemv_large(gpu):
    from conftest import random_affine_blobs
    from mxq.format_spec import StorageConfig
    for bits in (2, 3, 4, 8):
        shape, config = (4096, 4096 + 64), StorageConfig.affine(bits, 128, 500)
        rng = np.random.default_rng(bits)
        blobs = random_affine_blobs(rng, shape, config)
        x = rng.standard_normal(shape[1]).astype(np.float32)
        K.check_gemv(K.run_gemv(gpu, blobs, shape, config, x), blobs, shape, config, x)


def test_gpu_ops(gpu, ref):
    for case in [(3, 96, 256), (2, 577, 64)]:
        K.test_rmsnorm(gpu, ref, *case)
    for case in [(3, 2, 128), (1, 5, 256)]:
        K.test_rmsnorm_per_head(gpu, *case)
    for case in K.ROPE_CASES:
        K.test_rope(gpu, *case)
    K.test_rope_matches_numpy_backend(gpu, ref)
    for kv in ("f16", "f32"):
        for case in K.ATTENTION_CASES:
            K.test_kv_store_and_attention(gpu, kv, *case)
    K.test_attention_matches_numpy_backend(gpu, ref)
    K.test_attention_softmax_is_safe_for_large_scores(gpu)
    K.test_silu_mul(gpu, ref)
    K.test_gelu_mul(gpu)
    K.test_scale(gpu)
    K.test_embedding_f16(gpu)
    K.test_add(gpu)
    K.test_dequant_gathers_rows(gpu, "f32")
    K.test_dequant_gathers_rows(gpu, "f16")


def test_gpu_source_loader(ref):
    """cupy.RawModule(code=..., name_expressions=...) compiles the same sources on the device."""
    K.test_rmsnorm(GpuRunner(via="source"), ref, 3, 96, 256)

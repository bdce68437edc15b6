"""Kernel stacks (runtime/backends/cpu_stack.py): several affine matrices — plain ones and `rows` matrices of
mixed configs — multiplied by one input in one compiled call (through their tiles, cpu_tiles.py), against the
NumPy reference path on the same rounded x̂ (ahead-of-time and JIT kernels); the x roundings of the row kernel
(round_x + layout_x) and of the tiles (tile_x) against the one-pass NumPy rounding; members the kernels cannot stack fall back to one-by-one products.
Tolerances: test_cpu_kernels.py's (fastmath sums in another order, plus two rounding steps of x̂).
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import random_affine_blobs
from mxq.format_spec import StorageConfig, dequantize, join_blocks
from mxq.runtime.backends import cpu_weights
from mxq.runtime.backends.cpu_stack import KernelStack
from mxq.runtime.backends.cpu_weights import KERNEL_MAX_TOKENS, STACK_MAX_TOKENS
from mxq.runtime.backends.row_blocks import RowBlocks
from test_cpu_kernels import _Entry, assert_close, backends, quantized_input  # noqa: F401 - the fixture

pytest.importorskip("numba")
parse = StorageConfig.parse
CONFIGS = [(bits, group) for bits in (2, 3, 4, 5, 6, 8) for group in (32, 64, 128)]


def random_blobs(rng, shape, config):
    """Random blobs of an affine matrix, or of a vq one with its codebook on the 8-bit grid (the stack kernels take
    both: cpu_stack.stackable)."""
    if config.scheme == "vq":
        from test_cpu_vq import grid_blobs

        return grid_blobs(rng, shape, config)
    return random_affine_blobs(rng, shape, config)


def rows_blobs(rng, shape, config):
    """A rows tensor of affine and vq grid blocks with random content and row order; and its dense W (logical
    rows)."""
    blocks = [random_blobs(rng, (count, shape[1]), block) for count, block in config.blocks]
    order = rng.permutation(shape[0])
    weight = np.empty(shape, np.float32)
    weight[order] = np.concatenate([dequantize(b, (count, shape[1]), block)
                                    for b, (count, block) in zip(blocks, config.blocks)])
    return join_blocks(order, blocks), weight


def members(rng, in_features, labels):
    """[(name, shape, config, blobs, dense W)] for labels 'b4g64+o3' (affine), 'v3d4g32s' (vq on the grid) or
    'rows(...)'."""
    out = []
    for i, label in enumerate(labels):
        config = parse(label)
        out_features = sum(config.row_counts) if config.scheme == "rows" else 7 + 13 * i
        shape = (out_features, in_features)
        if config.scheme == "rows":
            blobs, dense = rows_blobs(rng, shape, config)
        else:
            blobs = random_blobs(rng, shape, config)
            dense = dequantize(blobs, shape, config)
        out.append((f"m{i}", shape, config, blobs, dense))
    return out


def check_stack(fast, ref, rng, in_features, labels, tokens=(1, 3)):
    parts = members(rng, in_features, labels)
    w_fast = [fast.prepare(_Entry(n, s, c), b) for n, s, c, b, _ in parts]
    w_ref = [ref.prepare(_Entry(n, s, c), b) for n, s, c, b, _ in parts]
    dense = np.concatenate([d for *_, d in parts])
    assert fast.stack(tuple(w_fast), 1) is not None
    for T in tokens:
        x = rng.standard_normal((T, in_features)).astype(np.float32)
        x_hat, slack = quantized_input(x, dense)
        biases = [rng.standard_normal(s[0]).astype(np.float32) if i % 2 else None for i, (_, s, *_) in enumerate(parts)]
        got = fast.linears(x, w_fast, biases)
        want = ref.linears(x_hat, w_ref, biases)
        assert len(got) == len(parts)
        for y, y_ref in zip(got, want):
            assert_close(np.ascontiguousarray(y), y_ref, slack)
        for w_f, w_r, (_, shape, *_) in zip(w_fast, w_ref, parts):  # one matrix alone, bias and residual fused
            bias = rng.standard_normal(shape[0]).astype(np.float32)
            residual = rng.standard_normal((T, shape[0])).astype(np.float32)
            assert_close(fast.linear(x, w_f, bias, residual.copy()), ref.linear(x_hat, w_r, bias, residual.copy()), slack)


@pytest.mark.parametrize("bits,group", CONFIGS)
def test_every_config_in_a_stack_matches_numpy_path(backends, bits, group):
    fast, ref = backends
    rng = np.random.default_rng(10 * bits + group)
    other = (4, 64) if (bits, group) != (4, 64) else (3, 32)
    labels = [f"b{bits}g{group}+o5", f"rows(5:b{bits}g{group},9:b{other[0]}g{other[1]}+o2)", f"b{other[0]}g{other[1]}"]
    check_stack(fast, ref, rng, 333, labels)  # 333: a padded last group for every group size


def test_rows_matrices_of_mixed_configs_match_numpy_path(backends):
    fast, ref = backends
    rng = np.random.default_rng(7)
    check_stack(fast, ref, rng, 576, ["rows(3:b2g32,40:b8g128+o9,1:b5g64,20:b3g128)",
                                      "rows(16:b6g32+o1,16:b4g32)"], tokens=(1, 2, 5))
    check_stack(fast, ref, rng, 31, ["rows(1:b4g32,2:b2g128)", "b8g32+o3"])  # narrower than one block


GRID_STACK = ["v3d4g32s+o4", "rows(5:b4g32,9:v3d4g64s+o2,7:v2d4g128,3:b2g64+o1,2:v3d4g128m6s)", "b5g64", "v2d4g64m8"]


@pytest.mark.parametrize("in_features", [40, 333, 576])
def test_vq_grid_pieces_stack_with_affine_ones(backends, in_features):
    """vq matrices and blocks whose codebooks lie on the 8-bit grid (12- and 8-bit indices, groups of 32-128, 6- and
    8-bit scales, outliers) are stack entries of their own kind beside affine ones: the stack's products of 1-16
    tokens (decode, and the most the vq kernels take) match the NumPy path on the same x̂, bias and residual fused,
    576 inputs a 12-bit row ending in a partial pack."""
    from mxq.runtime.backends.cpu_stack import KIND, KIND_AFFINE, KIND_VQ_GRID

    fast, ref = backends
    rng = np.random.default_rng(in_features)
    check_stack(fast, ref, rng, in_features, GRID_STACK, tokens=(1, 3, KERNEL_MAX_TOKENS))
    parts = members(rng, in_features, GRID_STACK)
    stack = fast.stack(tuple(fast.prepare(_Entry(n, s, c), b) for n, s, c, b, _ in parts), 1)
    kinds = stack.table[:, KIND].tolist()
    assert kinds.count(KIND_VQ_GRID) == 5 and kinds.count(KIND_AFFINE) == 3
    assert sorted(stack.out_rows.tolist()) == list(range(stack.shape[0]))


def test_a_vq_stack_takes_decode_sizes_and_off_grid_codebooks_do_not_stack(backends):
    """A stack with a vq piece takes up to KERNEL_MAX_TOKENS tokens (then each member its own product: dequantize +
    sgemm), an affine one up to stack_max_tokens; a vq codebook off the grid has no stack line (its float kernel)."""
    from test_cpu_vq import vq_blobs, vq_config

    fast, ref = backends
    rng = np.random.default_rng(2)
    grid, affine = (members(rng, 96, [label])[0] for label in ("v3d4g32s", "b4g32"))
    w_grid, w_affine = (fast.prepare(_Entry(n, s, c), b) for n, s, c, b, _ in (grid, affine))
    assert fast.stack((w_grid, w_affine), KERNEL_MAX_TOKENS) is not None
    assert fast.stack((w_grid, w_affine), KERNEL_MAX_TOKENS + 1) is None
    assert fast.stack((w_affine,), KERNEL_MAX_TOKENS + 1) is not None
    x = rng.standard_normal((KERNEL_MAX_TOKENS + 4, 96)).astype(np.float32)
    got = fast.linears(x, (w_grid, w_affine))
    np.testing.assert_allclose(got[0], x @ grid[4].T, rtol=1e-4, atol=1e-4)  # x itself: sgemm
    config = vq_config(3, 4, 32)
    off = fast.prepare(_Entry("off", (8, 96), config), vq_blobs(rng, (8, 96), config))
    assert off.codebook.grid_book is None and fast.stack((off, w_affine), 1) is None
    assert fast.kernels is not None


def test_the_parallel_stack_kernel_matches_the_serial_one(backends):
    """cpu_stack_kernels.stack_matmul (JIT only: one parallel region, each part a stretch of the entries' units, vq
    grid entries among them) writes what stack_matmul_serial writes, for any number of parts — more parts than some entries have
    rows included — with bias and residual fused: every row written (no NaN left), and equal up to the
    summation order fastmath may choose differently in the two compiled functions."""
    fast, _ = backends
    if not fast.kernels.parallel:
        pytest.skip("the ahead-of-time kernels are serial only")
    rng = np.random.default_rng(11)
    parts = members(rng, 333, ["rows(3:b2g32,40:b8g128+o9,1:b5g64,20:b3g128)", "b4g64+o3", "rows(2:b6g32,5:b3g32)"]
                    + GRID_STACK)
    handles = tuple(fast.prepare(_Entry(n, s, c), b) for n, s, c, b, _ in parts)
    stack = fast.stack(handles, 1)
    assert isinstance(stack, KernelStack)
    width = stack.shape[0]
    for T in (1, 3):
        x = rng.standard_normal((T, 333)).astype(np.float32)
        bias = rng.standard_normal(width).astype(np.float32)
        residual = rng.standard_normal((T, width)).astype(np.float32)
        want = np.empty((T, width), np.float32)
        fast.kernels.stack_matmul_serial(x, stack.table, stack.out_rows, bias, residual, want, 1)
        for n_parts in (1, 2, 3, 7, 50):
            got = np.full((T, width), np.nan, np.float32)
            fast.kernels.stack_matmul(x, stack.table, stack.out_rows, bias, residual, got, n_parts)
            assert not np.isnan(got).any(), (T, n_parts)
            assert_close(got, want)


def test_members_the_kernels_cannot_stack_run_one_by_one(backends):
    fast, ref = backends
    rng = np.random.default_rng(3)
    affine = random_affine_blobs(rng, (8, 64), StorageConfig.affine(4, 32))
    mixed_config = parse("rows(4:b4g32,4:fp16)")
    mixed = join_blocks(rng.permutation(8), [random_affine_blobs(rng, (4, 64), StorageConfig.affine(4, 32)),
                                             {"data": rng.standard_normal((4, 64)).astype(np.float16)}])
    handles = (fast.prepare(_Entry("a", (8, 64), StorageConfig.affine(4, 32)), affine),
               fast.prepare(_Entry("m", (8, 64), mixed_config), mixed))
    assert isinstance(handles[1], RowBlocks) and fast.stack(handles, 1) is None
    x = rng.standard_normal((1, 64)).astype(np.float32)
    got = fast.linears(x, handles)
    assert [y.shape for y in got] == [(1, 8), (1, 8)]
    assert_close(got[1], fast.linear(x, handles[1]))


def test_split_rounding_is_the_numpy_rounding(backends):
    """round_x (once per stack) + layout_x (per config): x̂ exactly cpu_weights.quantize_activations', in
    cpu_qdot's order for every config, and xsum its per-group sums (zeros past the groups, as block_dot's
    zero-point sum reads whole vectors)."""
    from mxq.runtime.backends import cpu_kernels
    from mxq.runtime.backends.cpu_weights import ACTIVATION_LOW_BITS, UNITS, quantize_activations

    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3, 333)) * np.exp(rng.standard_normal((3, 333)))).astype(np.float32)
    x[1, 64:96] = 0.0  # an all-zero block
    for bits, group in CONFIGS:
        n_blocks = -(-333 // group) * group // 32
        pair = n_blocks % 2 == 0
        q, dx, x_hat = cpu_kernels.round_x(x, n_blocks + 2)  # rounded wider than needed, as a stack may
        np.testing.assert_array_equal(x_hat, quantize_activations(x, cpu_kernels.ACTIVATION_LOW_PART))
        high, low, xsum = cpu_kernels.layout_x(q, dx, bits, group, n_blocks, pair)
        U, _ = UNITS[bits]
        M = 32 // U * (2 if pair else 1)
        c = np.arange(n_blocks * 32)
        u = c // U
        at = (u // M) * U * M + (c % U) * M + u % M  # column c's place in cpu_qdot's order
        assert np.array_equal(np.sort(at), c)
        codes = high[:, at].astype(np.int32) * 2 ** ACTIVATION_LOW_BITS + low[:, at]  # (T, n_blocks·32) natural
        np.testing.assert_array_equal(codes, q[:, :n_blocks * 32])
        steps = np.repeat(dx[:, :n_blocks], 32, axis=1)
        np.testing.assert_array_equal((codes * steps)[:, :333].astype(np.float32), x_hat)
        sums = (codes * steps).reshape(3, -1, group).sum(axis=2)
        G = sums.shape[1]
        np.testing.assert_allclose(xsum[:, :G], sums, rtol=1e-5, atol=1e-6)
        assert xsum.shape[1] == cpu_kernels.padded_groups(G) and xsum.shape[1] % 16 == 0 and not xsum[:, G:].any()


def test_tile_rounding_is_the_numpy_rounding():
    """tile_x (once per stack, the tiles' form of x): x̂ exactly cpu_weights.quantize_activations', high and low
    in the natural column order (zeros past the input), dx per block and xsum each block's Σ x̂."""
    from mxq.runtime.backends import cpu_kernels
    from mxq.runtime.backends.cpu_weights import ACTIVATION_LOW_BITS, quantize_activations

    rng = np.random.default_rng(6)
    x = (rng.standard_normal((3, 333)) * np.exp(rng.standard_normal((3, 333)))).astype(np.float32)
    x[1, 64:96] = 0.0  # an all-zero block
    n_blocks = 13  # wider than needed (11), as a stack may round
    high, low, dx, xsum, x_hat = cpu_kernels.tile_x(x, n_blocks)
    np.testing.assert_array_equal(x_hat, quantize_activations(x, cpu_kernels.ACTIVATION_LOW_PART))
    codes = high.astype(np.int32) * 2 ** ACTIVATION_LOW_BITS + low  # (T, n_blocks·32), natural order
    assert high.shape == (3, n_blocks * 32) and not codes[:, 333:].any()
    values = codes * np.repeat(dx, 32, axis=1)
    np.testing.assert_array_equal(values[:, :333].astype(np.float32), x_hat)
    np.testing.assert_array_equal(xsum, (codes.reshape(3, n_blocks, 32).sum(axis=2) * dx).astype(np.float32))


def test_a_stack_is_made_once_per_tuple_of_handles(backends):
    fast, _ = backends
    rng = np.random.default_rng(1)
    config = StorageConfig.affine(4, 32)
    a, b = (fast.prepare(_Entry(n, (8, 64), config), random_affine_blobs(rng, (8, 64), config)) for n in "ab")
    stack = fast.stack((a, b), 1)
    assert isinstance(stack, KernelStack) and fast.stack((a, b), 1) is stack and fast.stack((b, a), 1) is not stack
    most = STACK_MAX_TOKENS[fast.kernels.dot_isa, cpu_weights.ACTIVATION_SETTING]  # this CPU's and setting's entry
    assert fast.stack_max_tokens == most >= KERNEL_MAX_TOKENS
    assert fast.stack((a, b), most) is stack  # prefill pieces up to that too ...
    assert fast.stack((a, b), most + 1) is None  # ... but no more: products one by one (dequantize + sgemm)


ROUNDING_UNDER_A_FASTMATH_CALLER = """
import numpy as np
from numba import njit
from mxq.runtime.backends import cpu_kernels
from mxq.runtime.backends.cpu_weights import quantize_activations

@njit(fastmath=True)
def caller(x, n_blocks):  # as every SERIAL/PARALLEL kernel calls quantize_x → round_x
    return cpu_kernels.round_x(x, n_blocks)[2]

rng = np.random.default_rng(5)
x = (rng.standard_normal((3, 333)) * np.exp(rng.standard_normal((3, 333)))).astype(np.float32)
want = quantize_activations(x, cpu_kernels.ACTIVATION_LOW_PART)
print(int((caller(x, 11) != want).sum()), int((cpu_kernels.round_x(x, 11)[2] != want).sum()))
"""


def test_rounding_stays_exact_when_a_fastmath_kernel_compiles_it_first(tmp_path):
    """The EXACT kernels do not inherit a caller's fastmath (Numba does, for a flag left unset): compiled
    afresh in a subprocess (own Numba cache), first from inside a fastmath kernel, round_x still gives
    quantize_activations' x̂ bit for bit — from the caller and when called directly afterwards."""
    import os
    import subprocess
    import sys

    from mxq.runtime.backends import cpu_aot

    env = {**os.environ, "PYTHONPATH": str(cpu_aot.HERE.parents[2]), "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    done = subprocess.run([sys.executable, "-c", ROUNDING_UNDER_A_FASTMATH_CALLER], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0", "0"]

"""The `rows` scheme (SPEC.md §8): row blocks with their own configs, in a stored row order — format,
reference dequantization, every CPU product path, hostile files, and a whole model stored that way.

Tolerances: a rows product is its blocks' products put in place, so it is held to the same bound as
an affine product (test_runtime.py): |y − x·Wᵀ| ≤ 1e-5 · (|x|·|W|ᵀ) + 1e-6 per element, W the reference
dequantization (fp32 sums in another order). Gathered rows (embedding) are exact.
"""
from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import file_plans_and_blobs, random_blobs, write_random_file
from mxq.format_spec import (MxqFile, MxqFormatError, MxqWriter, StorageConfig, TensorPlan, block_blobs, dequantize,
                             encode_meta, join_blocks, pack_codes, tensor_nbytes)
from mxq.format_spec.rows import content_problem, dequantize_rows
from mxq.runtime.backends.numpy_backend import NumpyBackend
from mxq.runtime.backends.cpu_weights import activation_low_part, quantize_activations
from mxq.runtime.backends.row_blocks import RowBlocks
from mxq.runtime.errors import ModelError

parse = StorageConfig.parse

# (shape, label): affine + lut + fp16 blocks, outliers in a block, odd shapes, many blocks
MIXES = [
    ((10, 70), "rows(4:b3g32+o5,6:b4g64)"),
    ((13, 100), "rows(3:l3+o4,7:b2g32,3:fp16)"),
    ((9, 33), "rows(1:fp16,2:l4c2,6:b5g128+o3)"),
    ((40, 64), "rows(10:b8g32,10:l2c4,10:b6g64+o7,10:fp16)"),
]


def random_rows_blobs(rng, shape, config: StorageConfig) -> dict:
    """Valid blobs of a rows tensor: a random row order, random content in every block."""
    out_features, in_features = shape
    blocks = [random_blobs(rng, (count, in_features), block) for count, block in config.blocks]
    return join_blocks(rng.permutation(out_features), blocks)


def reference_weight(blobs, shape, config) -> np.ndarray:
    """W by the definition: stored row s of the blocks is row row_order[s] of W."""
    stored = np.concatenate([dequantize(block_blobs(blobs, i), (count, shape[1]), block)
                             for i, (count, block) in enumerate(config.blocks)])  # (out, in) stored order
    weight = np.full(shape, np.nan, np.float32)
    weight[blobs["row_order"].astype(np.int64)] = stored
    return weight


def write_rows_file(path, tensors, seed=0, **writer_options):
    """Write [(name, shape, config)] with random content; returns {name: blobs}."""
    rng = np.random.default_rng(seed)
    plans = [TensorPlan(name, shape, config, "linear") for name, shape, config in tensors]
    written = {plan.name: (random_rows_blobs if plan.config.scheme == "rows" else random_blobs)(rng, plan.shape,
                                                                                                 plan.config)
               for plan in plans}
    plans, stored = file_plans_and_blobs(plans, written.get)  # + the shared vq codebooks they use
    with MxqWriter(path, model={"architecture": "llama"}, tokenizer={"kind": "sentencepiece"}, tokenizer_data=b"t",
                   tensors=plans, **writer_options) as writer:
        for plan in plans:
            writer.write(plan.name, stored[plan.name])
    return written


@pytest.fixture
def rows_file(tmp_path):
    path = tmp_path / "rows.mxq"
    tensors = [(f"t{i}", shape, parse(label)) for i, (shape, label) in enumerate(MIXES)]
    tensors.append(("plain", (6, 40), StorageConfig.affine(4, 32)))
    return path, tensors, write_rows_file(path, tensors)


@pytest.fixture
def rows_table_file(rows_file):
    """rows_file's tensors in a file whose entries list their blobs (the 1.0–1.4 form)."""
    path, tensors, _ = rows_file
    table = path.with_name("rows-table.mxq")
    return table, tensors, write_rows_file(table, tensors, blob_table=True)


# ---- format -------------------------------------------------------------------------------------------

def test_round_trip_and_cost_model(rows_file):
    path, tensors, written = rows_file
    with MxqFile.open(path) as f:
        assert f.version == (1, 5)  # packed tensor entries need 1.5 (`rows` 1.2, the 6-bit metadata of b2/b3 1.4)
        assert f.verify() == []
        for name, shape, config in tensors:
            entry = f.tensors[name]
            assert entry.config == config and entry.nbytes == tensor_nbytes(shape, config)
            blobs = f.blobs(name)
            for blob_name, array in written[name].items():
                np.testing.assert_array_equal(blobs[blob_name], array)
            if config.scheme == "rows":
                weight = dequantize(blobs, shape, config)
                np.testing.assert_array_equal(weight, reference_weight(blobs, shape, config))  # every row filled
    assert path.stat().st_size >= sum(tensor_nbytes(shape, config) for _, shape, config in tensors)


def test_the_minor_version_is_the_lowest_the_file_needs(small_file):
    from mxq.format_spec.header import minor_version

    b4, lut, fp16 = parse("b4g64"), parse("l3"), parse("fp16")
    rows, rows6 = parse("rows(40:b4g64,24:b3g64m8)"), parse("rows(40:b4g64,24:b3g64)")
    assert minor_version([b4, fp16, parse("b3g32m8")], "hf-tokenizers") == 1 and minor_version([lut], "sentencepiece") == 1
    assert minor_version([b4, rows], "sentencepiece") == 2
    assert minor_version([b4], "sentencepiece+xz") == minor_version([rows], "hf-tokenizers+xz") == 3
    assert minor_version([parse("b3g32")], "sentencepiece") == minor_version([rows6], "sentencepiece") == 4
    assert minor_version([parse("b5g32m6")], "sentencepiece") == 4
    assert minor_version([b4], "sentencepiece", packed=True) == minor_version([rows6], "sentencepiece+xz", packed=True) == 5
    path, tensors, _ = small_file
    assert struct.unpack_from("<HH", path.read_bytes(), 8) == (1, 5)  # mxq writes packed tensor entries
    empty = path.with_name("empty.mxq")
    write_random_file(empty, [])
    assert struct.unpack_from("<HH", empty.read_bytes(), 8) == (1, 3)  # no tensor entry: packed or not, +xz
    table = path.with_name("table.mxq")
    write_random_file(table, tensors, blob_table=True)
    assert struct.unpack_from("<HH", table.read_bytes(), 8) == (1, 4)  # its b3 tensor has 6-bit metadata


def test_row_order_dtype_and_blob_table():
    from mxq.format_spec import blob_specs

    config = StorageConfig.rows([(70000, StorageConfig.fp16()), (1, StorageConfig.fp16())])
    assert blob_specs((70001, 2), config)["row_order"].dtype == "uint32"
    specs = blob_specs((10, 70), parse("rows(4:b3g32+o5,6:b4g64)"))
    assert list(specs)[:3] == ["row_order", "0.qweight", "0.scale_codes"] and specs["row_order"].dtype == "uint16"
    assert tensor_nbytes((10, 70), parse("rows(4:b3g32+o5,6:b4g64)")) == 20 + tensor_nbytes(
        (4, 70), parse("b3g32+o5")) + tensor_nbytes((6, 70), parse("b4g64"))


@pytest.mark.parametrize("order, message", [
    ([0, 1, 2, 2, 4, 5], "row 2 appears 2 times"),
    ([0, 1, 2, 3, 4, 6], "row 6, outside 0..5"),
])
def test_writer_refuses_a_row_order_that_is_not_a_permutation(tmp_path, order, message):
    config = parse("rows(2:fp16,4:b4g32)")
    blobs = random_rows_blobs(np.random.default_rng(0), (6, 32), config)
    blobs["row_order"] = np.array(order, np.uint16)
    plans = [TensorPlan("w", (6, 32), config)]
    with pytest.raises(ValueError, match=f"tensor 'w': row_order .*{message}"):
        with MxqWriter(tmp_path / "out.mxq", model={}, tokenizer={"kind": "sentencepiece"}, tokenizer_data=b"t",
                       tensors=plans) as writer:
            writer.write("w", blobs)
    assert list(tmp_path.iterdir()) == []


def test_writer_names_the_tensor_for_wrong_block_blobs(tmp_path):
    config = parse("rows(2:fp16,4:b4g32)")
    blobs = random_rows_blobs(np.random.default_rng(0), (6, 32), config)
    blobs.pop("1.zero_meta")
    with pytest.raises(ValueError, match="tensor 'w': blobs"):
        with MxqWriter(tmp_path / "out.mxq", model={}, tokenizer={"kind": "sentencepiece"}, tokenizer_data=b"t",
                       tensors=[TensorPlan("w", (6, 32), config)]) as writer:
            writer.write("w", blobs)


def test_content_problems_are_found():
    config = parse("rows(3:b4g32+o2,3:l3)")
    blobs = random_rows_blobs(np.random.default_rng(1), (6, 40), config)
    assert content_problem(blobs, (6, 40), config) is None
    assert "appears 2 times" in content_problem(dict(blobs, row_order=np.array([0, 0, 1, 2, 3, 4], np.uint16)),
                                                (6, 40), config)
    bad = dict(blobs, **{"0.outlier_cols": np.array([50, 1], np.uint16)})
    assert content_problem(bad, (6, 40), config).startswith("block 0: outlier column 50")
    with pytest.raises(ValueError, match="not a permutation"):
        dequantize_rows(dict(blobs, row_order=np.array([5, 5, 1, 2, 3, 4], np.uint16)), (6, 40), config)


# ---- hostile files ----------------------------------------------------------------------------------------

def _rows_entry(document, index=1):
    return document["tensors"][index]


def _swap_block_scheme(d):
    block = _rows_entry(d)["config"]["blocks"][0]
    block.update(scheme="affine", config={"bits": 3, "group_size": 32, "meta_bits": 8, "meta_group_size": 128,
                                          "outliers": 4})


HOSTILE_ROWS_EDITS = {
    "one block": lambda d: _rows_entry(d)["config"].update(blocks=_rows_entry(d)["config"]["blocks"][:1]),
    "no blocks": lambda d: _rows_entry(d)["config"].update(blocks=[]),
    "blocks missing": lambda d: _rows_entry(d)["config"].pop("blocks"),
    "blocks not a list": lambda d: _rows_entry(d)["config"].update(blocks={"0": 1}),
    "block not an object": lambda d: _rows_entry(d)["config"]["blocks"].__setitem__(0, 3),
    "counts do not sum": lambda d: _rows_entry(d)["config"]["blocks"][0].update(rows=4),
    "zero rows": lambda d: _rows_entry(d)["config"]["blocks"][0].update(rows=0),
    "negative rows": lambda d: _rows_entry(d)["config"]["blocks"][0].update(rows=-3),
    "rows as string": lambda d: _rows_entry(d)["config"]["blocks"][0].update(rows="3"),
    "block outliers beyond its weights": lambda d: _rows_entry(d)["config"]["blocks"][0]["config"].update(outliers=301),
    "nested rows": lambda d: _rows_entry(d)["config"]["blocks"][0].update(scheme="rows"),
    "unknown block scheme": lambda d: _rows_entry(d)["config"]["blocks"][0].update(scheme="int4"),
    "block scheme missing": lambda d: _rows_entry(d)["config"]["blocks"][0].pop("scheme"),
    "block config missing": lambda d: _rows_entry(d)["config"]["blocks"][1].pop("config"),
    "block bits 7": lambda d: _rows_entry(d)["config"]["blocks"][1]["config"].update(bits=7),
    "block meta_bits 4": lambda d: _rows_entry(d)["config"]["blocks"][1]["config"].update(meta_bits=4),
    "table: block scheme changed": _swap_block_scheme,
    "table: missing block blob": lambda d: _rows_entry(d)["blobs"].pop("1.qweight"),
    "table: extra block blob": lambda d: _rows_entry(d)["blobs"].update({"3.qweight": _rows_entry(d)["blobs"]["1.qweight"]}),
    "table: unprefixed block blob": lambda d: _rows_entry(d)["blobs"].update(
        qweight=_rows_entry(d)["blobs"].pop("1.qweight")),
    "table: row_order missing": lambda d: _rows_entry(d)["blobs"].pop("row_order"),
    "table: row_order uint32": lambda d: _rows_entry(d)["blobs"]["row_order"].update(
        dtype="uint32", nbytes=2 * _rows_entry(d)["blobs"]["row_order"]["nbytes"]),
    "table: row_order short": lambda d: _rows_entry(d)["blobs"]["row_order"].update(shape=[12], nbytes=24),
    "1-D rows": lambda d: _rows_entry(d).update(shape=[1300]),
}


@pytest.mark.parametrize("name", list(HOSTILE_ROWS_EDITS))
def test_hostile_rows_metadata_is_rejected(rows_file, rows_table_file, tmp_path, name):
    from test_corruption import _rewrite_json

    path, _, _ = rows_table_file if name.startswith("table: ") else rows_file
    target = tmp_path / "hostile.mxq"
    target.write_bytes(_rewrite_json(path.read_bytes(), HOSTILE_ROWS_EDITS[name]))
    try:
        with MxqFile.open(target) as f:
            pytest.fail(f"accepted: {f.tensors['t1'].config.label}")
    except MxqFormatError as error:
        message = str(error)
    assert "\n" not in message and "tensor 't1'" in message, message


def test_block_errors_name_the_block(rows_file, tmp_path):
    from test_corruption import _rewrite_json

    path, _, _ = rows_file
    target = tmp_path / "hostile.mxq"
    target.write_bytes(_rewrite_json(path.read_bytes(), HOSTILE_ROWS_EDITS["nested rows"]))
    with pytest.raises(MxqFormatError, match=r"tensor 't1' block 0: scheme 'rows' is not a block scheme"):
        MxqFile.open(target)
    target.write_bytes(_rewrite_json(path.read_bytes(), HOSTILE_ROWS_EDITS["block bits 7"]))
    with pytest.raises(MxqFormatError, match=r"tensor 't1' block 1: config bits=7"):
        MxqFile.open(target)
    target.write_bytes(_rewrite_json(path.read_bytes(), HOSTILE_ROWS_EDITS["block outliers beyond its weights"]))
    with pytest.raises(MxqFormatError, match=r"tensor 't1': block 0: 301 outliers exceed the 300 weights"):
        MxqFile.open(target)


def _patch_row_order(path, target, name, values):
    """A copy of `path` whose tensor `name` has row_order `values` (the crc32 left stale)."""
    with MxqFile.open(path) as f:
        ref = f.tensors[name].blobs["row_order"]
    image = bytearray(path.read_bytes())
    data = np.asarray(values, ref.dtype).tobytes()
    image[ref.offset: ref.offset + len(data)] = data
    target.write_bytes(bytes(image))


@pytest.mark.parametrize("values, message", [
    ([0, 1, 2, 3, 4, 5, 6, 7, 8, 8], "row 8 appears 2 times"),
    ([0, 1, 2, 3, 4, 5, 6, 7, 8, 65535], "row 65535, outside 0..9"),
])
def test_bad_row_order_is_caught_by_verify_and_runtime(rows_file, tmp_path, values, message):
    path, _, _ = rows_file
    target = tmp_path / "bad-order.mxq"
    _patch_row_order(path, target, "t0", values)
    with MxqFile.open(target) as f:
        problems = f.verify()
        assert any(p.startswith("tensor 't0': row_order ") and message in p for p in problems), problems
        with pytest.raises(ModelError, match=f"tensor 't0': bad row blocks: row_order .*{message}"):
            NumpyBackend(kernels=False, threads=1).prepare(f.tensors["t0"], f.blobs("t0"))
    result = subprocess.run([sys.executable, "-m", "mxq.cli", "verify", str(target)], capture_output=True, text=True)
    assert result.returncode == 1 and message in result.stderr


def test_runtime_checks_each_blocks_outliers(rows_file):
    path, _, _ = rows_file
    with MxqFile.open(path) as f:
        bad = dict(f.blobs("t0"), **{"0.outlier_cols": np.array([0, 0, 0, 0, 99], np.uint16)})
        with pytest.raises(ModelError, match="tensor 't0': bad row blocks: block 0: "):
            NumpyBackend(kernels=False, threads=1).prepare(f.tensors["t0"], bad)


# ---- products ---------------------------------------------------------------------------------------------

class Entry:
    def __init__(self, name, shape, config, role="linear"):
        self.name, self.shape, self.config, self.role = name, tuple(shape), config, role


BACKENDS = {
    "numpy": lambda: NumpyBackend(kernels=False, threads=1),
    "numpy-threads": lambda: NumpyBackend(kernels=False, threads=2),
    "kernels": lambda: NumpyBackend(threads=1),
    "cached": lambda: NumpyBackend(cache_dequantized=True, threads=1),
}


def assert_product_close(y, x, weight, bias=None, residual=None, rounded_x=False):
    """y ≈ x @ Wᵀ (+ bias, residual). rounded_x: the compiled affine kernels multiply a rounded x̂
    (cpu_weights.quantize_activations), so |W|·|x − x̂| more is allowed (the rounding's exact bound)."""
    expected = x.astype(np.float64) @ weight.T.astype(np.float64)
    bound = np.abs(x).astype(np.float64) @ np.abs(weight).T.astype(np.float64)
    rounding = 0.0
    if rounded_x:
        rounding = np.abs(x - quantize_activations(x, activation_low_part())).astype(np.float64) @ np.abs(weight).T.astype(np.float64)
    if bias is not None:
        expected += bias
    if residual is not None:
        expected += residual
    assert y.shape == expected.shape and y.dtype == np.float32
    assert np.all(np.abs(y - expected) <= 1e-5 * bound + rounding + 1e-6 * (1 + np.abs(expected)))


@pytest.mark.parametrize("backend_name", list(BACKENDS))
@pytest.mark.parametrize("mix", range(len(MIXES)))
@pytest.mark.parametrize("T", [1, 3, 20])
def test_linear_and_embedding_match_reference(backend_name, mix, T):
    shape, label = MIXES[mix]
    config = parse(label)
    rng = np.random.default_rng(mix * 31 + T)
    blobs = random_rows_blobs(rng, shape, config)
    weight = reference_weight(blobs, shape, config)
    backend = BACKENDS[backend_name]()
    handle = backend.prepare(Entry("w", shape, config), blobs)
    assert isinstance(handle, RowBlocks) and [b.shape for b in handle.blocks] == [
        (count, shape[1]) for count in config.row_counts]
    x = rng.standard_normal((T, shape[1])).astype(np.float32)
    # the compiled kernels round x: decode-sized products, and the tiles' kernel of stacks (the whole matrix, or
    # its affine blocks one by one) up to a prefill piece
    stacked = any(backend.stack((part,), T) is not None for part in (handle, *handle.blocks))
    rounded = (backend.kernels_for(T) is not None or stacked) and not backend.cache_dequantized
    assert_product_close(backend.linear(x, handle), x, weight, rounded_x=rounded)
    bias = rng.standard_normal(shape[0]).astype(np.float32)
    residual = rng.standard_normal((T, shape[0])).astype(np.float32)
    assert_product_close(backend.linear(x, handle, bias, residual.copy()), x, weight, bias, residual, rounded_x=rounded)
    ids = rng.integers(0, shape[0], size=T)
    np.testing.assert_array_equal(backend.embedding(handle, ids), weight[ids])
    backend.close()


def test_embedding_handle_is_the_tied_lm_head():
    """A rows embedding (gathered, not cached at load) is also multiplied as the lm_head."""
    shape, config = (48, 32), parse("rows(16:b4g32,20:l3+o6,12:fp16)")
    rng = np.random.default_rng(7)
    blobs = random_rows_blobs(rng, shape, config)
    weight = reference_weight(blobs, shape, config)
    for make in BACKENDS.values():
        backend = make()
        handle = backend.prepare(Entry("embed", shape, config, role="embedding"), blobs)
        ids = np.array([47, 0, 5, 5, 30])
        np.testing.assert_array_equal(backend.embedding(handle, ids), weight[ids])
        x = rng.standard_normal((2, 32)).astype(np.float32)
        assert_product_close(backend.linear(x, handle), x, weight, rounded_x=backend.kernels_for(2) is not None and not backend.cache_dequantized)
        with pytest.raises(ModelError, match="token id outside"):
            backend.embedding(handle, np.array([48]))
        backend.close()


# ---- a whole model ----------------------------------------------------------------------------------------

def exact_blobs(rng, shape, config: StorageConfig) -> dict:
    """Blobs whose dequantized weights are exactly fp16 numbers (multiples of 1/256, small): then an fp16
    file holds exactly the same weights, and two files can be compared for identical generation."""
    out_features, in_features = shape
    if config.scheme == "fp16":
        return {"data": (rng.integers(-12, 13, size=shape) / 256).astype(np.float16)}
    blobs = {}
    if config.scheme == "lut":
        n_packs = -(-in_features // 32)
        codes = rng.integers(0, 1 << config.bits, size=(out_features, n_packs * 32))
        codes[:, in_features:] = 0
        n_codebooks = -(-out_features // config.codebook_rows)
        blobs = {"qweight": pack_codes(codes, config.bits),
                 "codebook": (rng.integers(-12, 13, (n_codebooks, 1 << config.bits)) / 256).astype(np.float16)}
    else:
        n_groups = -(-in_features // config.group_size)
        codes = rng.integers(0, 1 << config.bits, size=(out_features, n_groups * config.group_size))
        codes[:, in_features:] = 0
        scale_codes, scale_meta = encode_meta(np.full((out_features, n_groups), 1 / 256, np.float32), config.meta_bits)
        zero_codes, zero_meta = encode_meta(np.full((out_features, n_groups), (1 << config.bits) // 2, np.float32),
                                             config.meta_bits)
        blobs = {"qweight": pack_codes(codes, config.bits), "scale_codes": scale_codes, "scale_meta": scale_meta,
                 "zero_codes": zero_codes, "zero_meta": zero_meta}
    if config.outliers:
        from mxq.format_spec import build_csr

        flat = rng.choice(out_features * in_features, size=config.outliers, replace=False)
        blobs.update(build_csr(shape, flat // in_features, flat % in_features,
                               (rng.integers(-8, 9, config.outliers) / 256).astype(np.float32)))
    return blobs


def write_rows_model(tmp_path, fixture="tiny-qwen2"):
    """(rows file, fp16 file) of a tiny fixture: every matrix and the embedding stored as 3 row blocks in a
    random order (affine with and without outliers, lut, fp16: exact_blobs content), and the same weights
    as fp16."""
    import json

    fixtures = pytest.importorskip("fixtures")
    from safetensors.numpy import load_file
    from test_runtime_files import hf_model_json, hf_tokenizer, tensor_role

    hf_dir = fixtures.ensure(fixture)
    cfg = json.loads((hf_dir / "config.json").read_text())
    weights = load_file(str(hf_dir / "model.safetensors"))
    model, (tokenizer, tokenizer_data) = hf_model_json(cfg), hf_tokenizer(hf_dir, cfg)
    rng = np.random.default_rng(0)
    mixes = ["b4g32+o3", "l3", "fp16", "b3g64", "l4c2+o2", "b8g32"]
    rows_plans, fp16_plans, rows_blobs, fp16_blobs = [], [], {}, {}
    for name in sorted(weights):
        shape, role = weights[name].shape, tensor_role(name)
        fp16_plans.append(TensorPlan(name, shape, StorageConfig.fp16(), role))
        if len(shape) != 2:
            rows_plans.append(fp16_plans[-1])
            rows_blobs[name] = fp16_blobs[name] = {"data": weights[name].astype(np.float16)}
            continue
        cut = np.sort(rng.choice(np.arange(1, shape[0]), size=2, replace=False))  # 3 blocks
        counts = [int(c) for c in np.diff(np.concatenate([[0], cut, [shape[0]]]))]
        config = StorageConfig.rows([(c, parse(mixes[(len(rows_plans) + i) % len(mixes)]).storage((c, shape[1])))
                                     for i, c in enumerate(counts)])
        blobs = join_blocks(rng.permutation(shape[0]), [exact_blobs(rng, (count, shape[1]), block)
                                                          for count, block in config.blocks])
        rows_plans.append(TensorPlan(name, shape, config, role))
        rows_blobs[name] = blobs
        dense = dequantize(blobs, shape, config)
        assert np.array_equal(dense.astype(np.float16).astype(np.float32), dense)  # exactly fp16
        fp16_blobs[name] = {"data": dense.astype(np.float16)}
    paths = {}
    for kind, plans, blobs in (("rows", rows_plans, rows_blobs), ("fp16", fp16_plans, fp16_blobs)):
        paths[kind] = tmp_path / f"{fixture}-{kind}.mxq"
        with MxqWriter(paths[kind], model=model, tokenizer=tokenizer, tokenizer_data=tokenizer_data,
                       tensors=plans) as writer:
            for plan in plans:
                writer.write(plan.name, blobs[plan.name])
    return paths["rows"], paths["fp16"]


def greedy_steps(path, backend, n=12):
    """Prefill a fixed prompt, then decode n fixed tokens one at a time (random weights make greedy
    generation repeat one token; fixed inputs exercise every row of the embedding and the head):
    returns every step's greedy choice and logits (prefill: all positions)."""
    from mxq.runtime.config import ModelConfig
    from mxq.runtime.model import Model

    with MxqFile.open(path) as f:
        config = ModelConfig.from_json(f.model)
        lm = Model.from_file(f, config, backend)
        tokens = np.random.default_rng(3).integers(0, config.vocab_size, 5 + n).tolist()
        cache = lm.new_cache(64)
        steps = [backend.to_host(lm.forward(tokens[:5], cache))]  # (5, vocab)
        for token in tokens[5:]:
            steps.append(backend.to_host(lm.forward([token], cache)))  # (1, vocab)
        backend.close()
        return [int(i) for step in steps for i in step.argmax(axis=1)], steps


def test_rows_model_generates_like_its_dequantized_fp16_file(tmp_path):
    """tiny-qwen2 (tied embedding = lm_head, q/k/v biases) with every matrix and the embedding stored as
    rows, against the same weights as fp16: identical greedy tokens and logits within fp32 reordering (the
    compiled kernels: within their activation rounding), on the NumPy path, the kernels and the cached mode."""
    rows_path, fp16_path = write_rows_model(tmp_path)
    with MxqFile.open(rows_path) as f:
        assert f.version == (1, 5) and f.verify() == []
        assert f.tensors["model.embed_tokens.weight"].config.scheme == "rows"
    reference_ids, reference_steps = greedy_steps(fp16_path, NumpyBackend(kernels=False, threads=1))
    assert len(set(reference_ids)) > 3  # the greedy choices differ from step to step
    for name, make in BACKENDS.items():
        ids, steps = greedy_steps(rows_path, make())
        assert ids == reference_ids
        # the compiled affine kernels multiply ~16-bit rounded activations (cpu_weights.quantize_activations):
        # their stated tolerance on the tiny models is 1e-3 of max|logits|; the float paths 1e-4
        tolerance = 1e-3 if name == "kernels" else 1e-4
        for got, want in zip(steps, reference_steps):
            assert np.max(np.abs(got - want)) <= tolerance * np.max(np.abs(want))


def test_export_hf_writes_the_logical_rows(tmp_path):
    """export-hf of the rows model = export-hf of its fp16 twin, tensor for tensor; an unsound row_order is
    a one-line format error naming the tensor even without the checksum pass."""
    from safetensors.numpy import load_file

    from mxq.runtime.export_hf import export_hf

    rows_path, fp16_path = write_rows_model(tmp_path)
    got = load_file(str(export_hf(rows_path, tmp_path / "rows-hf") / "model.safetensors"))
    want = load_file(str(export_hf(fp16_path, tmp_path / "fp16-hf") / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    with MxqFile.open(rows_path) as f:
        out_features = f.tensors["model.layers.0.mlp.up_proj.weight"].shape[0]
    bad = tmp_path / "bad.mxq"
    _patch_row_order(rows_path, bad, "model.layers.0.mlp.up_proj.weight", np.zeros(out_features))
    with pytest.raises(MxqFormatError, match=r"tensor 'model.layers.0.mlp.up_proj.weight': row_order is not a "):
        export_hf(bad, tmp_path / "bad-hf", verify=False)


def test_inspect_shows_rows_tensors(tmp_path):
    import json

    rows_path, _ = write_rows_model(tmp_path)
    run = lambda *args: subprocess.run([sys.executable, "-m", "mxq.cli", "inspect", str(rows_path), *args],
                                       capture_output=True, text=True)
    report = json.loads(run("--json").stdout)
    with MxqFile.open(rows_path) as f:
        for t in report["tensors"]:
            entry = f.tensors[t["name"]]
            assert t["bytes"] == tensor_nbytes(entry.shape, entry.config)
            assert t["bpw"] == round(8 * t["bytes"] / entry.numel, 4) and parse(t["label"]) == entry.config
    assert report["totals"]["linear_configs"] == {"rows×3": 14}
    assert sum(report["totals"]["row_block_configs"].values()) == 3 * 14
    text = run().stdout
    line = next(line for line in text.splitlines() if line.startswith("model.layers.0.self_attn.q_proj.weight"))
    q = next(t for t in report["tensors"] if t["name"] == "model.layers.0.self_attn.q_proj.weight")
    blocks = parse(q["label"]).blocks
    assert f"rows×3 {blocks[0][1].label}…{blocks[-1][1].label}" in line and f"{q['bytes']:,}" in line
    assert "row block configs: " in text and "mxq format 1.5" in text

import itertools
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import random_affine_blobs, write_random_file
from mxq.format_spec import (CODEBOOK_ROWS, GROUP_SIZES, META_BITS, SUPPORTED_BITS, MxqFile, MxqWriter, StorageConfig, TensorPlan,
                             blob_specs, csr_problem, decode_meta, dequantize, encode_meta, tensor_nbytes,
                             unpack_codes)

ODD_SHAPES = [(1, 1), (3, 31), (7, 33), (5, 96), (2, 130), (9, 576), (4, 1000)]
ALL_AFFINE = [StorageConfig.affine(b, g, o, m)
              for b, g, o, m in itertools.product(SUPPORTED_BITS, GROUP_SIZES, (0, 3), META_BITS)]
ALL_LUT = [StorageConfig.lut(b, c, o) for b, c, o in itertools.product(SUPPORTED_BITS, CODEBOOK_ROWS, (0, 3))]


def test_cost_model_equals_bytes_written(tmp_path):
    """Every config × odd shapes: the cost model's bytes are exactly the bytes the writer emits."""
    tensors = [(f"t{i}", shape, config) for i, (shape, config) in
               enumerate(itertools.product(ODD_SHAPES, ALL_AFFINE + ALL_LUT + [StorageConfig.fp16()]))
               if config.outliers <= math.prod(shape)]
    path = tmp_path / "all.mxq"
    write_random_file(path, tensors)
    with MxqFile.open(path) as f:
        spans = []
        for name, shape, config in tensors:
            entry = f.tensors[name]
            assert entry.nbytes == tensor_nbytes(shape, config), (name, shape, config)
            spans += [(ref.offset, ref.nbytes) for ref in entry.blobs.values()]
        spans.append((f.tokenizer_blob.offset, f.tokenizer_blob.nbytes))
        # the file holds nothing but header, JSON, blobs and alignment gaps smaller than the alignment
        spans.sort()
        gaps = [b[0] - (a[0] + a[1]) for a, b in zip(spans, spans[1:])]
        assert all(0 <= gap < f.alignment for gap in gaps)
        assert spans[-1][0] + spans[-1][1] == os.path.getsize(path)


def test_packed_entries_and_blob_tables_hold_the_same_data(tmp_path):
    """SPEC §4.1: a packed entry (one offset and crc32 per tensor) places the blobs exactly where a blob
    table would: the data regions are byte-identical, only the JSON (and so data_offset) differs."""
    tensors = [("a", (5, 70), StorageConfig.parse("rows(2:b3g32+o2,3:l2)")), ("b", (9, 576), StorageConfig.affine(4, 64)),
               ("c", (7, 33), StorageConfig.lut(3, 4, 3)), ("n", (7,), StorageConfig.fp16())]
    from test_rows_scheme import write_rows_file

    packed, table = tmp_path / "packed.mxq", tmp_path / "table.mxq"
    written = write_rows_file(packed, tensors)
    write_rows_file(table, tensors, blob_table=True)
    with MxqFile.open(packed) as p, MxqFile.open(table) as t:
        assert p.verify() == t.verify() == [] and (p.version, t.version) == ((1, 5), (1, 4))
        assert len(p._json_raw) < len(t._json_raw) and p.data_offset <= t.data_offset
        assert packed.read_bytes()[p.data_offset:] == table.read_bytes()[t.data_offset:]
        for name, _, _ in tensors:
            assert [(r.dtype, r.shape, r.offset - p.data_offset) for r in p.tensors[name].blobs.values()] == \
                   [(r.dtype, r.shape, r.offset - t.data_offset) for r in t.tensors[name].blobs.values()]
            assert all(np.array_equal(p.blobs(name)[k], v) for k, v in written[name].items())


def test_cost_formula_in_spec():
    """SPEC §5: cost = out·G·g·b/8 + 2·M + 8·R + [4·(out+1) + 4·nnz], M = out·G (8-bit metadata codes)
    or 24·ceil(out·G/32) (6-bit)."""
    for (out, inp), config in itertools.product(ODD_SHAPES, ALL_AFFINE):
        if config.outliers > out * inp:
            continue
        g, b, nnz = config.group_size, config.bits, config.outliers
        G = math.ceil(inp / g)
        R = math.ceil(out * G / 128)
        M = out * G if config.meta_bits == 8 else 24 * math.ceil(out * G / 32)
        expected = out * G * g * b // 8 + 2 * M + 8 * R + ((4 * (out + 1) + 4 * nnz) if nnz else 0)
        assert tensor_nbytes((out, inp), config) == expected


def test_lut_cost_formula_in_spec():
    """SPEC §5: lut cost = out·P·4·b + 2·C·2^b + [4·(out+1) + 4·nnz], P = ceil(in/32), C = ceil(out/c)."""
    for (out, inp), config in itertools.product(ODD_SHAPES, ALL_LUT):
        if config.outliers > out * inp:
            continue
        b, c, nnz = config.bits, config.codebook_rows, config.outliers
        expected = out * math.ceil(inp / 32) * 4 * b + 2 * math.ceil(out / c) * 2 ** b
        assert tensor_nbytes((out, inp), config) == expected + ((4 * (out + 1) + 4 * nnz) if nnz else 0)


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 40), inp=st.integers(1, 300), bits=st.sampled_from(SUPPORTED_BITS),
       group=st.sampled_from(GROUP_SIZES), outliers=st.integers(0, 5), seed=st.integers(0, 1000))
def test_round_trip_exact(tmp_path_factory, out, inp, bits, group, outliers, seed):
    outliers = min(outliers, out * inp)
    config = StorageConfig.affine(bits, group, outliers)
    path = tmp_path_factory.mktemp("rt") / "x.mxq"
    written = write_random_file(path, [("w", (out, inp), config), ("n", (inp,), StorageConfig.fp16())], seed=seed)
    with MxqFile.open(path) as f:
        assert f.verify() == []
        for name, blobs in written.items():
            read = f.blobs(name)
            assert read.keys() == blobs.keys()
            for blob_name in blobs:
                np.testing.assert_array_equal(read[blob_name], blobs[blob_name])
                assert read[blob_name].dtype == blobs[blob_name].dtype
        w = f.blobs("w")
        if outliers:
            assert csr_problem(w, (out, inp)) is None
        np.testing.assert_array_equal(dequantize(w, (out, inp), config), dequantize(written["w"], (out, inp), config))


@pytest.mark.parametrize("config", [StorageConfig.affine(b, g, o) for b in (3, 5, 8) for g in GROUP_SIZES for o in (0, 4)],
                         ids=lambda c: c.label)
def test_dequantize_matches_spec_formula(config):
    """Element-by-element evaluation of SPEC §6.1–§6.2 against the vectorized reference."""
    rng = np.random.default_rng(1)
    shape = (3, 70)
    blobs = random_affine_blobs(rng, shape, config)
    codes = unpack_codes(blobs["qweight"], config.bits)
    expected = np.zeros(shape, dtype=np.float32)
    G = blobs["scale_codes"].shape[1]
    for r in range(shape[0]):
        for c in range(shape[1]):
            k = c // config.group_size
            flat = r * G + k
            step, low = blobs["scale_meta"][flat // 128].astype(np.float32)
            s = np.float32(blobs["scale_codes"][r, k]) * step + low
            step, low = blobs["zero_meta"][flat // 128].astype(np.float32)
            z = np.float32(blobs["zero_codes"][r, k]) * step + low
            expected[r, c] = (np.float32(codes[r, c]) - z) * s
    if config.outliers:
        row_ptr = blobs["outlier_row_ptr"]
        for r in range(shape[0]):
            for i in range(row_ptr[r], row_ptr[r + 1]):
                expected[r, blobs["outlier_cols"][i]] += np.float32(blobs["outlier_values"][i])
    np.testing.assert_array_equal(dequantize(blobs, shape, config), expected)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 700), low=st.floats(-300, 300), span=st.floats(0, 300), seed=st.integers(0, 99))
def test_meta_codec_covers_every_value(n, low, span, seed):
    values = (low + span * np.random.default_rng(seed).random(n)).astype(np.float32).reshape(1, n)
    codes, meta = encode_meta(values)
    assert codes.dtype == np.uint8 and meta.dtype == np.float16 and meta.shape == (math.ceil(n / 128), 2)
    decoded = decode_meta(codes, meta)
    run_step = np.repeat(meta[:, 0].astype(np.float32), 128)[:n]
    # every value within half a step (plus fp32 rounding) of its decoded value
    assert np.all(np.abs(decoded - values)[0] <= run_step * 0.5 + 1e-3 * np.abs(values[0]) + 1e-6)


def test_meta_codec_rejects_non_finite():
    with pytest.raises(ValueError):
        encode_meta(np.array([[1.0, np.nan]], dtype=np.float32))


def test_same_inputs_give_identical_bytes(tmp_path):
    tensors = [("a", (4, 64), StorageConfig.affine(2, 32, 2)), ("n", (3,), StorageConfig.fp16())]
    write_random_file(tmp_path / "1.mxq", tensors, seed=5)
    write_random_file(tmp_path / "2.mxq", tensors, seed=5)
    assert (tmp_path / "1.mxq").read_bytes() == (tmp_path / "2.mxq").read_bytes()


def test_interrupted_write_leaves_no_file(tmp_path):
    plans = [TensorPlan("a", (4, 64), StorageConfig.affine(4, 32)), TensorPlan("b", (4, 64), StorageConfig.affine(4, 32))]
    rng = np.random.default_rng(0)
    with pytest.raises(KeyboardInterrupt):
        with MxqWriter(tmp_path / "out.mxq", model={}, tokenizer={"kind": "sentencepiece"}, tokenizer_data=b"t", tensors=plans) as w:
            w.write("a", random_affine_blobs(rng, (4, 64), plans[0].config))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="only 1 of 2"):
        with MxqWriter(tmp_path / "out.mxq", model={}, tokenizer={"kind": "sentencepiece"}, tokenizer_data=b"t", tensors=plans) as w:
            w.write("a", random_affine_blobs(rng, (4, 64), plans[0].config))
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_wrong_blobs(tmp_path):
    plans = [TensorPlan("a", (4, 64), StorageConfig.affine(4, 32))]
    blobs = random_affine_blobs(np.random.default_rng(0), (4, 64), plans[0].config)
    blobs["scale_codes"] = blobs["scale_codes"].astype(np.uint16)
    with pytest.raises(ValueError, match="scale_codes"):
        with MxqWriter(tmp_path / "out.mxq", model={}, tokenizer={"kind": "sentencepiece"}, tokenizer_data=b"t", tensors=plans) as w:
            w.write("a", blobs)
    assert list(tmp_path.iterdir()) == []


def test_csr_problems_detected():
    shape = (3, 10)
    good = {"outlier_row_ptr": np.array([0, 2, 2, 3], np.uint32), "outlier_cols": np.array([1, 5, 0], np.uint16),
            "outlier_values": np.ones(3, np.float16)}
    assert csr_problem(good, shape) is None
    for row_ptr, cols in [([0, 2, 1, 3], [1, 5, 0]), ([1, 2, 2, 3], [1, 5, 0]), ([0, 2, 2, 3], [5, 1, 0]),
                          ([0, 2, 2, 3], [1, 10, 0]), ([0, 2, 2, 2], [1, 5, 0])]:
        bad = dict(good, outlier_row_ptr=np.array(row_ptr, np.uint32), outlier_cols=np.array(cols, np.uint16))
        assert csr_problem(bad, shape) is not None, (row_ptr, cols)


def test_layout_rejects_impossible_configs():
    with pytest.raises(ValueError):
        StorageConfig.affine(7, 32)
    with pytest.raises(ValueError):
        StorageConfig.affine(4, 48)
    with pytest.raises(ValueError):
        blob_specs((2, 70000), StorageConfig.affine(4, 32, 1))
    with pytest.raises(ValueError):
        blob_specs((2, 2), StorageConfig.affine(4, 32, 5))


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 40), inp=st.integers(1, 300), bits=st.sampled_from(SUPPORTED_BITS),
       rows=st.sampled_from(CODEBOOK_ROWS), outliers=st.integers(0, 5), seed=st.integers(0, 1000))
def test_lut_round_trip_matches_spec_formula(tmp_path_factory, out, inp, bits, rows, outliers, seed):
    """A lut tensor reads back bit-exact, and dequantizes as SPEC §7 says, element by element."""
    config = StorageConfig.lut(bits, rows, min(outliers, out * inp))
    path = tmp_path_factory.mktemp("lut") / "x.mxq"
    written = write_random_file(path, [("w", (out, inp), config)], seed=seed)["w"]
    with MxqFile.open(path) as f:
        assert f.verify() == []
        read = f.blobs("w")
        assert read.keys() == written.keys()
        for name in written:
            np.testing.assert_array_equal(read[name], written[name])
        weight = dequantize(read, (out, inp), config)
    codes = unpack_codes(written["qweight"], bits)
    expected = np.array([[np.float32(written["codebook"][r // rows, codes[r, c]]) for c in range(inp)]
                         for r in range(out)], np.float32).reshape(out, inp)
    if config.outliers:
        row_ptr = written["outlier_row_ptr"]
        for r in range(out):
            for i in range(row_ptr[r], row_ptr[r + 1]):
                expected[r, written["outlier_cols"][i]] += np.float32(written["outlier_values"][i])
    np.testing.assert_array_equal(weight, expected)


LABELS = ["fp16", "b4g32", "b3g64+o1234", "b2g128+o0.5%", "l4", "l3c8", "l2c32+o7", "l5c4+o0.25%", "l8",
          "v2d4g32", "v3d2g64+o12", "v4d2g128m8+o0.5%", "rows(3:v2d2g32,5:b4g64)"]


@pytest.mark.parametrize("label", LABELS)
def test_one_label_grammar_round_trips(label):
    """StorageConfig.parse and .label are inverse: the one grammar of CLI, inspect and docs."""
    config = StorageConfig.parse(label)
    assert config.label == label and StorageConfig.parse(config.label) == config


def test_label_grammar_rejects_and_resolves():
    for bad in ("b4", "b7g32", "b4g48", "l4c3", "l9", "l4g32", "b4g32+o", "b4g32+o-1", "B4G32", "l4+o1.5", " l4",
                "v3d4g32", "v2d3g32", "v2d4g48", "v2d4g32m7", "v2d4", "v2g32", "v2d4g32c2"):
        with pytest.raises(ValueError):
            StorageConfig.parse(bad)
    spec = StorageConfig.parse("l3c4+o1%")
    with pytest.raises(ValueError, match="unresolved"):
        tensor_nbytes((10, 100), spec)
    exact = spec.storage((10, 100))
    assert exact == StorageConfig.lut(3, 4, 10) and exact.label == "l3c4+o10" and exact.storage((1, 1)) == exact


def test_rows_cost_formula_in_spec_and_bytes_written(tmp_path):
    """SPEC §5: rows cost = 2·out (4·out past 65536 rows) + Σ the blocks' costs as tensors of their own;
    the writer emits exactly the cost model's bytes."""
    from test_rows_scheme import write_rows_file

    blocks = [StorageConfig.affine(3, 32, 2), StorageConfig.lut(4, 2), StorageConfig.fp16(), StorageConfig.affine(8, 128)]
    tensors = []
    for i, ((out, inp), k) in enumerate(itertools.product([(7, 33), (9, 130), (40, 64)], (2, 3, 4))):
        counts = [out // k] * (k - 1) + [out - (k - 1) * (out // k)]
        config = StorageConfig.rows(list(zip(counts, [blocks[(i + j) % 4] for j in range(k)])))
        expected = 2 * out + sum(tensor_nbytes((n, inp), block) for n, block in config.blocks)
        assert tensor_nbytes((out, inp), config) == expected
        tensors.append((f"t{i}", (out, inp), config))
    big = StorageConfig.rows([(65536, StorageConfig.fp16()), (1, StorageConfig.fp16())])
    assert tensor_nbytes((65537, 1), big) == 4 * 65537 + 2 * 65537
    path = tmp_path / "rows.mxq"
    write_rows_file(path, tensors)
    with MxqFile.open(path) as f:
        for name, shape, config in tensors:
            assert f.tensors[name].nbytes == tensor_nbytes(shape, config)
            assert sum(ref.nbytes for ref in f.tensors[name].blobs.values()) == tensor_nbytes(shape, config)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_six_bit_metadata_round_trips_and_is_unpacked_on_read(tmp_path, bits):
    """meta_bits 6 (SPEC §6.2): the writer packs the uint8 codes, the reader hands them back unpacked
    (the form every backend reads); the file holds exactly the cost model's bytes, and
    unpacked_extra_nbytes is what the unpacked codes take beyond their packed blobs."""
    from mxq.format_spec.layout import unpacked_extra_nbytes

    shape = (37, 200)  # out·G = 37·7 = 259 codes at g32: the last pack is padded
    config = StorageConfig.affine(bits, 32, 2, 6)
    assert config.label == (f"b{bits}g32+o2" if bits <= 3 else f"b{bits}g32m6+o2")
    assert StorageConfig.parse(config.label) == config
    path = tmp_path / "m6.mxq"
    written = write_random_file(path, [("t", shape, config)], blob_table=True)["t"]  # 1.4 without packed entries
    assert (written["scale_codes"].max() < 64) and written["scale_codes"].shape == (37, 7)
    with MxqFile.open(path) as f:
        assert f.verify() == [] and f.version == (1, 4)
        entry = f.tensors["t"]
        assert entry.config == config and entry.nbytes == tensor_nbytes(shape, config)
        assert entry.blobs["scale_codes"].dtype == "uint32" and entry.blobs["scale_codes"].shape == (6 * 9,)
        blobs = f.blobs("t")
        for name, array in written.items():
            np.testing.assert_array_equal(blobs[name], array)
        packed = entry.blobs["scale_codes"].nbytes + entry.blobs["zero_codes"].nbytes
        assert unpacked_extra_nbytes(shape, config) == blobs["scale_codes"].nbytes + blobs["zero_codes"].nbytes - packed
        np.testing.assert_array_equal(dequantize(blobs, shape, config), dequantize(written, shape, config))
    eight = StorageConfig.affine(bits, 32, 2, 8)
    assert unpacked_extra_nbytes(shape, eight) == 0 and tensor_nbytes(shape, eight) - tensor_nbytes(shape, config) == \
        2 * (37 * 7 - 4 * 6 * 9)


def test_the_8_bit_grid_of_a_codebook():
    """format_spec.int8_grid finds points = codes·2^e exactly (smallest e, codes in ±127), and nothing else;
    snap_to_int8_grid moves points there by at most half a step, and is the identity on grid points."""
    from mxq.format_spec import int8_grid, snap_to_int8_grid

    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (256, 4))
    codes[0, 0] = 127  # the largest coordinate sets e
    for e in (-10, -3, 0, 4):
        points = (codes * 2.0 ** e).astype(np.float16)
        found, exponent = int8_grid(points)
        assert exponent == e and np.array_equal(found, codes)
    assert int8_grid((codes * 2.0 ** -3 + 2.0 ** -5).astype(np.float16)) is None  # a quarter step off
    assert int8_grid(np.array([[1.0, np.inf, 0, 0]], np.float16)) is None
    assert int8_grid(np.array([[1.0, np.nan, 0, 0]], np.float16)) is None
    zero, e = int8_grid(np.zeros((16, 4), np.float16))
    assert not zero.any() and e == 0
    points = (rng.standard_normal((4096, 4)) * 1.5).astype(np.float16)
    assert int8_grid(points) is None
    snapped = snap_to_int8_grid(points)
    codes, e = int8_grid(snapped)
    assert np.abs(points.astype(np.float64) - snapped).max() <= 2.0 ** (e - 1)
    assert np.abs(points).max() <= 127 * 2.0 ** e < 2 * np.abs(points).max()
    assert np.array_equal(snap_to_int8_grid(snapped), snapped)

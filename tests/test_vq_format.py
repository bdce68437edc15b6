"""The `vq` scheme at the file level (SPEC.md §5, §12; format 1.6): config labels, the JSON config, the cost
model against the bytes the writer emits, versions, round trips through writer and reader, and the SPEC
formula element by element. Hostile vq files: test_corruption.py (HOSTILE_VQ_EDITS, and every truncation
and byte flip of a small vq file); a vq file built from SPEC.md alone: test_spec_document.py."""
from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import file_plans_and_blobs, random_blobs, random_vq_blobs, shared_codebook, write_random_file
from mxq.format_spec import (GROUP_SIZES, META_BITS, MxqFile, MxqFormatError, MxqWriter, StorageConfig, TensorPlan, blob_specs,
                             content_problem, dequantize, join_blocks, pack_codes, tensor_nbytes, unpack_codes)
from mxq.format_spec.header import SCHEME_MINOR, WORD_PADDED_VQ_MINOR, minor_version
from mxq.format_spec.layout import VQ_BITS, VQ_DIMS, VQ_INDEX_BITS, VQ_META_BITS, unpacked_extra_nbytes, vq_dims
from mxq.format_spec.summary import summarize

PAIRS = [(b, d) for b, d in itertools.product(VQ_BITS, VQ_DIMS) if b * d in VQ_INDEX_BITS]  # (bits, dim)
ALL_VQ = [StorageConfig.vq(b, d, g, o, m)
          for (b, d), g, m, o in itertools.product(PAIRS, GROUP_SIZES, META_BITS, (0, 3))]
# odd shapes: in below, at and past multiples of 32·dim and of the group sizes; a single weight
ODD_SHAPES = [(1, 1), (3, 31), (7, 33), (5, 63), (2, 65), (5, 96), (2, 130), (1, 129), (9, 576), (4, 1000)]


def test_the_allowed_pairs_are_the_contracts():
    """(bits, dim) ∈ {(2, 2), (3, 2), (4, 2), (2, 4)}: index bits 4, 6, 8 (SPEC §12)."""
    assert sorted(PAIRS) == [(2, 2), (2, 4), (3, 2), (4, 2)]
    assert sorted({b * d for b, d in PAIRS}) == [4, 6, 8] and VQ_META_BITS == 6
    assert all(StorageConfig.vq(b, d, 32).index_bits == b * d for b, d in PAIRS)


# -- labels ------------------------------------------------------------------------------------------------------
LABELS = ["v2d2g32", "v3d2g64", "v4d2g128", "v2d4g32", "v2d4g64m8", "v3d2g32+o12", "v4d2g128m8+o0.5%",
          "v2d2g128+o1", "rows(3:v2d4g32,5:b4g64)", "rows(2:v3d2g64m8+o1,2:l3,4:fp16)"]


@pytest.mark.parametrize("label", LABELS)
def test_vq_labels_round_trip(label):
    config = StorageConfig.parse(label)
    assert config.label == label and StorageConfig.parse(config.label) == config


def test_vq_label_fields_and_defaults():
    config = StorageConfig.parse("v3d2g64+o12")
    assert (config.scheme, config.bits, config.dim, config.group_size, config.meta_bits, config.outliers) == \
        ("vq", 3, 2, 64, 6, 12)
    assert config == StorageConfig.vq(3, 2, 64, 12) and config.index_bits == 6
    assert StorageConfig.parse("v2d4g32m6") == StorageConfig.vq(2, 4, 32)  # m6 is the default: not written
    assert StorageConfig.parse("v2d4g32m6").label == "v2d4g32"
    assert StorageConfig.parse("v2d4g32m8") == StorageConfig.vq(2, 4, 32, meta_bits=8)
    spec = StorageConfig.parse("v2d4g64+o1%")
    with pytest.raises(ValueError, match="unresolved"):
        tensor_nbytes((10, 100), spec)
    assert spec.storage((10, 100)) == StorageConfig.vq(2, 4, 64, 10) and spec.storage((10, 100)).label == "v2d4g64+o10"
    block = StorageConfig.parse("rows(2:v2d2g32+o1%,8:b4g32)").storage((10, 100))
    assert block.blocks[0][1] == StorageConfig.vq(2, 2, 32, 2)


@pytest.mark.parametrize("label", ["v3d4g32", "v2d3g32", "v2d4g48", "v2d4g32m7", "v4d4g32", "v1d2g32", "v5d2g32",
                                   "v2d1g32", "v2d8g32", "v2d4g16", "v2d4g32m4", "v2d4", "v2g32", "vd4g32",
                                   "v2d4g32c2", "V2d4g32", "v2d4g32+o", "v2d4g32+o-1", "v2d4g32m6m8", "v2d4g32 ",
                                   "rows(3:v3d4g32,5:b4g64)", "rows(8:v2d4g32)"])
def test_vq_labels_rejected(label):
    with pytest.raises(ValueError):
        StorageConfig.parse(label)


def test_vq_configs_rejected():
    for kwargs in ({"bits": 3, "dim": 4, "group_size": 32}, {"bits": 2, "dim": 0, "group_size": 32},
                   {"bits": 2, "dim": 2, "group_size": 0}, {"bits": 2, "dim": 2, "group_size": 32, "meta_bits": 7},
                   {"bits": 2, "dim": 2, "group_size": 32, "outliers": -1}):
        with pytest.raises(ValueError):
            StorageConfig.vq(**kwargs)
    with pytest.raises(ValueError):
        StorageConfig("vq", 2, 32, dim=2, codebook_rows=4)
    for scheme in ("affine", "lut"):  # dim belongs to vq alone
        with pytest.raises(ValueError, match="vector dimension"):
            StorageConfig(scheme, 4, 32 if scheme == "affine" else 0, dim=2, codebook_rows=0 if scheme == "affine" else 1)
    with pytest.raises(ValueError):
        blob_specs((2, 70000), StorageConfig.vq(2, 4, 32, 1))  # outlier columns are uint16
    with pytest.raises(ValueError):
        blob_specs((2, 2), StorageConfig.vq(2, 2, 32, 5))  # more outliers than weights
    with pytest.raises(ValueError):
        blob_specs((70,), StorageConfig.vq(2, 2, 32))


# -- the JSON config and the cost model --------------------------------------------------------------------------
def test_to_json_is_the_spec_config_object():
    config = StorageConfig.vq(3, 2, 64, 12, 8)
    assert config.to_json() == {"bits": 3, "dim": 2, "group_size": 64, "meta_bits": 8, "meta_group_size": 128,
                                "outliers": 12}
    assert list(StorageConfig.vq(2, 4, 32).to_json()) == ["bits", "dim", "group_size", "meta_bits", "meta_group_size",
                                                          "outliers"]
    with pytest.raises(ValueError, match="unresolved"):
        StorageConfig.parse("v2d4g32+o1%").to_json()


def _spec_cost(shape, config) -> int:
    """SPEC §5: out·S·k/8 + 2·d·2^k + |M| + 4·R + [4·(out+1) + 4·nnz]."""
    out, inp = shape
    k, d, g, nnz = config.index_bits, config.dim, config.group_size, config.outliers
    u = 32 // math.gcd(k, 32)
    S = math.ceil(math.ceil(inp / d) / u) * u
    G = math.ceil(inp / g)
    R = math.ceil(out * G / 128)
    M = out * G if config.meta_bits == 8 else 24 * math.ceil(out * G / 32)
    return out * S * k // 8 + 2 * d * 2 ** k + M + 4 * R + ((4 * (out + 1) + 4 * nnz) if nnz else 0)


def test_vq_blob_specs_and_cost_formula_in_spec():
    for shape, config in itertools.product(ODD_SHAPES + [(300, 4096), (1, 65536)], ALL_VQ):
        if config.outliers > math.prod(shape):
            continue
        out, inp = shape
        assert tensor_nbytes(shape, config) == _spec_cost(shape, config), (shape, config.label)
        specs = blob_specs(shape, config)
        names = ["qweight", "codebook", "scale_codes", "scale_meta"]
        assert list(specs) == names + (["outlier_row_ptr", "outlier_cols", "outlier_values"] if config.outliers else [])
        _, _, S, G = vq_dims(shape, config)
        u = {4: 8, 6: 16, 8: 4, 12: 8}[config.index_bits]  # SPEC §5's u = 32 / gcd(k, 32)
        assert (S, G) == (math.ceil(math.ceil(inp / config.dim) / u) * u, math.ceil(inp / config.group_size))
        assert (specs["qweight"].dtype, specs["qweight"].shape) == ("uint32", (out, S * config.index_bits // 32))
        _, _, S7, _ = vq_dims(shape, config, minor=7)  # 1.6 and 1.7: whole packs
        assert S7 == math.ceil(math.ceil(inp / config.dim) / 32) * 32
        assert blob_specs(shape, config, 7)["qweight"].shape == (out, S7 * config.index_bits // 32)
        assert (specs["codebook"].dtype, specs["codebook"].shape) == ("float16", (1 << config.index_bits, config.dim))
        assert specs["scale_meta"].shape == (math.ceil(out * G / 128), 2)
        assert "zero_codes" not in specs and "zero_meta" not in specs


def test_cost_model_equals_bytes_written(tmp_path):
    """Every vq config × odd shapes: the cost model's bytes are exactly the bytes the writer emits, and the file
    holds nothing but header, JSON, blobs and alignment gaps."""
    tensors = [(f"t{i}", shape, config) for i, (shape, config) in enumerate(itertools.product(ODD_SHAPES, ALL_VQ))
               if config.outliers <= math.prod(shape)]
    path = tmp_path / "all.mxq"
    write_random_file(path, tensors)
    with MxqFile.open(path) as f:
        assert f.verify() == [] and f.version == (1, 8)
        spans = [(f.tokenizer_blob.offset, f.tokenizer_blob.nbytes)]
        for name, shape, config in tensors:
            entry = f.tensors[name]
            assert entry.config == config and entry.nbytes == tensor_nbytes(shape, config), (name, shape, config)
            spans += [(ref.offset, ref.nbytes) for ref in entry.blobs.values()]
        spans.sort()
        gaps = [b[0] - (a[0] + a[1]) for a, b in zip(spans, spans[1:])]
        assert all(0 <= gap < f.alignment for gap in gaps)
        assert spans[-1][0] + spans[-1][1] == os.path.getsize(path)


def _rows_of(rng, shape, config):
    """Random blobs of a rows tensor (a random row order, random blocks), joined as SPEC §5 names them."""
    blocks = [random_blobs(rng, (count, shape[1]), block) for count, block in config.blocks]
    return join_blocks(rng.permutation(shape[0]), blocks)


def _write(path, tensors, seed=0, **writer_options) -> dict:
    """[(name, shape, config)] (rows configs too) with random content; returns {name: blobs}."""
    rng = np.random.default_rng(seed)
    plans = [TensorPlan(name, shape, config, "linear" if config.scheme != "fp16" else "norm")
             for name, shape, config in tensors]
    written = {plan.name: (_rows_of if plan.config.scheme == "rows" else random_blobs)(rng, plan.shape, plan.config)
               for plan in plans}
    plans, stored = file_plans_and_blobs(plans, written.get)  # + the shared codebooks they use (SPEC §12.4)
    with MxqWriter(path, model={"architecture": "llama"}, tokenizer={"kind": "sentencepiece"}, tokenizer_data=b"t",
                   tensors=plans, **writer_options) as writer:
        for plan in plans:
            writer.write(plan.name, stored[plan.name])
    return written


ROWS_WITH_VQ = [((10, 70), "rows(4:v3d2g32+o5,6:b4g64)"), ((13, 100), "rows(3:v2d4g64m8,7:l3+o2,3:fp16)"),
                ((9, 33), "rows(1:fp16,2:v4d2g128,6:v2d2g32m8+o3)"), ((40, 130), "rows(10:v2d4g32,30:b2g32)")]


def test_rows_with_vq_blocks_cost_and_round_trip(tmp_path):
    """SPEC §5, §8: a rows tensor's cost is 2·out + its blocks' as tensors of their own, vq blocks included;
    written, read and verified, it decodes as its blocks put in their logical rows."""
    tensors = [(f"t{i}", shape, StorageConfig.parse(label)) for i, (shape, label) in enumerate(ROWS_WITH_VQ)]
    for _, (out, inp), config in tensors:
        assert tensor_nbytes((out, inp), config) == 2 * out + sum(_spec_cost((n, inp), block) if block.scheme == "vq"
                                                                  else tensor_nbytes((n, inp), block)
                                                                  for n, block in config.blocks)
    path = tmp_path / "rows.mxq"
    written = _write(path, tensors)
    with MxqFile.open(path) as f:
        assert f.verify() == [] and f.version == (1, 8)
        for name, shape, config in tensors:
            entry = f.tensors[name]
            assert entry.config == config and entry.nbytes == tensor_nbytes(shape, config)
            blobs = f.blobs(name)
            assert content_problem(blobs, shape, config) is None
            for blob_name, array in written[name].items():
                np.testing.assert_array_equal(blobs[blob_name], array)
            weight = dequantize(blobs, shape, config)
            order, start = written[name]["row_order"].astype(np.int64), 0
            for i, (count, block) in enumerate(config.blocks):
                part = {k[len(f"{i}."):]: v for k, v in written[name].items() if k.startswith(f"{i}.")}
                np.testing.assert_array_equal(weight[order[start: start + count]],
                                              dequantize(part, (count, shape[1]), block))
                start += count


# -- versions ----------------------------------------------------------------------------------------------------
def test_a_file_with_vq_is_1_8_and_one_without_keeps_its_minor(tmp_path):
    """SPEC §10: writers write 8 when a tensor or a rows block uses vq (rows padded to words); otherwise the lower
    minor they wrote before (5 packed; 4 with 6-bit affine metadata in a blob table; 3 for the +xz tokenizer)."""
    vq, block = StorageConfig.parse("v2d4g32"), StorageConfig.parse("rows(2:v2d2g64,3:b4g32)")
    plain = [("a", (5, 70), StorageConfig.affine(4, 32)), ("c", (4, 40), StorageConfig.lut(3)),
             ("n", (7,), StorageConfig.fp16())]
    cases = [(plain + [("v", (5, 70), vq)], False, 8), (plain + [("v", (5, 70), vq)], True, 8),
             (plain + [("r", (5, 70), block)], False, 8), (plain + [("r", (5, 70), block)], True, 8),
             (plain, False, 5), (plain, True, 3), (plain + [("m", (5, 70), StorageConfig.affine(2, 32))], True, 4),
             (plain + [("r", (5, 70), StorageConfig.parse("rows(2:l2,3:b4g32)"))], True, 3)]
    for i, (tensors, blob_table, minor) in enumerate(cases):
        path = tmp_path / f"{i}.mxq"
        _write(path, tensors, blob_table=blob_table)
        with MxqFile.open(path) as f:
            assert f.version == (1, minor) and f.verify() == [], (i, f.version)
        assert minor_version([c for _, _, c in tensors], "sentencepiece+xz", packed=not blob_table) == minor
    assert SCHEME_MINOR["vq"] == 6 and WORD_PADDED_VQ_MINOR == 8
    assert minor_version([vq], "sentencepiece") == minor_version([block], "sentencepiece") == 8


# -- round trips and the SPEC formula ----------------------------------------------------------------------------
def _spec_formula(blobs, shape, config) -> np.ndarray:
    """SPEC §12.2 element by element: W[r, c] = s[r, c div g] · codebook[index[r, c div d], c mod d] (the fp16
    coordinate widened to fp32), s = u·step + min of the run of flat index r·G + k (§6.2), then the outliers."""
    out, inp = shape
    d, g = config.dim, config.group_size
    index = unpack_codes(blobs["qweight"], config.index_bits)  # (out, P·32): code j of row r is index[r, j]
    codes, meta, codebook = blobs["scale_codes"], blobs["scale_meta"], blobs["codebook"]
    G = math.ceil(inp / g)
    expected = np.zeros(shape, np.float32)
    for r in range(out):
        for c in range(inp):
            step, low = meta[(r * G + c // g) // 128].astype(np.float32)
            s = np.float32(codes[r, c // g]) * step + low
            expected[r, c] = s * np.float32(codebook[index[r, c // d], c % d])
    if config.outliers:
        row_ptr = blobs["outlier_row_ptr"]
        for r in range(out):
            for i in range(row_ptr[r], row_ptr[r + 1]):
                expected[r, blobs["outlier_cols"][i]] += np.float32(blobs["outlier_values"][i])
    return expected


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 24), inp=st.integers(1, 300), pair=st.sampled_from(PAIRS), group=st.sampled_from(GROUP_SIZES),
       meta=st.sampled_from(META_BITS), outliers=st.integers(0, 5), table=st.booleans(), seed=st.integers(0, 1000))
def test_round_trip_matches_spec_formula(tmp_path_factory, out, inp, pair, group, meta, outliers, table, seed):
    """A vq tensor reads back bit-exact (its JSON config is to_json's), verifies, and dequantizes as SPEC §12
    says, element by element; 6-bit scale codes come back unpacked, uint8 (out, G)."""
    config = StorageConfig.vq(*pair, group, min(outliers, out * inp), meta)
    path = tmp_path_factory.mktemp("vq") / "x.mxq"
    written = write_random_file(path, [("w", (out, inp), config), ("n", (inp,), StorageConfig.fp16())], seed=seed,
                                blob_table=table)["w"]
    with MxqFile.open(path) as f:
        assert f.verify() == [] and f.version == (1, 8)
        assert f.document["tensors"][0]["config"] == config.to_json() and f.tensors["w"].config == config
        read = f.blobs("w")
        assert read.keys() == written.keys()
        for name in written:
            np.testing.assert_array_equal(read[name], written[name])
            assert read[name].dtype == written[name].dtype
        assert read["scale_codes"].dtype == np.uint8 and read["scale_codes"].shape == (out, math.ceil(inp / group))
        assert content_problem(read, (out, inp), config) is None
        weight = dequantize(read, (out, inp), config)
    np.testing.assert_array_equal(weight, _spec_formula(written, (out, inp), config))


@pytest.mark.parametrize("meta", META_BITS)
def test_six_bit_scale_codes_are_packed_in_the_file(tmp_path, meta):
    """m = 6: the file holds the codes bit-packed (uint32 (6·ceil(out·G/32),)), the reader hands them back as
    uint8 (out, G), and unpacked_extra_nbytes is what that takes beyond the packed blob; m = 8: uint8 in place."""
    shape = (37, 200)  # out·G = 37·7 = 259 codes at g32: the last pack is padded
    config = StorageConfig.vq(3, 2, 32, 2, meta)
    path = tmp_path / "v.mxq"
    written = write_random_file(path, [("t", shape, config)])["t"]
    with MxqFile.open(path) as f:
        ref = f.tensors["t"].blobs["scale_codes"]
        blobs = f.blobs("t")
        assert blobs["scale_codes"].dtype == np.uint8 and blobs["scale_codes"].shape == (37, 7)
        np.testing.assert_array_equal(blobs["scale_codes"], written["scale_codes"])
        if meta == 6:
            assert (ref.dtype, ref.shape) == ("uint32", (6 * 9,)) and written["scale_codes"].max() < 64
            assert unpacked_extra_nbytes(shape, config) == 37 * 7 - ref.nbytes
        else:
            assert (ref.dtype, ref.shape) == ("uint8", (37, 7)) and unpacked_extra_nbytes(shape, config) == 0


def test_indices_stay_inside_the_codebook_whatever_the_bytes():
    """SPEC §12.2: an index has k bits, so any qweight bytes (all ones: every index 2^k − 1, padding too) pick
    a codebook point; any codebook bytes (inf, NaN) just propagate; padding indices and padding coordinates
    change nothing."""
    rng = np.random.default_rng(3)
    for (b, d), shape in itertools.product(PAIRS, [(3, 70), (2, 1), (4, 129)]):
        config = StorageConfig.vq(b, d, 32)
        blobs = random_vq_blobs(rng, shape, config)
        ones = dict(blobs, qweight=np.full_like(blobs["qweight"], 0xFFFFFFFF))
        last = ones["codebook"][-1].astype(np.float32)
        weight = dequantize(ones, shape, config)
        scale = dequantize(dict(ones, codebook=np.ones_like(ones["codebook"])), shape, config)  # s[r, c div g]
        np.testing.assert_array_equal(weight, scale * np.tile(last, shape[1])[: shape[1]])
        wild = dict(blobs, codebook=np.full_like(blobs["codebook"], np.inf))
        wild["codebook"][::3] = np.nan
        assert dequantize(wild, shape, config).shape == shape
        n_vectors = math.ceil(shape[1] / d)
        index = unpack_codes(blobs["qweight"], config.index_bits)
        index[:, n_vectors:] = rng.integers(0, 1 << config.index_bits, index[:, n_vectors:].shape)  # padding indices
        padded = dict(blobs, qweight=pack_codes(index, config.index_bits))
        np.testing.assert_array_equal(dequantize(padded, shape, config), dequantize(blobs, shape, config))


def test_bad_outliers_of_a_vq_tensor_are_a_content_problem():
    rng = np.random.default_rng(0)
    config = StorageConfig.vq(2, 4, 32, 3)
    blobs = random_vq_blobs(rng, (4, 40), config)
    assert content_problem(blobs, (4, 40), config) is None
    for bad in (dict(blobs, outlier_cols=np.array([40, 1, 2], np.uint16)),
                dict(blobs, outlier_row_ptr=np.array([0, 2, 1, 3, 3], np.uint32))):
        assert content_problem(bad, (4, 40), config) is not None


def test_writer_rejects_wrong_vq_blobs(tmp_path):
    config = StorageConfig.vq(3, 2, 32)
    plans = [TensorPlan("a", (4, 70), config)]  # V = 35 indices a row: P = 2 packs, 12 words
    good = random_vq_blobs(np.random.default_rng(0), (4, 70), config)
    for name, bad in (("codebook", good["codebook"][:16]), ("codebook", good["codebook"].astype(np.float32)),
                      ("qweight", good["qweight"][:, :6]), ("zero_codes", good["scale_codes"])):
        with pytest.raises(ValueError, match=f"tensor 'a'.*{name}"):
            with MxqWriter(tmp_path / "out.mxq", model={}, tokenizer={"kind": "sentencepiece"}, tokenizer_data=b"t",
                           tensors=plans) as w:
                w.write("a", dict(good, **{name: bad}))
        assert list(tmp_path.iterdir()) == []


# -- what `mxq inspect` reports ----------------------------------------------------------------------------------
def test_summary_and_inspect_report_vq(tmp_path):
    tensors = [("a", (16, 128), StorageConfig.affine(4, 32)), ("v", (16, 128), StorageConfig.vq(2, 4, 32)),
               ("w", (8, 128), StorageConfig.vq(3, 2, 64, 4, 8)), ("n", (7,), StorageConfig.fp16())]
    path = tmp_path / "s.mxq"
    write_random_file(path, tensors)
    with MxqFile.open(path) as f:
        report = summarize(f)
        vq_bytes = f.tensors["v"].nbytes + f.tensors["w"].nbytes
    totals = report["totals"]
    assert totals["bpw_vq"] == round(8 * vq_bytes / (16 * 128 + 8 * 128), 6)
    assert totals["linear_configs"] == {"b4g32": 1, "v2d4g32": 1, "v3d2g64m8": 1}
    assert [t["label"] for t in report["tensors"]] == ["b4g32", "v2d4g32", "v3d2g64m8+o4", "fp16"]
    assert report["version"] == "1.8"
    result = subprocess.run([sys.executable, "-m", "mxq.cli", "inspect", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"vq tensors {totals['bpw_vq']:.4f}" in result.stdout and "mxq format 1.8" in result.stdout


# -- shared codebooks (1.7, SPEC §12.4) ----------------------------------------------------------------------------
SHARED = [("a", (5, 70), StorageConfig.parse("v3d4g32s+o4")), ("b", (6, 130), StorageConfig.parse("v2d4g64m8s")),
          ("r", (9, 40), StorageConfig.parse("rows(2:v2d4g32s,4:v3d4g64s,3:b4g32)")), ("n", (7,), StorageConfig.fp16())]


def test_shared_labels_configs_and_costs():
    config = StorageConfig.parse("v3d4g32m8s+o5")
    assert (config.bits, config.dim, config.shared, config.meta_bits, config.index_bits) == (3, 4, True, 8, 12)
    assert config.label == "v3d4g32m8s+o5" and config.to_json()["shared"] is True
    assert "shared" not in StorageConfig.vq(2, 4, 32).to_json()  # 1.6 files keep their config objects
    with pytest.raises(ValueError, match="shared"):
        StorageConfig.vq(3, 4, 32)  # 12-bit indices only with a shared codebook
    with pytest.raises(ValueError):
        StorageConfig.parse("v3d4g32")
    with pytest.raises(ValueError, match="shared codebook"):
        StorageConfig("affine", 4, 32, shared=True)
    for shape, label in itertools.product(ODD_SHAPES, ["v3d4g32s", "v2d4g128s+o1", "v2d2g64m8s"]):
        config = StorageConfig.parse(label)
        specs = blob_specs(shape, config)
        assert "codebook" not in specs and list(specs)[:3] == ["qweight", "scale_codes", "scale_meta"]
        own = 2 * config.dim * 2 ** config.index_bits
        assert tensor_nbytes(shape, config) == _spec_cost(shape, config) - own
    assert minor_version([StorageConfig.parse("v2d4g32s")], "sentencepiece") == 8
    assert minor_version([StorageConfig.parse("rows(2:v3d4g32s,3:b4g32)")], "sentencepiece") == 8


def test_shared_codebooks_round_trip(tmp_path):
    """Written with their codebook tensors, read back: 1.8, the codebooks are apart from the model's tensors,
    every shared tensor and block gets the same codebook bytes, decodes by §12.2, and the file holds nothing
    else (cost model = bytes)."""
    path = tmp_path / "shared.mxq"
    written = _write(path, SHARED)
    with MxqFile.open(path) as f:
        assert f.version == (1, 8) and f.verify() == []
        assert sorted(f.codebooks) == ["codebook.v2d4", "codebook.v3d4"] and sorted(f.tensors) == ["a", "b", "n", "r"]
        assert all(e.role == "codebook" and e.shape == (1 << (3 * 4 if "v3" in e.name else 8), 4)
                   for e in f.codebooks.values())
        a, r = f.blobs("a"), f.blobs("r")
        np.testing.assert_array_equal(a["codebook"], shared_codebook(StorageConfig.parse("v3d4g32s")))
        assert np.shares_memory(a["codebook"], r["1.codebook"])  # views of the one codebook tensor
        for name, shape, config in SHARED:
            blobs = f.blobs(name)
            for blob_name, array in written[name].items():
                np.testing.assert_array_equal(blobs[blob_name], array)
            assert f.tensors[name].nbytes == tensor_nbytes(shape, config)
            if config.scheme == "vq":
                np.testing.assert_array_equal(dequantize(blobs, shape, config), _spec_formula(blobs, shape, config))
        total = sum(tensor_nbytes(s, c) for _, s, c in SHARED) + 2 * 4 * (4096 + 256)
        assert sum(e.nbytes for e in [*f.tensors.values(), *f.codebooks.values()]) == total
        assert summarize(f)["codebook_bytes"] == 2 * 4 * (4096 + 256)


def test_writer_needs_the_codebook_tensors(tmp_path):
    plans = [TensorPlan("a", (5, 70), StorageConfig.parse("v3d4g32s"), "linear")]
    for extra in ([], [TensorPlan("codebook.v3d4", (2048, 4), StorageConfig.fp16(), "codebook")],
                  [TensorPlan("codebook.v3d4", (4096, 4), StorageConfig.fp16(), "other")]):
        with pytest.raises(ValueError, match="shared codebook 'codebook.v3d4'"):
            MxqWriter(tmp_path / "x.mxq", model={}, tokenizer={"kind": "sentencepiece"}, tokenizer_data=b"t",
                      tensors=plans + extra)
    assert list(tmp_path.iterdir()) == []


def _entry(document, name):
    return next(t for t in document["tensors"] if t["name"] == name)


SHARED_HOSTILE = {  # edits of the shared file's JSON, each rejected at open with one line naming the tensor
    "codebook missing": (lambda d: d["tensors"].pop(), "'codebook.v3d4' is not in the file"),
    "codebook as a model tensor": (lambda d: _entry(d, "codebook.v3d4").update(role="other"), "not in the file"),
    "codebook shorter": (lambda d: _entry(d, "codebook.v3d4").update(shape=[2048, 4]), "shape [2048, 4] != [4096, 4]"),
    "codebook 1-D": (lambda d: _entry(d, "codebook.v2d4").update(shape=[1024]), "codebook tensor 'codebook.v2d4'"),
    "shared as a string": (lambda d: _entry(d, "a")["config"].update(shared="true"), "field 'shared'"),
    "12-bit indices unshared": (lambda d: _entry(d, "a")["config"].update(shared=False), "is not supported"),
    "block unshared": (lambda d: _entry(d, "r")["config"]["blocks"][1]["config"].pop("shared"), "block 1"),
    "dim 3": (lambda d: _entry(d, "a")["config"].update(dim=3), "is not supported"),
}


@pytest.mark.parametrize("name", list(SHARED_HOSTILE))
def test_hostile_shared_references_are_rejected(tmp_path, name):
    from test_corruption import _rewrite_json

    path = tmp_path / "shared.mxq"
    _write(path, SHARED)
    edit, message = SHARED_HOSTILE[name]
    target = tmp_path / "hostile.mxq"
    target.write_bytes(_rewrite_json(path.read_bytes(), edit))
    with pytest.raises(MxqFormatError) as caught:
        MxqFile.open(target)
    assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)

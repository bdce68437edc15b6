"""Builds a small .mxq file from SPEC.md alone — struct and json, none of mxq's writer or packing —
and checks that mxq's reader loads it and decodes the weights SPEC §6 (affine, 8- and 6-bit metadata),
§7 (lut), §8 (rows) and §12 (vq, 1.6; with the file's shared codebook, §12.4, 1.7; rows padded to words, 1.8,
or to packs, as 1.7 did) say it holds; six tensors
list their blobs (§4.2), three are packed (§4.1, 1.5). Also holds SPEC's text to the code where both state the same facts (schemes, grammar, versions)."""
import itertools
import json
import lzma
import math
import re
import struct
import zlib

import numpy as np
import pytest

from conftest import REPO
from mxq.format_spec import MxqFile, dequantize


def _bitstring_pack(codes, bits):
    """SPEC §5.1 by the letter: packs of 32 codes as a little-endian bit string in b words; a partial last pack
    (vq, §12.1) in the words its codes fill."""
    words = []
    for start in range(0, len(codes), 32):
        value = 0
        for j, code in enumerate(codes[start:start + 32]):
            value |= int(code) << (j * bits)
        words += [(value >> (32 * w)) & 0xFFFFFFFF for w in range(len(codes[start:start + 32]) * bits // 32)]
    return struct.pack(f"<{len(words)}I", *words)


def _vq_slots(n_vectors, index_bits, minor):
    """SPEC §12.1: a row's index slots — whole words (u = 32 / gcd(k, 32) indices) from 1.8, whole packs before."""
    unit = 32 // math.gcd(index_bits, 32) if minor >= 8 else 32
    return math.ceil(n_vectors / unit) * unit


@pytest.mark.parametrize("minor", [8, 7])
def test_reader_loads_a_file_written_from_the_spec(tmp_path, minor):
    out, inp, bits, g = 2, 40, 3, 32  # in not a multiple of g: G = 2 groups, last one padded
    G = math.ceil(inp / g)
    codes = [[(r * 7 + c) % 8 for c in range(inp)] + [0] * (G * g - inp) for r in range(out)]
    scale_codes, zero_codes = bytes([10, 20, 30, 40]), bytes([0, 255, 128, 64])
    scale_meta = struct.pack("<2e", 0.001, 0.01)   # step, min
    zero_meta = struct.pack("<2e", 0.015625, 1.0)
    row_ptr, cols, vals = struct.pack("<3I", 0, 1, 1), struct.pack("<H", 39), struct.pack("<e", 0.5)
    tokenizer = b"not really a sentencepiece model"
    blobs = {
        "qweight": ("uint32", [out, G * g * bits // 32], b"".join(_bitstring_pack(row, bits) for row in codes)),
        "scale_codes": ("uint8", [out, G], scale_codes), "scale_meta": ("float16", [1, 2], scale_meta),
        "zero_codes": ("uint8", [out, G], zero_codes), "zero_meta": ("float16", [1, 2], zero_meta),
        "outlier_row_ptr": ("uint32", [out + 1], row_ptr), "outlier_cols": ("uint16", [1], cols),
        "outlier_values": ("float16", [1], vals),
    }
    norm = struct.pack("<4e", 1.0, 2.0, -0.5, 0.25)
    # a lut tensor (SPEC §7): 5 rows, 40 inputs (P = 2 packs of 32, the second padded), 2 bits, one
    # codebook per 2 rows (C = 3), no outliers
    lut_out, lut_bits, lut_c = 5, 2, 2
    lut_codes = [[(r + 3 * c) % 4 for c in range(inp)] + [0] * (64 - inp) for r in range(lut_out)]
    levels = [[-1.5 + k + 0.25 * book for k in range(4)] for book in range(3)]
    lut_blobs = {
        "qweight": ("uint32", [lut_out, 2 * lut_bits], b"".join(_bitstring_pack(row, lut_bits) for row in lut_codes)),
        "codebook": ("float16", [3, 4], struct.pack("<12e", *[v for book in levels for v in book])),
    }
    # a rows tensor (SPEC §8): 3 rows of 40 inputs; block 0 = 1 fp16 row, block 1 = 2 rows of 2-bit lut with
    # one codebook per row; stored rows 0, 1, 2 are logical rows 2, 0, 1
    row_order = [2, 0, 1]
    fp16_row = [0.125 * (c % 5) - 0.25 for c in range(inp)]
    rows_codes = [[(2 * r + c) % 4 for c in range(inp)] + [0] * (64 - inp) for r in range(2)]
    rows_levels = [[-1.0, -0.5, 0.5, 1.0], [-2.0, 0.0, 1.0, 3.0]]
    rows_blobs = {
        "row_order": ("uint16", [3], struct.pack("<3H", *row_order)),
        "0.data": ("float16", [1, inp], struct.pack(f"<{inp}e", *fp16_row)),
        "1.qweight": ("uint32", [2, 2 * 2], b"".join(_bitstring_pack(row, 2) for row in rows_codes)),
        "1.codebook": ("float16", [2, 4], struct.pack("<8e", *[v for book in rows_levels for v in book])),
    }

    # an affine tensor with 6-bit metadata (SPEC §5, §6.2): 3 rows of 40 inputs, 2 bits, g = 32 (G = 2), so
    # out·G = 6 codes per metadata array, bit-packed as one §5.1 pack of 6-bit codes (6 words)
    m6_out, m6_bits = 3, 2
    m6_codes = [[(r + c) % 4 for c in range(inp)] + [0] * (G * g - inp) for r in range(m6_out)]
    m6_scale_codes, m6_zero_codes = [5, 63, 0, 17, 42, 1], [0, 32, 63, 7, 16, 60]
    m6_blobs = {
        "qweight": ("uint32", [m6_out, G * g * m6_bits // 32], b"".join(_bitstring_pack(row, m6_bits) for row in m6_codes)),
        "scale_codes": ("uint32", [6], _bitstring_pack(m6_scale_codes + [0] * 26, 6)),
        "scale_meta": ("float16", [1, 2], struct.pack("<2e", 0.0005, 0.002)),
        "zero_codes": ("uint32", [6], _bitstring_pack(m6_zero_codes + [0] * 26, 6)),
        "zero_meta": ("float16", [1, 2], struct.pack("<2e", 0.0625, -0.5)),
    }

    # a vq tensor (SPEC §5, §12): 3 rows of 70 inputs, bits 3, dim 2, so 6-bit indices (some cross words, §5.1);
    # V = 35 vectors per row (the last one's second coordinate, column 70, is padding), P = 2 packs of 32; g = 32
    # (G = 3, the last group padded); 6-bit scale codes (out·G = 9 codes, one packed §5.1 pack), signed scales;
    # one outlier at (1, 69). Listed with a blob table.
    vq_out, vq_in, vq_bits, vq_dim, vq_g = 3, 70, 3, 2, 32
    vq_k, vq_V, vq_G = vq_bits * vq_dim, math.ceil(vq_in / vq_dim), math.ceil(vq_in / vq_g)
    vq_S = _vq_slots(vq_V, vq_k, minor)  # 48 slots in 9 words (1.8), 64 in 12 (1.7)
    vq_index = [[(r * 29 + j * 11 + 5) % 64 for j in range(vq_V)] + [0] * (vq_S - vq_V) for r in range(vq_out)]
    vq_points = [[(i - 32) * 0.0625, (i % 7) * 0.25 - 0.75] for i in range(1 << vq_k)]
    vq_scale_codes = [0, 63, 31, 7, 50, 12, 1, 40, 22]
    vq_scale_meta = (0.0078125, -0.25)  # step, min: scales from -0.25 to 0.242
    vq_blobs = {
        "qweight": ("uint32", [vq_out, vq_S * vq_k // 32], b"".join(_bitstring_pack(row, vq_k) for row in vq_index)),
        "codebook": ("float16", [1 << vq_k, vq_dim], struct.pack(f"<{2 << vq_k}e", *[v for p in vq_points for v in p])),
        "scale_codes": ("uint32", [6], _bitstring_pack(vq_scale_codes + [0] * 23, 6)),
        "scale_meta": ("float16", [1, 2], struct.pack("<2e", *vq_scale_meta)),
        "outlier_row_ptr": ("uint32", [vq_out + 1], struct.pack("<4I", 0, 0, 1, 1)),
        "outlier_cols": ("uint16", [1], struct.pack("<H", 69)), "outlier_values": ("float16", [1], struct.pack("<e", -2.0)),
    }
    # a packed vq tensor: 2 rows of 70 inputs, bits 2, dim 4 (8-bit indices into 256 points of 4 coordinates),
    # V = 18 (columns 70, 71 padding), P = 1; g = 64 (G = 2); 8-bit scale codes, uint8 (out, G); no outliers
    vq8_out, vq8_dim, vq8_g = 2, 4, 64
    vq8_V, vq8_G = math.ceil(vq_in / vq8_dim), math.ceil(vq_in / vq8_g)
    vq8_S = _vq_slots(vq8_V, 8, minor)  # 20 slots in 5 words (1.8), 32 in 8 (1.7)
    vq8_index = [[(r * 97 + j * 37 + 3) % 256 for j in range(vq8_V)] + [0] * (vq8_S - vq8_V) for r in range(vq8_out)]
    vq8_points = [[(i % 16) * 0.125 - 1.0, (i // 16) * 0.0625, -0.5 * (i % 3), 0.25 * (i % 5) - 0.5] for i in range(256)]
    vq8_scale_codes = [200, 3, 255, 128]
    vq8_scale_meta = (0.001, -0.12)
    vq8_blobs = {
        "qweight": ("uint32", [vq8_out, vq8_S // 4], b"".join(_bitstring_pack(row, 8) for row in vq8_index)),
        "codebook": ("float16", [256, vq8_dim], struct.pack("<1024e", *[v for p in vq8_points for v in p])),
        "scale_codes": ("uint8", [vq8_out, vq8_G], bytes(vq8_scale_codes)),
        "scale_meta": ("float16", [1, 2], struct.pack("<2e", *vq8_scale_meta)),
    }
    # a vq tensor with the file's shared codebook (SPEC §12.4, 1.7): 2 rows of 70 inputs, bits 3, dim 4, so 12-bit
    # indices (§12.1: two indices in 3 bytes) into the tensor codebook.v3d4 of 4096 points; no codebook blob of
    # its own; g = 32 (G = 3), 6-bit scale codes
    vs_out, vs_dim, vs_g = 2, 4, 32
    vs_V, vs_G = math.ceil(vq_in / vs_dim), math.ceil(vq_in / vs_g)
    vs_S = _vq_slots(vs_V, 12, minor)  # 24 slots in 9 words (1.8), 32 in 12 (1.7)
    vs_index = [[(r * 1237 + j * 389 + 17) % 4096 for j in range(vs_V)] + [0] * (vs_S - vs_V) for r in range(vs_out)]
    vs_points = [[(i % 64) * 0.03125 - 1.0, (i // 64) * 0.015625, 0.5 - 0.25 * (i % 5), -0.125 * (i % 9)]
                 for i in range(4096)]
    vs_scale_codes = [5, 60, 33, 0, 63, 17]
    vs_scale_meta = (0.0039062, -0.1)
    vs_blobs = {
        "qweight": ("uint32", [vs_out, vs_S * 12 // 32], b"".join(_bitstring_pack(row, 12) for row in vs_index)),
        "scale_codes": ("uint32", [6], _bitstring_pack(vs_scale_codes + [0] * 26, 6)),
        "scale_meta": ("float16", [1, 2], struct.pack("<2e", *vs_scale_meta)),
    }
    vs_codebook = struct.pack("<16384e", *[v for p in vs_points for v in p])

    alignment = 64
    data_offset = 8192  # generous, a multiple of alignment
    cursor, payload, document_blobs = data_offset, [], {}

    def place(data, dtype, shape):
        nonlocal cursor
        offset = -(-cursor // alignment) * alignment
        payload.append((offset, data))
        cursor = offset + len(data)
        return {"dtype": dtype, "shape": shape, "offset": offset, "nbytes": len(data),
                "crc32": format(zlib.crc32(data), "08x")}

    packed = lzma.compress(tokenizer, format=lzma.FORMAT_XZ)  # §3.2: a +xz kind
    tokenizer_blob = place(packed, "uint8", [len(packed)])
    for name, (dtype, shape, data) in blobs.items():
        document_blobs[name] = place(data, dtype, shape)
    lut_document_blobs = {name: place(data, dtype, shape) for name, (dtype, shape, data) in lut_blobs.items()}
    rows_document_blobs = {name: place(data, dtype, shape) for name, (dtype, shape, data) in rows_blobs.items()}
    vq_document_blobs = {name: place(data, dtype, shape) for name, (dtype, shape, data) in vq_blobs.items()}
    m6_document_blobs = {name: place(data, dtype, shape) for name, (dtype, shape, data) in m6_blobs.items()}
    vq8_document_blobs = {name: place(data, dtype, shape) for name, (dtype, shape, data) in vq8_blobs.items()}
    norm_blob = place(norm, "float16", [4])
    vs_document_blobs = {name: place(data, dtype, shape) for name, (dtype, shape, data) in vs_blobs.items()}
    codebook_blob = place(vs_codebook, "float16", [4096, 4])
    # §4.1's packed form for x, p and norm: the first blob's offset, one CRC-32 over the blobs' bytes
    m6_packed = {"offset": m6_document_blobs["qweight"]["offset"],
                 "crc32": format(zlib.crc32(b"".join(data for _, _, data in m6_blobs.values())), "08x")}
    vq8_packed = {"offset": vq8_document_blobs["qweight"]["offset"],
                  "crc32": format(zlib.crc32(b"".join(data for _, _, data in vq8_blobs.values())), "08x")}
    norm_packed = {"offset": norm_blob["offset"], "crc32": norm_blob["crc32"]}
    document = {
        "format": "mxq", "alignment": alignment,
        "model": {"architecture": "llama", "hidden_size": 4, "a_future_key": [1, 2]},
        "tokenizer": {"kind": "sentencepiece+xz", "raw_nbytes": len(tokenizer), "blob": tokenizer_blob,
                      "bos_token_id": 1, "eos_token_ids": [2],
                      "add_bos_token": True, "chat_template": None},
        "quantization": {}, "provenance": {"note": "hand-made"},
        "tensors": [
            {"name": "w", "shape": [out, inp], "role": "linear", "scheme": "affine",
             "config": {"bits": bits, "group_size": g, "meta_bits": 8, "meta_group_size": 128, "outliers": 1},
             "blobs": document_blobs, "unknown_key": "ignored"},
            {"name": "v", "shape": [lut_out, inp], "role": "linear", "scheme": "lut",
             "config": {"bits": lut_bits, "codebook_rows": lut_c, "outliers": 0}, "blobs": lut_document_blobs},
            {"name": "u", "shape": [3, inp], "role": "linear", "scheme": "rows",
             "config": {"blocks": [{"rows": 1, "scheme": "fp16", "config": {}},
                                   {"rows": 2, "scheme": "lut", "config": {"bits": 2, "codebook_rows": 1, "outliers": 0}}]},
             "blobs": rows_document_blobs},
            {"name": "q", "shape": [vq_out, vq_in], "role": "linear", "scheme": "vq",
             "config": {"bits": vq_bits, "dim": vq_dim, "group_size": vq_g, "meta_bits": 6, "meta_group_size": 128,
                        "outliers": 1}, "blobs": vq_document_blobs},
            {"name": "x", "shape": [m6_out, inp], "role": "linear", "scheme": "affine",
             "config": {"bits": m6_bits, "group_size": g, "meta_bits": 6, "meta_group_size": 128, "outliers": 0},
             **m6_packed},
            {"name": "p", "shape": [vq8_out, vq_in], "role": "linear", "scheme": "vq",
             "config": {"bits": 2, "dim": vq8_dim, "group_size": vq8_g, "meta_bits": 8, "meta_group_size": 128,
                        "outliers": 0}, **vq8_packed},
            {"name": "norm", "shape": [4], "role": "norm", "scheme": "fp16", "config": {}, **norm_packed},
            {"name": "s", "shape": [vs_out, vq_in], "role": "linear", "scheme": "vq",
             "config": {"bits": 3, "dim": vs_dim, "group_size": vs_g, "meta_bits": 6, "meta_group_size": 128,
                        "outliers": 0, "shared": True}, "blobs": vs_document_blobs},
            {"name": "codebook.v3d4", "shape": [4096, 4], "role": "codebook", "scheme": "fp16", "config": {},
             "blobs": {"data": codebook_blob}},
        ],
    }
    json_bytes = json.dumps(document).encode()
    assert 32 + len(json_bytes) <= data_offset
    header = b"\x89MXQ\r\n\x1a\n" + struct.pack("<HHIQQ", 1, minor, zlib.crc32(json_bytes), len(json_bytes), data_offset)
    image = bytearray(header + json_bytes + b"\0" * (data_offset - 32 - len(json_bytes)))
    for offset, data in payload:
        image += b"\0" * (offset - len(image)) + data
    path = tmp_path / "by_hand.mxq"
    path.write_bytes(bytes(image))

    with MxqFile.open(path) as f:
        assert f.verify() == []
        assert f.tokenizer_data() == tokenizer
        entry = f.tensors["w"]
        weight = dequantize(f.blobs("w"), entry.shape, entry.config)
        lut_entry = f.tensors["v"]
        lut_weight = dequantize(f.blobs("v"), lut_entry.shape, lut_entry.config)
        rows_entry = f.tensors["u"]
        rows_weight = dequantize(f.blobs("u"), rows_entry.shape, rows_entry.config)
        m6_entry = f.tensors["x"]
        assert m6_entry.config.meta_bits == 6 and m6_entry.config.label == "b2g32"
        m6_weight = dequantize(f.blobs("x"), m6_entry.shape, m6_entry.config)
        assert [ref.offset for ref in m6_entry.blobs.values()] == [b["offset"] for b in m6_document_blobs.values()]
        assert f.version == (1, minor) and list(f.codebooks) == ["codebook.v3d4"] and "codebook.v3d4" not in f.tensors
        vq_entry, vq8_entry = f.tensors["q"], f.tensors["p"]
        assert (vq_entry.config.label, vq8_entry.config.label) == ("v3d2g32+o1", "v2d4g64m8")
        vq_weight = dequantize(f.blobs("q"), vq_entry.shape, vq_entry.config)
        vq8_weight = dequantize(f.blobs("p"), vq8_entry.shape, vq8_entry.config)
        assert [ref.offset for ref in vq8_entry.blobs.values()] == [b["offset"] for b in vq8_document_blobs.values()]
        np.testing.assert_array_equal(f.blobs("norm")["data"], np.array([1.0, 2.0, -0.5, 0.25], np.float16))
        vs_entry = f.tensors["s"]
        assert vs_entry.config.label == "v3d4g32s" and vs_entry.config.index_bits == 12
        vs_weight = dequantize(f.blobs("s"), vs_entry.shape, vs_entry.config)
    # SPEC §6: w = (q - z)·s, s = u·step + min per run of 128 flat (row, group) values; outlier added.
    expected = _affine_by_hand(codes, scale_codes, (0.001, 0.01), zero_codes, (0.015625, 1.0), inp, g, G)
    expected[0, 39] += np.float32(0.5)
    np.testing.assert_array_equal(weight, expected)
    # SPEC §7: W[r, c] = codebook[r div codebook_rows, q]
    lut_expected = np.array([[levels[r // lut_c][lut_codes[r][c]] for c in range(inp)] for r in range(lut_out)],
                            np.float32)
    np.testing.assert_array_equal(lut_weight, lut_expected)
    # SPEC §8: W[row_order[start_i + j]] = B_i[j]
    rows_expected = np.zeros((3, inp), np.float32)
    rows_expected[row_order[0]] = fp16_row
    for j in range(2):
        rows_expected[row_order[1 + j]] = [rows_levels[j][rows_codes[j][c]] for c in range(inp)]
    np.testing.assert_array_equal(rows_weight, rows_expected)
    # SPEC §6.2 with m = 6: flat code i = r·G + k is code i of the packed stream
    m6_expected = _affine_by_hand(m6_codes, m6_scale_codes, (0.0005, 0.002), m6_zero_codes, (0.0625, -0.5), inp, g, G)
    np.testing.assert_array_equal(m6_weight, m6_expected)
    # SPEC §12.2: W[r, c] = s[r, c div g] · codebook[index[r, c div d], c mod d], s by §6.2; outlier added (§6.1)
    vq_expected = _vq_by_hand(vq_index, vq_points, vq_scale_codes, vq_scale_meta, vq_in, vq_dim, vq_g)
    vq_expected[1, 69] += np.float32(-2.0)
    np.testing.assert_array_equal(vq_weight, vq_expected)
    assert np.any(vq_expected < 0) and np.any(vq_expected > 0)
    np.testing.assert_array_equal(vq8_weight, _vq_by_hand(vq8_index, vq8_points, vq8_scale_codes, vq8_scale_meta,
                                                          vq_in, vq8_dim, vq8_g))
    # SPEC §12.4: the same formula with the file's codebook tensor
    np.testing.assert_array_equal(vs_weight, _vq_by_hand(vs_index, vs_points, vs_scale_codes, vs_scale_meta, vq_in,
                                                         vs_dim, vs_g))


def _vq_by_hand(index, points, scale_codes, scale_meta, inp, dim, g) -> np.ndarray:
    """SPEC §12.2 for one run of metadata, element by element: the fp16 coordinate widened to fp32 times the
    fp32 scale u·step + min (fp16 step and min), the scale code of (r, k) at flat index r·G + k."""
    step, low = (np.float32(np.float16(v)) for v in scale_meta)
    G = math.ceil(inp / g)
    expected = np.zeros((len(index), inp), np.float32)
    for r in range(len(index)):
        for c in range(inp):
            s = np.float32(scale_codes[r * G + c // g]) * step + low
            expected[r, c] = s * np.float32(np.float16(points[index[r][c // dim]][c % dim]))
    return expected


def _affine_by_hand(codes, scale_codes, scale_meta, zero_codes, zero_meta, inp, g, G) -> np.ndarray:
    """SPEC §6.1–6.2 for one run of metadata: W[r, c] = (q − z)·s with s = u·step + min (fp16 step, min)."""
    (step_s, min_s), (step_z, min_z) = (np.float16(v).astype(np.float32) for v in scale_meta), \
        (np.float16(v).astype(np.float32) for v in zero_meta)
    expected = np.zeros((len(codes), inp), np.float32)
    for r in range(len(codes)):
        for c in range(inp):
            k = c // g
            s = np.float32(scale_codes[r * G + k]) * step_s + min_s
            z = np.float32(zero_codes[r * G + k]) * step_z + min_z
            expected[r, c] = (np.float32(codes[r][c]) - z) * s
    return expected


def test_spec_text_agrees_with_the_code():
    """Where SPEC.md and format_spec state the same facts, they agree: the version in the title, the schemes
    of §4.1, the block schemes of §8 and §9, the minors of §10, every label example of §11, and §12's
    config keys and allowed values."""
    from mxq.format_spec import BLOCK_SCHEMES, GROUP_SIZES, META_BITS, MINOR_VERSION, SCHEMES, StorageConfig
    from mxq.format_spec.header import SCHEME_MINOR, SHARED_CODEBOOK_MINOR, WORD_PADDED_VQ_MINOR
    from mxq.format_spec.packing import word_unit
    from mxq.format_spec.layout import (CODEBOOK_ROLE, TRELLIS_BITS, TRELLIS_TABLE_SHAPE, TRELLIS_WINDOW_BITS, VQ_BITS,
                                        VQ_DIMS, VQ_INDEX_BITS, VQ_SHARED_INDEX_BITS, shared_codebook_name,
                                        trellis_table_name)

    text = (REPO / "format_spec" / "SPEC.md").read_text(encoding="utf-8")
    flat = " ".join(text.split())  # sentences broken across lines read as one
    ticked = lambda fragment: set(re.findall(r"`([^`]+)`", fragment))  # noqa: E731
    assert text.splitlines()[0] == f"# The `.mxq` file format, version 1.{MINOR_VERSION}"
    scheme_row = next(line for line in text.splitlines() if line.startswith("| `scheme` |"))
    assert ticked(scheme_row.split("|")[3]) == set(SCHEMES)
    config_row = next(line for line in text.splitlines() if line.startswith("| `config` |"))
    assert ticked(config_row.split("|")[3]) - {"{}"} == set(SCHEMES)
    assert ticked(re.search(r"`s_i` one of (.*?) \(a block", flat)[1]) == set(BLOCK_SCHEMES)
    assert ticked(re.search(r"a block whose scheme is not (.*?) or whose config", flat)[1]) == set(BLOCK_SCHEMES)
    for scheme, minor in SCHEME_MINOR.items():
        if minor > 1 or scheme == "lut":
            assert re.search(rf"1\.{minor}(?: added)? the `{scheme}` scheme", flat), (scheme, minor)
    assert f"{WORD_PADDED_VQ_MINOR} when a tensor or a `rows` block uses `vq`" in flat
    assert f"{SHARED_CODEBOOK_MINOR} when a tensor or a block uses a shared codebook, else {SCHEME_MINOR['vq']}" in flat
    assert f"1.{WORD_PADDED_VQ_MINOR} `vq` rows padded to whole words" in flat
    units = re.search(r"fill whole uint32 words: (\d+) at `k` = (\d+) and (\d+), (\d+) at (\d+), (\d+) at (\d+)\)", flat)
    u = list(map(int, units.groups()))
    assert [word_unit(k) for k in (u[1], u[2], u[4], u[6])] == [u[0], u[0], u[3], u[5]]
    examples = ticked(re.search(r"## 11\. .*? Examples: (.*?)\. ##", flat)[1])
    assert {"v2d4g32", "rows(144:v2d4g64,432:b4g64)"} <= examples
    for label in examples:
        assert StorageConfig.parse(label).label == label, label
    vq = flat[flat.index("## 12. The `vq` scheme"):]
    keys = re.search(r"config`: \{(.*?)\}", vq)[1]
    assert re.findall(r'"(\w+)"', keys) == list(StorageConfig.vq(2, 4, 32, shared=True).to_json())
    pairs = {tuple(map(int, pair)) for pair in re.findall(r"\((\d), (\d)\)", re.search(r"`\(b, d\)` ∈ \{(.*?)\} ", vq)[1])}
    assert pairs == {(b, d) for b, d in itertools.product(VQ_BITS, VQ_DIMS) if b * d in VQ_INDEX_BITS}
    shared_pair = tuple(map(int, re.search(r"a shared config may also have `\(b, d\)` = \((\d), (\d)\)", vq).groups()))
    assert {(b, d) for b, d in itertools.product(VQ_BITS, VQ_DIMS) if b * d in VQ_SHARED_INDEX_BITS} == pairs | {shared_pair}
    assert shared_codebook_name(3, 4) in flat and f"`{CODEBOOK_ROLE}`" in flat
    assert f"g ∈ {{{', '.join(map(str, GROUP_SIZES))}}}, m ∈ {{{', '.join(map(str, sorted(META_BITS)))}}}" in vq
    trellis = flat[flat.index("## 13. The `trellis` scheme"):]
    keys = re.search(r"config`: \{(.*?)\}", trellis)[1]
    assert re.findall(r'"(\w+)"', keys) == list(StorageConfig.trellis(4, 64).to_json())
    assert f'"window_bits": {TRELLIS_WINDOW_BITS}' in trellis and f"L = {TRELLIS_WINDOW_BITS}" in trellis
    assert f"K ∈ {{{', '.join(map(str, TRELLIS_BITS))}}}, g ∈ {{{', '.join(map(str, GROUP_SIZES))}}}" in trellis
    assert f"`{trellis_table_name(4)}`" in trellis and str(list(TRELLIS_TABLE_SHAPE)).replace("[", "(").replace("]", ")") in trellis
    assert f"{SCHEME_MINOR['trellis']} when a tensor or a `rows` block uses `trellis`" in flat

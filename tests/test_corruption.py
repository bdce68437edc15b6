"""Damaged and hostile files: the reader raises MxqFormatError or verify reports a problem —
never another exception, a crash, a hang or a huge allocation; the CLI prints one line."""
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from mxq.format_spec import MxqFile, MxqFormatError, StorageConfig


SMALL_TENSORS = {  # the small valid files the corruption tests damage
    "affine": [("a", (5, 70), StorageConfig.affine(3, 32, 4)),  # as conftest's small_file
               ("b", (3, 128), StorageConfig.affine(4, 64)),
               ("n", (7,), StorageConfig.fp16())],
    "lut": [("a", (5, 70), StorageConfig.lut(3, 1, 4)),  # per channel with outliers, per 4 channels
            ("b", (6, 40), StorageConfig.lut(2, 4)),
            ("n", (7,), StorageConfig.fp16())],
    "rows": [("a", (6, 40), StorageConfig.parse("rows(2:b3g32+o2,4:l2)")),  # affine block with outliers, lut block
             ("n", (7,), StorageConfig.fp16())],
    "vq": [("a", (5, 70), StorageConfig.parse("v3d2g32+o4")),  # 6-bit indices and scale codes, outliers
           ("b", (6, 40), StorageConfig.parse("v2d4g64m8")),  # 8-bit indices into 4-D points, 8-bit scale codes
           ("r", (6, 40), StorageConfig.parse("rows(2:v2d2g32+o1,4:b3g32)")),  # a vq block (1.6)
           ("n", (7,), StorageConfig.fp16())],
    "vq-shared": [("a", (5, 70), StorageConfig.parse("v3d4g32s+o4")),  # 12-bit indices into the shared codebook
                  ("r", (6, 40), StorageConfig.parse("rows(2:v2d4g32s,4:v3d4g64m8s)")),  # shared-codebook blocks
                  ("n", (7,), StorageConfig.fp16())],  # then the codebook tensors codebook.v2d4, codebook.v3d4 (1.7)
}


def _small(kind, tmp_path, **writer_options):
    """(path, tensors, blobs) of a small valid file of SMALL_TENSORS[kind]; blob_table=True writes the
    1.0–1.4 form of the tensor entries (a blob object each) instead of the packed one."""
    from conftest import write_random_file
    from test_rows_scheme import write_rows_file

    path = tmp_path / f"small-{kind}{'-table' if writer_options.get('blob_table') else ''}.mxq"
    tensors = SMALL_TENSORS[kind]
    write = write_rows_file if kind in ("rows", "vq", "vq-shared") else write_random_file
    return path, tensors, write(path, tensors, **writer_options)


@pytest.fixture
def small_lut_file(tmp_path):
    return _small("lut", tmp_path)


@pytest.fixture
def small_rows_file(tmp_path):
    return _small("rows", tmp_path)


@pytest.fixture
def small_vq_file(tmp_path):
    return _small("vq", tmp_path)


@pytest.fixture
def small_table_file(tmp_path):
    return _small("affine", tmp_path, blob_table=True)


@pytest.fixture
def small_vq_shared_file(tmp_path):
    return _small("vq-shared", tmp_path)


@pytest.fixture(params=["affine", "lut", "rows", "vq", "vq-shared", "affine-table"])
def any_small_file(request):
    """The small affine, lut, rows, vq and shared-codebook vq files, and the affine one with a blob table: every
    corruption test runs on each."""
    return request.getfixturevalue({"affine": "small_file", "lut": "small_lut_file", "rows": "small_rows_file",
                                    "vq": "small_vq_file", "vq-shared": "small_vq_shared_file",
                                    "affine-table": "small_table_file"}[request.param])


def _outcome(path):
    """'error' (typed error at open), 'damaged' (verify finds a problem) or 'ok'."""
    try:
        with MxqFile.open(path) as f:
            return "damaged" if f.verify() else "ok"
    except MxqFormatError:
        return "error"


def _rewrite_json(image: bytes, edit, room: int = 256) -> bytes:
    """Apply `edit` to the JSON document and re-seal it with a correct checksum and header.
    The data region moves `room` bytes later (offsets adjusted first) so the JSON may grow."""
    _, major, minor, _, json_nbytes, data_offset = struct.unpack_from("<8sHHIQQ", image)
    document = json.loads(image[32: 32 + json_nbytes])
    placed = [document["tokenizer"]["blob"]] + [b for t in document["tensors"] for b in t.get("blobs", {}).values()]
    for item in placed + [t for t in document["tensors"] if "offset" in t]:  # blobs, packed tensor entries
        item["offset"] += room
    edit(document)
    raw = json.dumps(document, separators=(",", ":")).encode()
    new_offset = data_offset + room
    assert 32 + len(raw) <= new_offset
    header = b"\x89MXQ\r\n\x1a\n" + struct.pack("<HHIQQ", major, minor, zlib.crc32(raw), len(raw), new_offset)
    return header + raw + b"\0" * (new_offset - 32 - len(raw)) + image[data_offset:]


def test_every_truncation_is_rejected(any_small_file, tmp_path):
    path, _, _ = any_small_file
    image = path.read_bytes()
    target = tmp_path / "cut.mxq"
    for length in range(len(image)):
        target.write_bytes(image[:length])
        assert _outcome(target) == "error", length


def test_every_single_byte_flip_is_caught(any_small_file, tmp_path):
    path, _, _ = any_small_file
    image = bytearray(path.read_bytes())
    target = tmp_path / "flip.mxq"
    rng = np.random.default_rng(0)
    for position in range(len(image)):
        if position in (10, 11):  # minor_version: any minor of major 1 is readable by design
            continue
        damaged = bytearray(image)
        damaged[position] ^= int(rng.integers(1, 256))
        target.write_bytes(bytes(damaged))
        assert _outcome(target) in ("error", "damaged"), position


def _first_blob(document):
    return document["tensors"][0]["blobs"]["qweight"]


def _tensor(document, index=0):
    return document["tensors"][index]


BLOB_TABLE_EDITS = {  # on a file whose tensor entries list their blobs (the 1.0–1.4 form)
    "huge offset": lambda d: _first_blob(d).update(offset=2**61),
    "offset past end": lambda d: _first_blob(d).update(offset=_first_blob(d)["offset"] + 2**20),
    "negative offset": lambda d: _first_blob(d).update(offset=-64),
    "float offset": lambda d: _first_blob(d).update(offset=64.0),
    "bool nbytes": lambda d: _first_blob(d).update(nbytes=True),
    "unaligned offset": lambda d: _first_blob(d).update(offset=_first_blob(d)["offset"] + 4),
    "nbytes mismatch": lambda d: _first_blob(d).update(nbytes=_first_blob(d)["nbytes"] + 4),
    "shape not matching blobs": lambda d: d["tensors"][0].update(shape=[5, 200]),
    "wrong dtype": lambda d: _first_blob(d).update(dtype="float64"),
    "missing blob": lambda d: d["tensors"][0]["blobs"].pop("zero_meta"),
    "extra blob": lambda d: d["tensors"][0]["blobs"].update(extra=_first_blob(d)),
    "overlap": lambda d: d["tensors"][1]["blobs"]["qweight"].update(offset=_first_blob(d)["offset"]),
    "bad crc text": lambda d: _first_blob(d).update(crc32="xyz"),
    "packed fields too": lambda d: _tensor(d).update(offset=_first_blob(d)["offset"], crc32="00000000"),
    "packed crc32 too": lambda d: _tensor(d).update(crc32=_first_blob(d)["crc32"]),
    "meta bits 6 read as 8": lambda d: d["tensors"][0]["config"].update(meta_bits=8),  # packed blobs, uint8 expected
    "meta bits 8 read as 6": lambda d: d["tensors"][1]["config"].update(meta_bits=6),
}

HOSTILE_EDITS = {  # on a file of packed tensor entries (1.5), as mxq writes them
    "huge offset": lambda d: _tensor(d).update(offset=2**61),
    "offset past end": lambda d: _tensor(d).update(offset=_tensor(d)["offset"] + 2**20),
    "negative offset": lambda d: _tensor(d).update(offset=-64),
    "float offset": lambda d: _tensor(d).update(offset=float(_tensor(d)["offset"])),
    "unaligned offset": lambda d: _tensor(d).update(offset=_tensor(d)["offset"] + 4),
    "offset one alignment later": lambda d: _tensor(d, 1).update(offset=_tensor(d, 1)["offset"] + 64),
    "overlap": lambda d: _tensor(d, 1).update(offset=_tensor(d)["offset"]),
    "missing offset": lambda d: _tensor(d).pop("offset"),
    "missing crc": lambda d: _tensor(d).pop("crc32"),
    "bad crc text": lambda d: _tensor(d).update(crc32="xyz"),
    "upper-case crc": lambda d: _tensor(d).update(crc32="ABCDEF01"),
    "blob table too": lambda d: _tensor(d).update(blobs={}),
    "shape not matching blobs": lambda d: _tensor(d).update(shape=[5, 200]),  # more bytes: the next tensor moves
    "far fewer rows": lambda d: _tensor(d, 1).update(shape=[1, 128]),  # the next tensor would start earlier
    "huge shape": lambda d: d["tensors"][0].update(shape=[2**40, 2**40]),
    "zero dim": lambda d: d["tensors"][0].update(shape=[0, 70]),
    "unknown scheme": lambda d: d["tensors"][0].update(scheme="gptq"),
    "affine read as lut": lambda d: d["tensors"][0].update(scheme="lut"),
    "affine read as vq": lambda d: d["tensors"][0].update(scheme="vq"),  # no "dim"
    "affine read as vq with a dim": lambda d: (d["tensors"][0].update(scheme="vq"), d["tensors"][0]["config"].update(dim=2)),
    "bad bits": lambda d: d["tensors"][0]["config"].update(bits=7),
    "bad meta": lambda d: d["tensors"][0]["config"].update(meta_group_size=64),
    "meta bits 7": lambda d: d["tensors"][0]["config"].update(meta_bits=7),
    "meta bits as string": lambda d: d["tensors"][0]["config"].update(meta_bits="6"),
    "string shape": lambda d: d["tensors"][0].update(shape="5x70"),
    "tensors not a list": lambda d: d.update(tensors={}),
    "missing tokenizer": lambda d: d.pop("tokenizer"),
    "tokenizer blob 2-D": lambda d: d["tokenizer"]["blob"].update(shape=[1, d["tokenizer"]["blob"]["shape"][0]]),
    "duplicate tensor": lambda d: d["tensors"].__setitem__(1, dict(d["tensors"][1], name=d["tensors"][0]["name"])),
    "wrong format": lambda d: d.update(format="gguf"),
    "alignment 3": lambda d: d.update(alignment=3),
    "outliers beyond weights": lambda d: d["tensors"][0]["config"].update(outliers=10**6),
}


@pytest.mark.parametrize("name", list(HOSTILE_EDITS) + [f"table: {name}" for name in BLOB_TABLE_EDITS])
def test_hostile_metadata_is_rejected(small_file, small_table_file, tmp_path, name):
    path, _, _ = small_table_file if name.startswith("table: ") else small_file
    edit = BLOB_TABLE_EDITS[name[7:]] if name.startswith("table: ") else HOSTILE_EDITS[name]
    target = tmp_path / "hostile.mxq"
    target.write_bytes(_rewrite_json(path.read_bytes(), edit))
    with pytest.raises(MxqFormatError) as caught:
        MxqFile.open(target)
    assert "\n" not in str(caught.value) and str(target) in str(caught.value)


def _pack_last(document):
    """The last tensor entry (one blob: fp16) turned from a blob table into the packed form."""
    (blob,) = document["tensors"][-1].pop("blobs").values()
    document["tensors"][-1].update(offset=blob["offset"], crc32=blob["crc32"])


def test_a_file_mixing_both_forms_reads(small_table_file, tmp_path):
    path, _, written = small_table_file
    target = tmp_path / "mixed.mxq"
    target.write_bytes(_rewrite_json(path.read_bytes(), _pack_last))
    with MxqFile.open(target) as f:
        assert f.verify() == [] and [bool(e.crc32) for e in f.tensors.values()] == [False, False, True]
        np.testing.assert_array_equal(f.blobs("n")["data"], written["n"]["data"])
    moved = lambda d: (_pack_last(d), _tensor(d, -1).update(offset=_tensor(d, -1)["offset"] + 64))  # noqa: E731
    target.write_bytes(_rewrite_json(path.read_bytes(), moved))
    with pytest.raises(MxqFormatError, match="tensor 'n': offset .* the first aligned byte after"):
        MxqFile.open(target)


HIDDEN_BY_ALIGNMENT = {  # edits of packed entries that move no tensor: each blob still ends within its alignment gap
    "one row fewer": lambda d: _tensor(d).update(shape=[4, 70]),
    "meta bits 6 read as 8": lambda d: d["tensors"][0]["config"].update(meta_bits=8),  # 24 → 15 bytes
    "meta bits 8 read as 6": lambda d: d["tensors"][1]["config"].update(meta_bits=6),  # 6 → 24 bytes
    "last tensor shorter": lambda d: _tensor(d, -1).update(shape=[6]),
}


@pytest.mark.parametrize("name", list(HIDDEN_BY_ALIGNMENT))
def test_a_packed_entry_edit_the_alignment_hides_is_caught_by_verify(small_file, tmp_path, name):
    """The layout still holds, so the file opens, but the tensor's crc32 now covers other bytes (or a
    blob now ends before non-zero bytes that became padding): verify reports it, and loading verifies."""
    path, _, _ = small_file
    target = tmp_path / "hidden.mxq"
    target.write_bytes(_rewrite_json(path.read_bytes(), HIDDEN_BY_ALIGNMENT[name]))
    with MxqFile.open(target) as f:
        assert f.verify()


def _codebook(document, index=0):
    return document["tensors"][index]["blobs"]["codebook"]


HOSTILE_LUT_EDITS = {
    "lut bits 7": lambda d: d["tensors"][0]["config"].update(bits=7),
    "lut bits as string": lambda d: d["tensors"][0]["config"].update(bits="3"),
    "lut codebook_rows 3": lambda d: d["tensors"][0]["config"].update(codebook_rows=3),
    "lut codebook_rows 0": lambda d: d["tensors"][1]["config"].update(codebook_rows=0),
    "lut codebook_rows missing": lambda d: d["tensors"][1]["config"].pop("codebook_rows"),
    "table: lut codebook_rows changed": lambda d: d["tensors"][1]["config"].update(codebook_rows=2),
    "lut bits changed": lambda d: d["tensors"][1]["config"].update(bits=3),
    "lut negative outliers": lambda d: d["tensors"][0]["config"].update(outliers=-4),
    "lut outliers dropped": lambda d: d["tensors"][0]["config"].update(outliers=0),
    "table: lut codebook missing": lambda d: d["tensors"][0]["blobs"].pop("codebook"),
    "table: lut codebook wrong dtype": lambda d: _codebook(d).update(dtype="float32", nbytes=_codebook(d)["nbytes"] * 2),
    "table: lut codebook wrong shape": lambda d: _codebook(d).update(shape=[8, 5]),
    "table: lut codebook overlaps codes": lambda d: _codebook(d).update(
        offset=d["tensors"][0]["blobs"]["qweight"]["offset"]),
    "lut affine blobs": lambda d: d["tensors"][0].update(scheme="affine"),
    "lut 1-D": lambda d: d["tensors"][1].update(shape=[240]),
}


@pytest.mark.parametrize("name", list(HOSTILE_LUT_EDITS))
def test_hostile_lut_metadata_is_rejected(small_lut_file, tmp_path, name):
    path, _, _ = _small("lut", tmp_path, blob_table=True) if name.startswith("table: ") else small_lut_file
    target = tmp_path / "hostile.mxq"
    target.write_bytes(_rewrite_json(path.read_bytes(), HOSTILE_LUT_EDITS[name]))
    with pytest.raises(MxqFormatError) as caught:
        MxqFile.open(target)
    assert "\n" not in str(caught.value) and str(target) in str(caught.value)


def test_lut_runtime_rejects_bad_outliers_and_survives_any_codebook(small_lut_file, tmp_path):
    """Content the reader cannot judge: unsound CSR outliers and a non-finite codebook are a ModelError
    naming the tensor; codes always index inside their codebook (b bits, 2^b levels), so any finite
    codebook bytes give numbers, never an out-of-bounds read."""
    from mxq.format_spec import dequantize
    from mxq.runtime.errors import ModelError
    from mxq.runtime.backends.numpy_backend import NumpyBackend

    path, tensors, blobs = small_lut_file
    backend = NumpyBackend(kernels=False, threads=1)
    with MxqFile.open(path) as f:
        entry = f.tensors["a"]
        bad = dict(f.blobs("a"), outlier_cols=np.array([0, 0, 0, 99], np.uint16))
        with pytest.raises(ModelError, match="tensor 'a': bad outliers"):
            backend.prepare(entry, bad)
        entry = f.tensors["b"]
        with pytest.raises(ModelError, match="tensor 'b': blob 'codebook' holds NaN or infinity"):
            backend.prepare(entry, dict(f.blobs("b"), codebook=np.full((2, 4), np.inf, np.float16)))
        wild = dict(f.blobs("b"), codebook=np.full((2, 4), 65504, np.float16))
        weight = backend.prepare(entry, wild)
        y = backend.linear(np.ones((1, 40), np.float32), weight)
        assert y.shape == (1, 6) and np.isnan(dequantize(wild, (6, 40), entry.config)).sum() == 0


def _vq_config(document, index=0, block=None):
    config = document["tensors"][index]["config"]
    return config if block is None else config["blocks"][block]["config"]


def _vq_blob(document, name, index=0):
    return document["tensors"][index]["blobs"][name]


VQ_KEYS = ("bits", "dim", "group_size", "meta_bits", "meta_group_size", "outliers")
HOSTILE_VQ_EDITS = {  # name: (edit of SMALL_TENSORS["vq"]'s JSON, the tensor the error must name; None: any)
    **{f"vq {key} {value!r}": (lambda d, key=key, value=value: _vq_config(d, 0).update({key: value}), "a")
       for key, values in {"bits": (1, 5, 8, 0, -3, 2**70, "3", 3.0, True, None, [3]),
                           "dim": (0, 1, 3, 4, 8, 2.0, True, "2", {}),  # dim 4 with bits 3: 12-bit indices
                           "group_size": (0, 16, 48, 256, 32.5, "32"),
                           "meta_bits": (0, 4, 7, 16, "6", False),
                           "meta_group_size": (0, 64, 127, 256, "128"),
                           "outliers": (-4, 10**6, 4.5, "4")}.items() for value in values},
    **{f"vq without {key}": (lambda d, key=key: _vq_config(d, 0).pop(key), "a") for key in VQ_KEYS},
    "vq bits 4 with dim 4": (lambda d: _vq_config(d, 1).update(bits=4), "b"),
    "vq bits 3 with dim 4": (lambda d: _vq_config(d, 1).update(bits=3), "b"),
    "vq config a list": (lambda d: d["tensors"][0].update(config=[3, 2, 32]), "a"),
    "vq config empty": (lambda d: d["tensors"][0].update(config={}), "a"),
    "vq 1-D": (lambda d: d["tensors"][1].update(shape=[240]), "b"),
    "vq 3-D": (lambda d: d["tensors"][1].update(shape=[2, 3, 40]), "b"),
    "vq read as lut": (lambda d: d["tensors"][0].update(scheme="lut"), "a"),
    "vq read as fp16": (lambda d: d["tensors"][0].update(scheme="fp16"), None),  # other blobs: the next tensor moves
    "vq read as affine": (lambda d: d["tensors"][0].update(scheme="affine"), None),
    "vq bits changed": (lambda d: _vq_config(d, 0).update(bits=2), None),  # 4-bit indices: smaller blobs
    "vq dim changed": (lambda d: _vq_config(d, 1).update(dim=2), None),  # 4-bit indices into 2-D points
    "vq outliers dropped": (lambda d: _vq_config(d, 0).update(outliers=0), None),
    "rows: vq block dim 3": (lambda d: _vq_config(d, 2, 0).update(dim=3), "r"),
    "rows: vq block meta bits 7": (lambda d: _vq_config(d, 2, 0).update(meta_bits=7), "r"),
    "rows: vq block without group_size": (lambda d: _vq_config(d, 2, 0).pop("group_size"), "r"),
    "rows: affine block read as vq": (lambda d: d["tensors"][2]["config"]["blocks"][1].update(scheme="vq"), "r"),
    "rows: vq block bits changed": (lambda d: _vq_config(d, 2, 0).update(bits=3), None),
    "table: vq codebook too few points": (lambda d: _vq_blob(d, "codebook").update(shape=[16, 2], nbytes=64), "a"),
    "table: vq codebook transposed": (lambda d: _vq_blob(d, "codebook").update(shape=[2, 64]), "a"),
    "table: vq codebook 1-D": (lambda d: _vq_blob(d, "codebook").update(shape=[128]), "a"),
    "table: vq codebook as float32": (lambda d: _vq_blob(d, "codebook").update(dtype="float32", nbytes=512), "a"),
    "table: vq codebook missing": (lambda d: d["tensors"][0]["blobs"].pop("codebook"), "a"),
    "table: vq zero codes added": (lambda d: d["tensors"][0]["blobs"].update(zero_codes=_vq_blob(d, "scale_codes")), "a"),
    "table: vq 6-bit scale codes as uint8": (lambda d: _vq_blob(d, "scale_codes").update(dtype="uint8", shape=[5, 3],
                                                                                          nbytes=15), "a"),
    "table: vq 8-bit scale codes packed": (lambda d: _vq_blob(d, "scale_codes", 1).update(dtype="uint32", shape=[6],
                                                                                          nbytes=24), "b"),
    "table: vq qweight a pack short": (lambda d: _vq_blob(d, "qweight").update(shape=[5, 6], nbytes=120), "a"),
    "table: vq scale_meta two runs": (lambda d: _vq_blob(d, "scale_meta").update(shape=[2, 2], nbytes=8), "a"),
    "table: vq dim changed": (lambda d: _vq_config(d, 1).update(dim=2), "b"),
    "table: vq group size changed": (lambda d: _vq_config(d, 1).update(group_size=32), "b"),  # 2 scales a row, not 1
    "table: vq block codebook short": (lambda d: _vq_blob(d, "0.codebook", 2).update(shape=[8, 2], nbytes=32), "r"),
}


@pytest.mark.parametrize("name", list(HOSTILE_VQ_EDITS))
def test_hostile_vq_metadata_is_rejected(small_vq_file, tmp_path, name):
    """Every hostile edit of a vq tensor's config, shape, scheme or blobs is one MxqFormatError naming the file
    and the tensor (and the block), never another exception."""
    path, _, _ = _small("vq", tmp_path, blob_table=True) if name.startswith("table: ") else small_vq_file
    edit, tensor = HOSTILE_VQ_EDITS[name]
    target = tmp_path / "hostile.mxq"
    target.write_bytes(_rewrite_json(path.read_bytes(), edit))
    with pytest.raises(MxqFormatError) as caught:
        MxqFile.open(target)
    message = str(caught.value)
    assert "\n" not in message and str(target) in message
    assert f"tensor '{tensor}'" in message if tensor else "tensor '" in message, message
    if name.startswith("rows: ") and tensor:
        assert "block" in message, message


HIDDEN_VQ_EDITS = {  # edits of packed vq entries that move no tensor: the file opens
    "meta bits 6 read as 8": lambda d: _vq_config(d, 0).update(meta_bits=8),  # 24 → 15 bytes
    "meta bits 8 read as 6": lambda d: _vq_config(d, 1).update(meta_bits=6),  # 6 → 24 bytes
    "group size 32 read as 64": lambda d: _vq_config(d, 0).update(group_size=64),  # 15 or 10 codes: one pack either way
}


@pytest.mark.parametrize("name", list(HIDDEN_VQ_EDITS))
def test_a_vq_edit_the_layout_hides_opens_and_decodes(small_vq_file, tmp_path, name):
    """A config edit that moves no blob: the file opens, verify reports the bytes that changed meaning where
    the crc32 can see it (a group-size edit that keeps every blob's size changes only how the same bytes
    decode, as a hostile writer could), and every tensor still decodes to numbers without an exception."""
    from mxq.format_spec import dequantize
    from mxq.format_spec.rows import content_problem

    path, _, _ = small_vq_file
    target = tmp_path / "hidden.mxq"
    target.write_bytes(_rewrite_json(path.read_bytes(), HIDDEN_VQ_EDITS[name]))
    with MxqFile.open(target) as f:
        assert bool(f.verify()) == name.startswith("meta bits")
        for entry in f.tensors.values():
            blobs = f.blobs(entry.name)
            if content_problem(blobs, entry.shape, entry.config) is None:
                assert dequantize(blobs, entry.shape, entry.config).shape == entry.shape


@pytest.mark.parametrize("patch", [
    (0, b"GGUF\0\0\0\0"),                     # wrong magic
    (8, struct.pack("<H", 2)),                 # unknown major version
    (16, struct.pack("<Q", 2**63)),            # absurd JSON length
    (16, struct.pack("<Q", 70 << 20)),         # JSON length over the cap
    (24, struct.pack("<Q", 2**63)),            # absurd data offset
    (24, struct.pack("<Q", 33)),               # data offset inside the JSON
])
def test_bad_header_fields(small_file, tmp_path, patch):
    path, _, _ = small_file
    image = bytearray(path.read_bytes())
    offset, data = patch
    image[offset: offset + len(data)] = data
    target = tmp_path / "bad.mxq"
    target.write_bytes(bytes(image))
    with pytest.raises(MxqFormatError):
        MxqFile.open(target)


def test_deeply_nested_json_is_rejected(tmp_path):
    raw = b"[" * 100000 + b"]" * 100000
    target = tmp_path / "deep.mxq"
    target.write_bytes(b"\x89MXQ\r\n\x1a\n" + struct.pack("<HHIQQ", 1, 0, zlib.crc32(raw), len(raw), 32 + len(raw)) + raw)
    with pytest.raises(MxqFormatError):
        MxqFile.open(target)


def test_minor_version_and_unknown_keys_are_accepted(small_file, tmp_path):
    path, _, _ = small_file
    image = bytearray(_rewrite_json(path.read_bytes(), lambda d: d.update(future={"x": 1})))
    image[10:12] = struct.pack("<H", 7)
    target = tmp_path / "newer.mxq"
    target.write_bytes(bytes(image))
    assert _outcome(target) == "ok"


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_cli_reports_one_line_and_fails(small_file, tmp_path, command):
    path, _, _ = small_file
    target = tmp_path / "cut.mxq"
    target.write_bytes(path.read_bytes()[:100])
    for bad in (target, tmp_path / "missing.mxq", tmp_path):
        result = subprocess.run([sys.executable, "-m", "mxq.cli", command, str(bad)], capture_output=True, text=True)
        assert result.returncode != 0
        assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr


def test_cli_verify_flags_damaged_data(small_file, tmp_path):
    path, _, _ = small_file
    image = bytearray(path.read_bytes())
    image[-1] ^= 0xFF  # inside the last blob: only the checksum can notice
    target = tmp_path / "flip.mxq"
    target.write_bytes(bytes(image))
    result = subprocess.run([sys.executable, "-m", "mxq.cli", "verify", str(target)], capture_output=True, text=True)
    assert result.returncode == 1 and "DAMAGED" in result.stderr
    ok = subprocess.run([sys.executable, "-m", "mxq.cli", "verify", str(path)], capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout


def test_verify_checks_the_content_a_runtime_checks(small_file, tmp_path):
    """Checksums that hold over a NaN scale or an outlier past the row: `mxq verify` reports what a runtime and
    export-hf refuse (SPEC.md §9), naming the tensor and blob."""
    from conftest import file_plans_and_blobs
    from mxq.format_spec import MxqWriter, TensorPlan

    path, tensors, blobs = small_file
    for name, edit, message in [("scale_meta", lambda b: b["scale_meta"].__setitem__((0, 0), np.nan),
                                 "blob 'scale_meta' holds NaN or infinity"),
                                ("outlier_cols", lambda b: b["outlier_cols"].__setitem__(0, 70), "column")]:
        written = {n: {k: v.copy() for k, v in b.items()} for n, b in blobs.items()}
        edit(written["a"])
        plans = [TensorPlan(n, shape, config, "linear" if config.scheme != "fp16" else "norm")
                 for n, shape, config in tensors]
        plans, stored = file_plans_and_blobs(plans, written.get)
        target = tmp_path / f"{name}.mxq"
        with MxqWriter(target, model={"architecture": "llama"}, tokenizer={"kind": "sentencepiece"},
                       tokenizer_data=b"tokenizer bytes", tensors=plans) as writer:
            for plan in plans:
                writer.write(plan.name, stored[plan.name])
        with MxqFile.open(target) as f:
            problems = f.verify()
        assert len(problems) == 1 and problems[0].startswith("tensor 'a': ") and message in problems[0], problems

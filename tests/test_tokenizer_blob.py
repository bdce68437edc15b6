"""The tokenizer blob stored xz-compressed (SPEC.md §3.2, format 1.3): written packed, read back byte for
byte, counted packed in the file's bytes; hostile +xz blobs and tokenizer fields are rejected with one
line naming the tokenizer blob, by open, by tokenizer_data() and by verify — never unpacking more than
raw_nbytes; files with a plain tokenizer blob (mxq before 1.3) still read."""
import json
import lzma

import pytest

from conftest import write_random_file
from mxq.format_spec import MxqFile, MxqFormatError, MxqWriter, StorageConfig, tokenizer_blob
from mxq.format_spec.tokenizer_schema import MAX_TOKENIZER_NBYTES
from test_corruption import _rewrite_json

TENSORS = [("a", (5, 70), StorageConfig.affine(3, 32, 4, 8)), ("n", (7,), StorageConfig.fp16())]
TOKENIZER = json.dumps({"model": {"vocab": {f"token{i}": i for i in range(3000)}}}).encode()  # tokenizer.json-like


def test_the_tokenizer_is_stored_packed_and_read_back_byte_for_byte(tmp_path):
    packed, plain = tmp_path / "packed.mxq", tmp_path / "plain.mxq"
    write_random_file(packed, TENSORS, tokenizer_data=TOKENIZER)
    write_random_file(plain, TENSORS, tokenizer_data=b"")  # the same file but for the tokenizer
    with MxqFile.open(packed) as f:
        assert f.tokenizer["kind"] == "sentencepiece+xz" and f.tokenizer_kind == "sentencepiece"
        assert f.tokenizer["raw_nbytes"] == f.tokenizer_nbytes == len(TOKENIZER)
        assert f.tokenizer_data() == TOKENIZER and f.verify() == []
        assert f.tokenizer_blob.nbytes < len(TOKENIZER) / 5
        stored = f.tokenizer_blob.nbytes
    assert packed.stat().st_size - plain.stat().st_size < stored + 64  # the file holds the packed bytes only


def test_a_stored_tokenizer_object_is_accepted_by_the_writer(tmp_path):
    """Tools copy a file's tokenizer object (kind +xz, raw_nbytes) with its unpacked data: stored once, packed."""
    path = tmp_path / "copy.mxq"
    stored = {"kind": "hf-tokenizers+xz", "raw_nbytes": 1, "bos_token_id": 1, "blob": {"offset": 0}}
    with MxqWriter(path, model={"architecture": "llama"}, tokenizer=stored, tokenizer_data=TOKENIZER, tensors=[]):
        pass
    with MxqFile.open(path) as f:
        assert {k: v for k, v in f.tokenizer.items() if k != "blob"} == {
            "kind": "hf-tokenizers+xz", "raw_nbytes": len(TOKENIZER), "bos_token_id": 1}
        assert f.tokenizer_data() == TOKENIZER


def test_an_empty_tokenizer_file_packs_to_zero_raw_bytes(tmp_path):
    path = tmp_path / "empty.mxq"
    write_random_file(path, TENSORS, tokenizer_data=b"")
    with MxqFile.open(path) as f:
        assert f.tokenizer_nbytes == 0 < f.tokenizer_blob.nbytes and f.tokenizer_data() == b""


def _hostile(monkeypatch, tmp_path, raw_nbytes, blob):
    """A file written with this tokenizer blob and raw_nbytes (its layout and crc32 correct)."""
    path = tmp_path / "hostile.mxq"
    monkeypatch.setattr(tokenizer_blob, "pack",
                        lambda meta, data: ({"kind": "sentencepiece+xz", "raw_nbytes": raw_nbytes}, blob))
    write_random_file(path, TENSORS, tokenizer_data=TOKENIZER)
    return path


BOMB = lzma.compress(b"\0" * (64 << 20), format=lzma.FORMAT_XZ)  # 64 MiB of zeros in ~10 KB


@pytest.mark.parametrize("raw_nbytes, blob, message", [
    (len(TOKENIZER), TOKENIZER, "not a valid xz stream"),
    (100, BOMB, "unpacks to more than raw_nbytes = 100 bytes"),
    (len(TOKENIZER) + 1, lzma.compress(TOKENIZER), f"unpacks to {len(TOKENIZER):,} bytes, not raw_nbytes"),
    (len(TOKENIZER), lzma.compress(TOKENIZER)[:-20], "truncated"),
    (len(TOKENIZER), lzma.compress(TOKENIZER) + b"\0" * 4 + lzma.compress(b"x"), "bytes after the end of the xz stream"),
    (len(TOKENIZER), lzma.compress(TOKENIZER, format=lzma.FORMAT_ALONE), "not a valid xz stream"),
], ids=["not-xz", "bomb", "short", "truncated", "trailing", "lzma-alone"])
def test_a_blob_that_does_not_unpack_to_raw_nbytes_is_rejected(monkeypatch, tmp_path, raw_nbytes, blob, message):
    path = _hostile(monkeypatch, tmp_path, raw_nbytes, blob)
    with MxqFile.open(path) as f:  # the JSON is fine: open does not read the blob
        with pytest.raises(MxqFormatError, match=f"hostile.mxq: tokenizer blob: .*{message}") as error:
            f.tokenizer_data()
        assert "\n" not in str(error.value)
        problems = f.verify()
    assert len(problems) == 1 and problems[0].startswith("tokenizer blob: ") and message.split(" ")[0] in problems[0]


def test_a_small_blob_claiming_a_large_tokenizer_is_rejected_at_open(monkeypatch, tmp_path):
    """raw_nbytes is bounded by the blob's size (64x + 1 MiB): a ~10 KB stream of 64 MiB of zeros is not
    unpacked at all."""
    path = _hostile(monkeypatch, tmp_path, 64 << 20, BOMB)
    with pytest.raises(MxqFormatError, match=r"tokenizer field 'raw_nbytes' = 67,108,864 is more than 64 x the blob's"):
        MxqFile.open(path)


@pytest.mark.parametrize("edit, field", [
    (lambda t: t.pop("raw_nbytes"), "raw_nbytes"),
    (lambda t: t.update(raw_nbytes=-1), "raw_nbytes"),
    (lambda t: t.update(raw_nbytes=True), "raw_nbytes"),
    (lambda t: t.update(raw_nbytes=MAX_TOKENIZER_NBYTES + 1), "raw_nbytes"),
    (lambda t: t.update(raw_nbytes=12.0), "raw_nbytes"),
    (lambda t: t.update(kind="sentencepiece"), "raw_nbytes"),  # raw_nbytes without +xz
    (lambda t: t.update(kind="hf-tokenizers+gz"), "kind"),
    (lambda t: t.update(kind="+xz"), "kind"),
])
def test_hostile_tokenizer_fields_are_rejected_at_open(tmp_path, edit, field):
    path = tmp_path / "small.mxq"
    write_random_file(path, TENSORS, tokenizer_data=TOKENIZER)
    target = tmp_path / "edited.mxq"
    target.write_bytes(_rewrite_json(path.read_bytes(), lambda d: edit(d["tokenizer"])))
    with pytest.raises(MxqFormatError, match=f"tokenizer field '{field}'"):
        MxqFile.open(target)


def test_a_plain_tokenizer_blob_still_reads(monkeypatch, tmp_path):
    """Files written before 1.3 hold the tokenizer file as it is (no +xz, no raw_nbytes; minor 1)."""
    path = tmp_path / "plain.mxq"
    monkeypatch.setattr(tokenizer_blob, "pack", lambda meta, data: (meta, data))  # a writer of 1.1
    write_random_file(path, TENSORS, tokenizer_data=TOKENIZER, blob_table=True)
    with MxqFile.open(path) as f:
        assert f.version == (1, 1) and f.tokenizer == {"kind": "sentencepiece", "blob": f.tokenizer["blob"]}
        assert f.tokenizer_kind == "sentencepiece" and f.tokenizer_nbytes == f.tokenizer_blob.nbytes == len(TOKENIZER)
        assert f.tokenizer_data() == TOKENIZER and f.verify() == []

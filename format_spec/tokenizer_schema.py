"""The schema of the `tokenizer` metadata object (SPEC.md §3.2), shared by the reader (every file
opened) and the writer (every file written), so a file mxq writes is always a file mxq can read."""
from __future__ import annotations

TOKENIZER_KINDS = ("sentencepiece", "hf-tokenizers")
XZ = "+xz"  # a kind ending in it: the blob is the tokenizer file in an xz container (tokenizer_blob.py)
MAX_TOKENIZER_NBYTES = 1 << 28  # cap on an xz blob's unpacked size (`raw_nbytes`): Gemma 3's tokenizer.json is 33 MB
MAX_TOKEN_ID = (1 << 31) - 1
MAX_EOS_IDS = 1024
MAX_CHAT_TEMPLATE_CHARS = 256 << 10


class MetadataError(ValueError):
    """A metadata field has the wrong type or range; the message names the field (one line)."""


def _token_id(value, field: str, vocab_size) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise MetadataError(f"tokenizer field '{field}' must be an integer token id, got {value!r:.60}")
    limit = min(vocab_size, MAX_TOKEN_ID + 1) if vocab_size else MAX_TOKEN_ID + 1
    if not 0 <= value < limit:
        raise MetadataError(f"tokenizer field '{field}' = {value!r:.60} is outside the vocabulary [0, {limit})")
    return value


def base_kind(kind: str) -> tuple[str, bool]:
    """A checked `kind` → (the tokenizer kind, whether its blob is xz-compressed)."""
    return (kind[: -len(XZ)], True) if kind.endswith(XZ) else (kind, False)


def check_tokenizer(meta, vocab_size=None) -> None:
    """Raise MetadataError unless `meta` (the tokenizer object, blob aside) follows SPEC.md §3.2.
    `vocab_size`: the model's, when known (ids must be below it). Absent optional fields mean
    null / [] / false."""
    if not isinstance(meta, dict):
        raise MetadataError("tokenizer metadata must be an object")
    kind = meta.get("kind")
    if kind not in TOKENIZER_KINDS + tuple(k + XZ for k in TOKENIZER_KINDS):
        raise MetadataError(f"tokenizer field 'kind' = {kind!r:.60} is not supported "
                            f"(supported: {', '.join(TOKENIZER_KINDS)}, each optionally {XZ})")
    raw_nbytes = meta.get("raw_nbytes")
    if base_kind(kind)[1]:
        if not (isinstance(raw_nbytes, int) and not isinstance(raw_nbytes, bool)
                and 0 <= raw_nbytes <= MAX_TOKENIZER_NBYTES):
            raise MetadataError(f"tokenizer field 'raw_nbytes' = {raw_nbytes!r:.60} must be an integer in "
                                f"[0, {MAX_TOKENIZER_NBYTES:,}] with kind {kind!r}")
    elif "raw_nbytes" in meta:
        raise MetadataError(f"tokenizer field 'raw_nbytes' is only allowed with an {XZ} kind, not {kind!r}")
    if not (isinstance(vocab_size, int) and not isinstance(vocab_size, bool) and vocab_size > 0):
        vocab_size = None
    bos = meta.get("bos_token_id")
    if bos is not None:
        _token_id(bos, "bos_token_id", vocab_size)
    eos = meta.get("eos_token_ids", [])
    if not isinstance(eos, list) or len(eos) > MAX_EOS_IDS:
        raise MetadataError(f"tokenizer field 'eos_token_ids' must be a list of at most {MAX_EOS_IDS} token ids")
    for i, value in enumerate(eos):
        _token_id(value, f"eos_token_ids[{i}]", vocab_size)
    add_bos = meta.get("add_bos_token", False)
    if not isinstance(add_bos, bool):
        raise MetadataError(f"tokenizer field 'add_bos_token' must be true or false, got {add_bos!r:.60}")
    if add_bos and bos is None:
        raise MetadataError("tokenizer field 'add_bos_token' is true but 'bos_token_id' is null")
    template = meta.get("chat_template")
    if template is not None:
        if not isinstance(template, str):
            raise MetadataError(f"tokenizer field 'chat_template' must be a string or null, "
                                f"got {type(template).__name__}")
        if len(template) > MAX_CHAT_TEMPLATE_CHARS:
            raise MetadataError(f"tokenizer field 'chat_template' has {len(template):,} characters "
                                f"(cap {MAX_CHAT_TEMPLATE_CHARS:,})")

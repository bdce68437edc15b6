"""The tokenizer embedded in a .mxq file (SPEC.md §3.2): encode, decode, stream, chat template.

Two kinds: `sentencepiece` (a SentencePiece model proto, e.g. Llama-2, Mistral) and `hf-tokenizers`
(a tokenizer.json for the `tokenizers` library, e.g. byte-level BPE of SmolLM2, Qwen2, Llama-3).
`encode` adds BOS exactly when the file says `add_bos_token`; it never relies on a tokenizer.json
post-processor (the converter records BOS handling in `add_bos_token`).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import re

from .errors import ModelError

REPLACEMENT = "\ufffd"  # what decoders produce for an incomplete UTF-8 sequence
STREAM_CONTEXT = 6  # prompt tokens a stream decodes along with new ones (keeps leading spaces right)


class Tokenizer:
    def __init__(self, meta: dict, data: bytes, model_bos=None, model_eos=()):
        kind = meta.get("kind")
        if kind == "sentencepiece":
            self._impl = _SentencePiece(data)
        elif kind == "hf-tokenizers":
            self._impl = _HfTokenizers(data)
        else:
            raise ModelError(f"tokenizer kind {kind!r} is not supported (supported: sentencepiece, hf-tokenizers)")
        self.kind = kind
        bos = meta.get("bos_token_id", model_bos)
        self.bos_id = bos if isinstance(bos, int) and not isinstance(bos, bool) else None
        eos = meta.get("eos_token_ids") or []
        eos = [eos] if isinstance(eos, int) else list(eos)
        eos = [i for i in list(eos) + list(model_eos) if isinstance(i, int) and not isinstance(i, bool)]
        self.eos_ids = frozenset(eos)
        self.eos_id = eos[0] if eos else None  # the file's first: the chat template's eos_token
        self.add_bos = bool(meta.get("add_bos_token", False))
        if self.add_bos and self.bos_id is None:
            raise ModelError("tokenizer.add_bos_token is true but there is no bos_token_id")
        template = meta.get("chat_template")
        self.chat_template = template if isinstance(template, str) and template else None

    @classmethod
    def from_file(cls, mxq_file, model_config=None) -> "Tokenizer":
        bos = model_config.bos_token_id if model_config else None
        eos = model_config.eos_token_ids if model_config else ()
        meta = {**mxq_file.tokenizer, "kind": mxq_file.tokenizer_kind}  # the file's kind, unpacked (no +xz)
        return cls(meta, mxq_file.tokenizer_data(), bos, eos)

    @property
    def vocab_size(self) -> int:
        return self._impl.vocab_size

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Text → token ids; special-token strings in the text (e.g. "<s>") become their ids.
        BOS is prepended when `add_bos` (default: the file's add_bos_token)."""
        check_utf8(text)
        ids = self._impl.encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids) -> str:
        """Token ids → text, special tokens (BOS, EOS, ...) left out."""
        return self._impl.decode([int(i) for i in ids])

    def token_string(self, token_id) -> str:
        return self._impl.token_string(token_id) if token_id is not None else ""

    @property
    def unk_string(self) -> str | None:
        """The unknown-token string of a sentencepiece model (None for other kinds)."""
        return getattr(self._impl, "unk_text", None)

    def stream(self, context_ids=()) -> "StreamDecoder":
        """A streaming detokenizer for tokens that follow `context_ids` (e.g. the prompt)."""
        return StreamDecoder(self, context_ids)

    # -- chat --------------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The file's Jinja chat template applied the way transformers applies it."""
        if self.chat_template is None:
            raise ModelError("this model has no chat template; run without --chat")
        from .chat_template import TemplateError, render_chat_template

        try:
            return render_chat_template(self.chat_template, messages=messages,
                                        add_generation_prompt=add_generation_prompt,
                                        bos_token=self.token_string(self.bos_id),
                                        eos_token=self.token_string(self.eos_id))
        except TemplateError as error:
            raise ModelError(f"chat template: {error}") from None

    def encode_chat(self, prompt: str) -> list[int]:
        """One user message, rendered with the chat template and tokenized without adding BOS
        (templates write it themselves), as transformers' apply_chat_template(tokenize=True)."""
        return self.encode(self.render_chat([{"role": "user", "content": prompt}]), add_bos=False)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never emitting a broken character.

    Decodes a short window of recent ids twice — up to the last emitted token and up to the newest —
    and emits the difference, unless the newest text ends in U+FFFD (an incomplete UTF-8 sequence
    split across byte tokens): then it waits for more tokens. Decoding a window rather than one
    token keeps tokenizer-dependent spacing ("▁" pieces) exactly as a full decode has it."""

    def __init__(self, tokenizer: Tokenizer, context_ids=()):
        self.tokenizer = tokenizer
        self.ids = [int(i) for i in list(context_ids)[-STREAM_CONTEXT:]]
        self.prefix = 0  # window start
        self.read = len(self.ids)  # ids before this are emitted

    def push(self, token_id) -> str:
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is held back (at the end of generation), even if incomplete."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.read >= len(self.ids):
            return ""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read])
        after = decode(self.ids[self.prefix:])
        if not final and (len(after) <= len(before) or after.endswith(REPLACEMENT)):
            return ""
        piece = after[len(before):] if after.startswith(before) else after
        self.prefix, self.read = self.read, len(self.ids)
        return piece


class _SentencePiece:
    def __init__(self, data: bytes):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data)
        except Exception as error:  # noqa: BLE001 - the library raises plain RuntimeError/OSError
            raise ModelError(f"the embedded sentencepiece model does not load: {error}") from None
        self.vocab_size = self.sp.get_piece_size()
        specials = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                    if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self.specials = specials
        self.special_re = re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
                                     + ")") if specials else None
        unk = self.sp.unk_id()
        self.unk_text = self.sp.id_to_piece(unk) if unk >= 0 else None
        self.sp_inner = self.sp  # for text that follows a special token: no dummy-prefix space
        inner = _without_dummy_prefix(data)
        if inner is not None:
            sp_inner = sentencepiece.SentencePieceProcessor()
            try:
                sp_inner.LoadFromSerializedProto(inner)
                self.sp_inner = sp_inner
            except Exception:  # noqa: BLE001 - the edited proto does not load: keep the dummy prefix
                pass

    def encode(self, text: str) -> list[int]:
        """Like transformers' Llama tokenizers (legacy=False): special-token strings are split out;
        the dummy-prefix space is added at the start of the text only, not after a special token."""
        ids = []
        parts = self.special_re.split(text) if self.special_re else [text]
        for i, part in enumerate(parts):
            if not part:
                continue
            if i % 2:  # a special-token string
                ids.append(self.specials[part])
            else:  # like transformers' Metaspace: no dummy "▁" where the text already starts with one
                ids.extend((self.sp if i == 0 and not part.startswith(" ") else self.sp_inner).encode(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        # ids past the tokenizer's pieces (a model's padded vocabulary rows) have no text
        return self.sp.decode([i for i in ids if 0 <= i < self.vocab_size])

    def token_string(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else ""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _without_dummy_prefix(proto: bytes) -> bytes | None:
    """The SentencePiece ModelProto with normalizer_spec.add_dummy_prefix = false, edited in the
    protobuf wire format (no protobuf dependency): ModelProto field 3 is the NormalizerSpec, whose
    field 3 is add_dummy_prefix; appending `field 3 = 0` overrides it (the last value wins).
    None if the bytes do not parse as expected."""
    try:
        pos, out = 0, bytearray()
        found = False
        while pos < len(proto):
            start = pos
            tag, pos = _varint(proto, pos)
            field, wire = tag >> 3, tag & 7
            if wire == 0:
                _, pos = _varint(proto, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                length, body = _varint(proto, pos)
                pos = body + length
                if field == 3 and not found:
                    payload = proto[body:pos] + b"\x18\x00"
                    out += _encode_varint(tag) + _encode_varint(len(payload)) + payload
                    found = True
                    continue
            else:
                return None
            if pos > len(proto):
                return None
            out += proto[start:pos]
        if not found:
            out += b"\x1a\x02\x18\x00"
        return bytes(out)
    except IndexError:
        return None


def check_utf8(text: str) -> None:
    """ModelError unless `text` is valid Unicode: a command-line argument with bytes that are not UTF-8 arrives
    with lone surrogates (U+DC80-U+DCFF for the bytes 0x80-0xFF), so can a JSON string ("\\udcff"), and
    neither tokenizer library takes them (a TypeError from deep inside)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(text[error.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise ModelError(f"the prompt is not valid UTF-8: {what} at character {error.start}") from None


@contextlib.contextmanager
def tokenizer_errors(what: str):
    """The tokenizer libraries' failures inside the block as one ModelError "<what>: <why>". A hostile
    tokenizer.json makes `tokenizers` raise plain Exceptions (a WordLevel unk_token not in its vocab) or panic
    in Rust (a regex with catastrophic backtracking, a garbage precompiled_charsmap): pyo3's PanicException
    derives from BaseException, not Exception, and is not importable, so it is recognised by name; Ctrl-C and
    SIGTERM (KeyboardInterrupt subclasses) pass through."""
    try:
        yield
    except BaseException as error:  # noqa: BLE001 - see above
        if not isinstance(error, Exception) and type(error).__name__ != "PanicException":
            raise
        raise ModelError(f"{what}: {' '.join(str(error).split())[:200] or type(error).__name__}") from None


def load_hf_tokenizer(data: bytes, name: str):
    """The `tokenizers` Tokenizer of tokenizer.json bytes that may be hostile (ModelError "<name>: does not
    load: <why>"), with padding and truncation off: mxq encodes one text at a time and wants all of its tokens,
    and a file's padding or truncation can kill the process at the first encode (Fixed padding to 2^40 tokens
    aborts on the allocation; a truncation stride >= max_length panics)."""
    from tokenizers import Tokenizer as HfTokenizer

    with tokenizer_errors(f"{name}: does not load"):
        tok = HfTokenizer.from_str(data.decode("utf-8"))
        tok.no_padding()
        tok.no_truncation()
    return tok


class _HfTokenizers:
    def __init__(self, data: bytes):
        self.tok = load_hf_tokenizer(data, "the embedded tokenizer.json")
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        release_freed_heap()

    def encode(self, text: str) -> list[int]:
        with tokenizer_errors("the embedded tokenizer.json: fails to encode the text"):
            return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        with tokenizer_errors("the embedded tokenizer.json: fails to decode tokens"):
            return self.tok.decode(ids, skip_special_tokens=True)

    def token_string(self, token_id: int) -> str:
        return self.tok.id_to_token(token_id) or ""


def release_freed_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing happens).
    Parsing a tokenizer.json allocates ~14x its size and frees most of it again (SmolLM2's 3.5 MB:
    +50 MiB during the parse, 13 MiB kept), but glibc keeps freed heap pages resident, where the
    big arrays that follow (mmapped by malloc) cannot reuse them: ~30 MiB of peak RSS for nothing
    (measured; runtime/footprint.py counts what stays)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return
    if trim is not None:
        trim(0)

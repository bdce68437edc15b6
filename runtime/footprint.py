"""How much memory `mxq generate` needs: the peak resident set (RSS) of the lean CPU runtime for a
model, a file size and a context length — the number `--fit SIZE --context N` keeps within SIZE and
`mxq inspect FILE --context N` prints.

    item         bytes                                                     where it is allocated
    file         file_bytes (every weight page is read per token)          the mmapped .mxq (lean mode); a big
                                                                           fp16 lm_head moves to anonymous
                                                                           memory, same bytes (cpu_weights);
                                                                           with the kernels, affine codes move
                                                                           to tiles, same bytes (cpu_tiles),
                                                                           and the file's pages are dropped
    unpacked     6-bit metadata codes widened to uint8 at load, beyond     format_spec reader (MxqFile.blobs,
                 their packed bytes (released): layout.unpacked_extra_nbytes  which drops the packed pages)
    kv_cache     layers · 2 · kv_heads · head_dim · N · 4 · batch          base.LayerCache, float32 on the CPU
    activations  prefill peak of one piece of the prompt (≤ PREFILL_CHUNK  model.hidden_states, model.block,
                 tokens) over N keys · batch (main thread + each worker's) numpy_backend
    scratch      threads · 2 · dequantization chunk                        cpu_weights._prefill_rows(_compiled)
    stacks       with the kernels, a kernel stack's arrays for one prefill  cpu_stack_kernels.stack_matmul*, tile_x
                 piece: its staged output (t · widest stack, twice: one
                 kept by the allocator) and x rounded for the tiles
                 (t · widest input · (4 + 2 bytes))
    logits       vocab · 4 · batch (the last token only)                   generate: forward(last_only=True)
    tokenizer    library + 4 · tokenizer.json bytes (measured)             tokenizer.py (HF tokenizers)
    python       interpreter + NumPy + the mxq CLI and runtime (measured)  import
    allocator    freed blocks glibc keeps resident (measured)              prefill temporaries
    kernels      the compiled kernels (measured): ahead of time 2 MiB,     cpu_jit.py, cpu_aot.py
                 Numba's JIT 120 MiB, none 0 (MXQ_KERNELS=numpy)

Loading comes first and has its own, lower peak (Footprint.load_peak: python, allocator, and the tokenizer
while its tokenizer.json is parsed, ~14x the JSON's size; tokenizer.py returns the parse's freed heap to
the OS before the weights are touched); `total` is the larger of the two — the load peak only for a
tokenizer that is big next to the model (Gemma 3's 33 MB tokenizer.json).

Not counted (each under 1 MiB on SmolLM2): the float32 (step, min) pairs of the metadata runs that
lean mode widens at load (1/128 of the metadata), token lists, the sampler's per-step arrays; nor (3 MiB
on SmolLM2, within the test's margin) the two transient (t, out) arrays a `rows` matrix's product makes
beyond its result (its blocks' outputs side by side, then gathered: row_blocks.py), ≤ 2·t·widest·4 bytes. The
tokenizer factors are measured for hf-tokenizers files; a sentencepiece model costs less (12 MiB for
Llama's 0.5 MB model, 14 MiB predicted).

The prediction is an upper bound of the peak (tests/test_footprint.py holds it to measured peak RSS
within 10% + 48 MiB on SmolLM2, with the ahead-of-time kernels and without kernels). N is the context:
prompt + new tokens, at most the model's context; the worst case runs a prompt of N tokens through
one prefill. CPU only: the CUDA backend's device memory (blobs as stored, fp16 KV cache, its own
scratch) is not modelled yet.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from ..format_spec.layout import unpacked_extra_nbytes
from .backends.cpu_weights import PREFILL_CHUNK_BYTES
from .backends.numpy_backend import PREFILL_CHUNK, attention_block
from .config import ModelConfig
from .errors import ModelError

MiB = 1 << 20
F32 = 4  # bytes of a float32: activations, the CPU KV cache, logits
# Measured constants (peak RSS of `mxq generate` on this repository's runtime, Linux x86-64, CPython 3.11):
PYTHON_BYTES = 36 * MiB  # interpreter + NumPy + the mxq CLI and runtime modules: 35 MiB RSS after import
ALLOCATOR_BYTES = 16 * MiB  # freed blocks glibc keeps resident (its mmap threshold rises after the first
# big free): verify's read buffers (reader.VERIFY_CHUNK = 8 MiB) and prefill temporaries
TOKENIZER_LIBRARY_BYTES = 12 * MiB  # the `tokenizers` shared library loaded and initialized
TOKENIZER_BYTES_PER_JSON_BYTE = 4  # the parsed tokenizer kept: 3.7x (SmolLM2: 13 MiB for 3.5 MB)
TOKENIZER_PARSE_PER_JSON_BYTE = 14  # while parsing: +50 MiB for SmolLM2's 3.5 MB, 12.2x for Gemma 3's 33 MB
KERNEL_BYTES = {"aot": 2 * MiB,  # the ahead-of-time extension: +0.3 MiB at load, its code pages when run
                "jit": 120 * MiB}  # Numba + LLVM + the cached kernels: +122 MiB at load (cpu_jit.py)


@dataclass
class Footprint:
    """An itemized estimate in bytes (`items`, in the order of the module docstring)."""
    items: dict
    context: int
    batch: int
    kernels: str  # "aot", "jit" or "" (none: the NumPy path)
    load_peak: int = 0  # while loading (the tokenizer parse): see the module doc

    @property
    def total(self) -> int:
        return max(sum(self.items.values()), self.load_peak)

    def to_json(self) -> dict:
        return {"context": self.context, "batch": self.batch, "kernels": self.kernels or False, "device": "cpu",
                "bytes": dict(self.items), "load_peak_bytes": self.load_peak, "total_bytes": self.total}

    def lines(self) -> list[str]:
        rows = [f"  {name:<12} {value:>15,} bytes  {value / MiB:9.1f} MiB" for name, value in self.items.items()]
        if self.load_peak > sum(self.items.values()):
            rows.append(f"  {'(loading)':<12} {self.load_peak:>15,} bytes  {self.load_peak / MiB:9.1f} MiB")
        return rows + [f"  {'total':<12} {self.total:>15,} bytes  {self.total / MiB:9.1f} MiB"]


def kernels_kind() -> str:
    """The compiled kernels the CPU runtime would load here (cpu_jit.py): "aot" (built, or buildable:
    Numba installed and no failed build recorded), "jit" (the build failed here, or MXQ_KERNELS=jit), or
    "" (MXQ_KERNELS=numpy, or no Numba and nothing built)."""
    from .backends import cpu_aot

    mode = os.environ.get("MXQ_KERNELS", "").lower() or "auto"
    numba = importlib.util.find_spec("numba") is not None
    if mode == "jit":
        return "jit" if numba else ""
    if mode not in ("auto", "aot"):
        return ""
    path = cpu_aot.module_path()
    if path.exists():
        return "aot"
    if not numba:
        return ""
    if path.with_name(path.name + ".failed").exists():
        return "jit" if mode == "auto" else ""
    return "aot"


def default_threads() -> int:
    """The CPU count, at most 8 (NumpyBackend's default when $MXQ_THREADS is unset)."""
    env = os.environ.get("MXQ_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cpus, 8)


def kv_cache_bytes(c: ModelConfig, positions: int, batch: int = 1) -> int:
    """base.LayerCache: k and v (kv_heads, capacity, head_dim) float32 per layer; generate reserves
    capacity = prompt + new tokens up front (no doubling), every layer the full length (sliding-window
    layers too)."""
    return c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * positions * F32 * batch


def activation_bytes(c: ModelConfig, tokens: int, threads: int) -> int:
    """Float32 working arrays of a prefill of `tokens` rows, run in pieces of t = min(tokens, PREFILL_CHUNK)
    rows (model.hidden_states); the last piece's queries see all `tokens` keys. The main thread holds
    the larger of a layer's two halves at once:
      attention: x, h (hidden); q, its rotated copy, the output (heads·hd); k, v (kv·hd); one score
                 block (heads, attention_block queries, tokens keys) and its 3 boolean masks
      MLP:       x, h, the down projection's output (hidden) and its threads' sgemm results (≤ hidden);
                 gate, up, act(gate)·up, the down projection's permuted input (NumPy path), one more for
                 GeGLU's temporaries, and one for fragmentation (intermediate)
    and each other worker thread its own score block plus its part of a product's sgemm result.
    Worker threads allocate from their own glibc arenas, which keep freed blocks resident, so their
    peaks add to the main thread's instead of taking turns with it (measured)."""
    H, I = c.hidden_size, c.intermediate_size
    t = min(tokens, PREFILL_CHUNK)
    q_width, kv_width = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    score_block = min(t, attention_block(c.num_attention_heads, tokens)) * tokens * (c.num_attention_heads * F32 + 3)
    attention = t * F32 * (2 * H + 3 * q_width + 2 * kv_width) + score_block
    mlp = t * F32 * (4 * H + (6 if c.family.activation == "gelu_tanh" else 5) * I)
    widest = max(H, I, q_width)
    worker = score_block + t * -(-widest // threads) * F32
    return max(attention, mlp) + (threads - 1) * worker


def scratch_bytes(c: ModelConfig, threads: int) -> int:
    """cpu_weights: each worker slot keeps reused buffers for the widest chunk of rows it dequantized —
    the float32 weight chunk (PREFILL_CHUNK_BYTES, at least 8 rows) plus, on the NumPy path, codes,
    byte planes and SWAR words (≤ 3/4 of it) or the fp16 path's sign words (= it): 2 chunks per
    thread bounds both."""
    widest = max(c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim)
    chunk = max(PREFILL_CHUNK_BYTES, 8 * widest * F32)
    return threads * 2 * chunk


def stack_bytes(c: ModelConfig, tokens: int) -> int:
    """A kernel stack's own arrays for one piece of t = min(tokens, PREFILL_CHUNK) rows (stacks multiply whole
    prefill pieces from the tiles, cpu_stack.py): the staged float32 output of the widest stack (q/k/v or
    gate/up side by side) and x rounded for the tiles (tile_x: x̂ float32 and the high and low int8 parts);
    the stage twice, as freed blocks glibc keeps resident (measured on SmolLM2 at 2048 positions: the peak
    grew by 5.4 MiB when stacks took prefill pieces, 0.1 MiB more than one stage and one x)."""
    t = min(tokens, PREFILL_CHUNK)
    q_width, kv_width = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    widest_stack = max(q_width + 2 * kv_width, 2 * c.intermediate_size, c.hidden_size)
    widest_input = max(c.hidden_size, c.intermediate_size, q_width)
    return t * (2 * widest_stack * F32 + widest_input * (F32 + 2))  # 2: a previous call's stage kept by glibc


def footprint(model_config: ModelConfig, file_bytes: int, context: int, batch: int = 1, device: str = "cpu",
              kernels: bool | str = True, *, tokenizer_bytes: int, threads: int | None = None,
              unpacked_bytes: int = 0) -> Footprint:
    """Peak memory of generating `context` positions (prompt + new tokens) × `batch` sequences from a
    `file_bytes` .mxq file in lean mode. tokenizer_bytes: the embedded tokenizer.json's size.
    unpacked_bytes: what the file's 6-bit metadata codes add once unpacked (unpacked_extra_nbytes).
    kernels: the compiled CPU kernels loaded — "aot" or True (built ahead of time, the default),
    "jit" (Numba's JIT), False or "" (none: MXQ_KERNELS=numpy). threads: the backend's worker threads
    (default: as NumpyBackend chooses). Batch > 1 multiplies the per-sequence terms (KV cache,
    activations, logits); `mxq generate` itself runs one sequence."""
    if device != "cpu":
        raise ModelError(f"the footprint model covers the CPU runtime only, not device {device!r}")
    if context < 1 or batch < 1:
        raise ModelError(f"context and batch must be >= 1, got context {context}, batch {batch}")
    c = model_config
    if context > c.max_position_embeddings:
        raise ModelError(f"context {context} exceeds the model's context of {c.max_position_embeddings}")
    threads = threads or default_threads()
    kind = "aot" if kernels is True else (kernels or "")
    if kind not in ("", *KERNEL_BYTES):
        raise ModelError(f"kernels must be one of aot, jit or none, got {kernels!r}")
    items = {
        "file": int(file_bytes),
        "unpacked": int(unpacked_bytes),
        "kv_cache": kv_cache_bytes(c, context, batch),
        "activations": activation_bytes(c, context, threads) * batch,
        "scratch": scratch_bytes(c, threads),
        "stacks": stack_bytes(c, context) * batch if kind else 0,
        "logits": c.vocab_size * F32 * batch,
        "tokenizer": TOKENIZER_LIBRARY_BYTES + TOKENIZER_BYTES_PER_JSON_BYTE * int(tokenizer_bytes),
        "python": PYTHON_BYTES,
        "allocator": ALLOCATOR_BYTES,
        "kernels": KERNEL_BYTES.get(kind, 0),
    }
    load_peak = (PYTHON_BYTES + ALLOCATOR_BYTES + items["kernels"] + TOKENIZER_LIBRARY_BYTES
                 + TOKENIZER_PARSE_PER_JSON_BYTE * int(tokenizer_bytes))
    return Footprint(items, context, batch, kind, load_peak)


def file_footprint(mxq_file, context: int, batch: int = 1, kernels: bool | str | None = None) -> Footprint:
    """The footprint of an open .mxq file (format_spec.MxqFile); kernels None: as this machine would run."""
    config = ModelConfig.from_json(mxq_file.model)
    return footprint(config, mxq_file.file_nbytes, context, batch,
                     kernels=kernels_kind() if kernels is None else kernels,
                     tokenizer_bytes=mxq_file.tokenizer_nbytes,
                     unpacked_bytes=sum(unpacked_extra_nbytes(e.shape, e.config) for e in mxq_file.tensors.values()))

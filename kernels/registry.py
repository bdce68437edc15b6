"""Every kernel entry point: its source file, exact argument list, and launch geometry helpers.

This table is the contract between the `.cu` sources and the Python code that launches them (the
CUDA backend on a GPU through CuPy, and the tests through the CPU emulator). Argument types use the
emulator's notation, which the emulator checks against the compiled C++ signatures:

    "const f32*"  pointer to float32 data (read only)      "f32*"  pointer the kernel writes
    "f16" = IEEE binary16 (numpy float16), "u32"/"u16"/"u8" unsigned, "i32" int32.
    Scalars ("i32", "f32") must be passed as numpy.int32 / numpy.float32: CuPy passes a Python int
    as a 64-bit value and a Python float as a double, which would silently misalign the arguments.
    A pointer argument may be None (NULL) where the kernel's doc says so (outliers, residual, row_ids).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# absolute: transformers probes for a top-level `kernels` package, which finds this folder when the
# repository root is on sys.path; a relative import beyond it would fail there
from mxq.format_spec import GROUP_SIZES
from mxq.format_spec import SUPPORTED_BITS as BITS
from mxq.format_spec.layout import TRELLIS_BITS, VQ_BITS, VQ_DIMS, VQ_SHARED_INDEX_BITS
AFFINE_CONFIGS = tuple((b, g) for b in BITS for g in GROUP_SIZES)
LUT_BITS = BITS  # gemv_lut.cu: one gemv_lut_b* and one dequant_lut_b*_f32 per bit width
# gemv_vq.cu: one gemv_vq_b*_d* and one dequant_vq_b*_d*_f32 per (bits, dim) — (2,2) (3,2) (4,2) (2,4), and
# (3,4) (12-bit indices, 4096 points: only with a shared codebook); the same kernels serve a tensor's own
# codebook and the file's shared one (both arrive as the `codebook` pointer); the group size (32, 64, 128)
# is a runtime argument
VQ_CONFIGS = tuple((b, d) for d in VQ_DIMS for b in VQ_BITS if b * d in VQ_SHARED_INDEX_BITS)
# gemv_trellis.cu: one gemv_trellis_b* and one dequant_trellis_b*_f32 per bits per weight (K = 2..5); the table is
# the file's one for K (the `codebook` pointer), the group size (32, 64, 128) a runtime argument
TRELLIS_KERNEL_BITS = TRELLIS_BITS

GEMV_ROWS_PER_WARP = 4  # gemv_affine.cu: GEMV_ROWS_PER_WARP; gemv_f16.cu: GEMV_F16_ROWS_PER_WARP
GEMV_MAX_WARPS = 8  # __launch_bounds__(256)
DEQUANT_MAX_THREADS = 128  # dequant_affine.cu
ATTN_MAX_HEAD_DIM = 256  # ops.cu
ATTN_MAX_WARPS = 8


@dataclass(frozen=True)
class Kernel:
    name: str
    source: str  # file name in kernels/
    args: tuple  # ((arg name, type), ...)

    @property
    def arg_types(self) -> tuple:
        return tuple(t for _, t in self.args)


_AFFINE_BLOBS = (
    ("qweight", "const u32*"),  # (out, n_packs·b), n_packs = ceil(in/g)·g/32
    ("scale_codes", "const u8*"),  # (out, n_groups)
    ("scale_meta", "const f16*"),  # (ceil(out·n_groups/128), 2)
    ("zero_codes", "const u8*"),
    ("zero_meta", "const f16*"),
    ("row_ptr", "const u32*"),  # (out+1,) or None
    ("cols", "const u16*"),  # (nnz,) or None
    ("vals", "const f16*"),  # (nnz,) or None
)
GEMV_ARGS = _AFFINE_BLOBS + (
    ("x", "const f32*"),  # (in,)
    ("residual", "const f32*"),  # (out,) or None; may be the same array as y
    ("y", "f32*"),  # (out,)
    ("out_features", "i32"),
    ("in_features", "i32"),
)


GEMV_F16_ARGS = (
    ("W", "const f16*"),  # (out, in) row-major; 16-byte aligned with in % 8 == 0 for the vector path
    ("x", "const f32*"),  # (in,)
    ("residual", "const f32*"),  # (out,) or None; may be the same array as y
    ("y", "f32*"),  # (out,)
    ("out_features", "i32"),
    ("in_features", "i32"),
)
GEMV_F16 = "gemv_f16"  # gemv_f16.cu: fp16 matrices at decode; launched with gemv_launch like gemv_affine_*


def _dequant_args(out_dtype: str) -> tuple:
    return _AFFINE_BLOBS + (
        ("row_ids", "const i32*"),  # (n_rows,) or None (rows 0..n_rows-1)
        ("out", f"{out_dtype}*"),  # (n_rows, ld_out)
        ("n_rows", "i32"),
        ("out_features", "i32"),
        ("in_features", "i32"),
        ("ld_out", "i32"),
    )


_LUT_BLOBS = (
    ("qweight", "const u32*"),  # (out, n_packs·b), n_packs = ceil(in/32)
    ("codebook", "const f16*"),  # (ceil(out/codebook_rows), 2^b)
    ("row_ptr", "const u32*"),  # (out+1,) or None
    ("cols", "const u16*"),  # (nnz,) or None
    ("vals", "const f16*"),  # (nnz,) or None
)
GEMV_LUT_ARGS = _LUT_BLOBS + GEMV_ARGS[len(_AFFINE_BLOBS):] + (("codebook_rows", "i32"),)
DEQUANT_LUT_ARGS = _LUT_BLOBS + (
    ("row_ids", "const i32*"),  # (n_rows,) or None (rows 0..n_rows-1)
    ("out", "f32*"),  # (n_rows, ld_out)
    ("n_rows", "i32"),
    ("out_features", "i32"),
    ("in_features", "i32"),
    ("ld_out", "i32"),
    ("codebook_rows", "i32"),
)


_VQ_BLOBS = (
    ("qweight", "const u32*"),  # (out, words_per_row): each row's ceil(in/d) (b·d)-bit indices, padded (SPEC §12.1)
    ("codebook", "const f16*"),  # (2^(b·d), d): the tensor's own or the file's shared one; 16-byte aligned for (3,4)
    ("scale_codes", "const u8*"),  # (out, n_groups), n_groups = ceil(in/group_size)
    ("scale_meta", "const f16*"),  # (ceil(out·n_groups/128), 2)
    ("row_ptr", "const u32*"),  # (out+1,) or None
    ("cols", "const u16*"),  # (nnz,) or None
    ("vals", "const f16*"),  # (nnz,) or None
)
_VQ_TAIL = (
    ("words_per_row", "i32"),  # qweight.shape[1]: whole packs up to format 1.7, whole words from 1.8
    ("group_size", "i32"),
)
GEMV_VQ_ARGS = _VQ_BLOBS + GEMV_ARGS[len(_AFFINE_BLOBS):] + _VQ_TAIL
DEQUANT_VQ_ARGS = _VQ_BLOBS + DEQUANT_LUT_ARGS[len(_LUT_BLOBS):-1] + _VQ_TAIL


_TRELLIS_BLOBS = (
    ("qweight", "const u32*"),  # (out, words_per_row): each row's stream of 12 + (in−1)·b bits, padded to words
    ("codebook", "const f16*"),  # (4096, 1): the file's table for b; 16-byte aligned for the GEMV's staging loads
    ("scale_codes", "const u8*"),  # (out, n_groups), n_groups = ceil(in/group_size)
    ("scale_meta", "const f16*"),  # (ceil(out·n_groups/128), 2)
)
_TRELLIS_TAIL = (
    ("words_per_row", "i32"),  # qweight.shape[1]: ceil((12 + (in−1)·b) / 32), no padding word
    ("group_size", "i32"),
)
GEMV_TRELLIS_ARGS = _TRELLIS_BLOBS + GEMV_ARGS[len(_AFFINE_BLOBS):] + _TRELLIS_TAIL
DEQUANT_TRELLIS_ARGS = _TRELLIS_BLOBS + DEQUANT_LUT_ARGS[len(_LUT_BLOBS):-1] + _TRELLIS_TAIL


def gemv_lut_name(bits: int) -> str:
    return f"gemv_lut_b{bits}"


def dequant_lut_name(bits: int) -> str:
    return f"dequant_lut_b{bits}_f32"


def gemv_vq_name(bits: int, dim: int) -> str:
    return f"gemv_vq_b{bits}_d{dim}"


def dequant_vq_name(bits: int, dim: int) -> str:
    return f"dequant_vq_b{bits}_d{dim}_f32"


def gemv_trellis_name(bits: int) -> str:
    return f"gemv_trellis_b{bits}"


def dequant_trellis_name(bits: int) -> str:
    return f"dequant_trellis_b{bits}_f32"


def gemv_name(bits: int, group_size: int) -> str:
    return f"gemv_affine_b{bits}_g{group_size}"


def dequant_name(bits: int, group_size: int, out_dtype: str = "f32") -> str:
    if out_dtype not in ("f32", "f16"):
        raise ValueError(f"dequant output dtype must be f32 or f16, got {out_dtype!r}")
    return f"dequant_affine_b{bits}_g{group_size}_{out_dtype}"


def _build() -> dict:
    kernels = []
    for b, g in AFFINE_CONFIGS:
        kernels.append(Kernel(gemv_name(b, g), "gemv_affine.cu", GEMV_ARGS))
        for dt in ("f32", "f16"):
            kernels.append(Kernel(dequant_name(b, g, dt), "dequant_affine.cu", _dequant_args(dt)))
    for b in LUT_BITS:
        kernels.append(Kernel(gemv_lut_name(b), "gemv_lut.cu", GEMV_LUT_ARGS))
        kernels.append(Kernel(dequant_lut_name(b), "gemv_lut.cu", DEQUANT_LUT_ARGS))
    for b, d in VQ_CONFIGS:
        kernels.append(Kernel(gemv_vq_name(b, d), "gemv_vq.cu", GEMV_VQ_ARGS))
        kernels.append(Kernel(dequant_vq_name(b, d), "gemv_vq.cu", DEQUANT_VQ_ARGS))
    for b in TRELLIS_KERNEL_BITS:
        kernels.append(Kernel(gemv_trellis_name(b), "gemv_trellis.cu", GEMV_TRELLIS_ARGS))
        kernels.append(Kernel(dequant_trellis_name(b), "gemv_trellis.cu", DEQUANT_TRELLIS_ARGS))
    kernels.append(Kernel(GEMV_F16, "gemv_f16.cu", GEMV_F16_ARGS))
    kernels += [
        Kernel("rmsnorm_f32", "ops.cu",
               (("x", "const f32*"), ("weight", "const f32*"), ("out", "f32*"), ("dim", "i32"), ("eps", "f32"))),
        Kernel("rope_f32", "ops.cu",
               (("x", "const f32*"), ("out", "f32*"), ("positions", "const i32*"), ("inv_freq", "const f32*"),
                ("n_tokens", "i32"), ("n_heads", "i32"), ("head_dim", "i32"), ("rotary_dim", "i32"),
                ("in_stride", "i32"), ("out_stride", "i32"))),
    ]
    for kv in ("f16", "f32"):
        kernels += [
            Kernel(f"attention_{kv}kv", "ops.cu",
                   (("q", "const f32*"), ("k_cache", f"const {kv}*"), ("v_cache", f"const {kv}*"), ("out", "f32*"),
                    ("part", "f32*"), ("n_heads", "i32"), ("n_kv_heads", "i32"), ("head_dim", "i32"),
                    ("n_queries", "i32"), ("kv_len", "i32"), ("capacity", "i32"), ("keys_per_split", "i32"),
                    ("scale", "f32"), ("window", "i32"))),
            Kernel(f"kv_store_{kv}", "ops.cu",
                   (("k", "const f32*"), ("v", "const f32*"), ("k_cache", f"{kv}*"), ("v_cache", f"{kv}*"),
                    ("n_tokens", "i32"), ("n_kv_heads", "i32"), ("head_dim", "i32"), ("src_stride", "i32"),
                    ("start_pos", "i32"), ("capacity", "i32"))),
        ]
    kernels += [
        Kernel("attention_combine", "ops.cu",
               (("part", "const f32*"), ("out", "f32*"), ("n_rows", "i32"), ("n_splits", "i32"),
                ("head_dim", "i32"))),
    ]
    kernels += [Kernel(name, "ops.cu",
                       (("gate", "const f32*"), ("up", "const f32*"), ("out", "f32*"), ("n_rows", "i32"),
                        ("n_cols", "i32"), ("in_stride", "i32"), ("out_stride", "i32")))
                for name in ("silu_mul_f32", "gelu_mul_f32")]
    kernels += [
        Kernel("embedding_f16", "ops.cu",
               (("ids", "const i32*"), ("table", "const f16*"), ("out", "f32*"), ("n_tokens", "i32"),
                ("dim", "i32"), ("vocab", "i32"))),
        Kernel("add_f32", "ops.cu", (("a", "const f32*"), ("b", "const f32*"), ("out", "f32*"), ("n", "i32"))),
        Kernel("scale_f32", "ops.cu", (("x", "const f32*"), ("out", "f32*"), ("n", "i32"), ("s", "f32"))),
    ]
    return {k.name: k for k in kernels}


KERNELS: dict[str, Kernel] = _build()
SOURCES: tuple = tuple(dict.fromkeys(k.source for k in KERNELS.values()))


def kernels_in(source: str) -> list[str]:
    return [k.name for k in KERNELS.values() if k.source == source]


# ---- launch geometry (grid, block) — the same on the GPU and in the emulator ----------------------

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemv_launch(out_features: int, warps: int | None = None) -> tuple[tuple, tuple]:
    """(grid, block) for gemv_affine_*, gemv_lut_*, gemv_vq_*, gemv_trellis_* and gemv_f16: `warps` warps per block,
    4 rows per warp. Default: 8 warps (32 rows per block: the activation tile staged per block is amortized over
    32 rows), 4 for small matrices (< 1024 rows) so that they still spread over the GPU's SMs."""
    if warps is None:
        warps = GEMV_MAX_WARPS if out_features >= 1024 else 4
    if not 1 <= warps <= GEMV_MAX_WARPS:
        raise ValueError(f"gemv warps per block must be 1..{GEMV_MAX_WARPS}")
    return (_cdiv(out_features, warps * GEMV_ROWS_PER_WARP), 1, 1), (32 * warps, 1, 1)


def dequant_launch(n_rows: int, threads: int = 128) -> tuple[tuple, tuple]:
    """(grid, block) for dequant_affine_*, dequant_lut_*, dequant_vq_* and dequant_trellis_*: one block per output
    row, 32..128 threads."""
    if threads % 32 or not 32 <= threads <= DEQUANT_MAX_THREADS:
        raise ValueError(f"dequant threads per block must be a multiple of 32 in 32..{DEQUANT_MAX_THREADS}")
    return (n_rows, 1, 1), (threads, 1, 1)


def rowwise_launch(n_rows: int, threads: int = 256) -> tuple[tuple, tuple]:
    """(grid, block) for rmsnorm_f32, embedding_f16, attention_combine: one block per row."""
    return (n_rows, 1, 1), (threads, 1, 1)


def elementwise_launch(n: int, threads: int = 256, max_blocks: int = 65535) -> tuple[tuple, tuple]:
    """(grid, block) for the grid-stride kernels (rope_f32: n = rope_items(...), kv_store_*:
    n_tokens·n_kv_heads·head_dim, silu_mul_f32 / gelu_mul_f32: n_rows·n_cols, add_f32 / scale_f32: n)."""
    return (max(1, min(_cdiv(n, threads), max_blocks)), 1, 1), (threads, 1, 1)


def rope_items(n_tokens: int, n_heads: int, head_dim: int, rotary_dim: int) -> int:
    """rope_f32's work items: per head, rotary_dim/2 rotated pairs and head_dim − rotary_dim copies."""
    return n_tokens * n_heads * (head_dim - rotary_dim // 2)


@dataclass(frozen=True)
class AttentionPlan:
    grid: tuple
    block: tuple
    keys_per_split: int
    n_splits: int
    part_shape: tuple  # float32 workspace for the split partials ((0,) when n_splits == 1)
    combine_grid: tuple  # attention_combine launch (only when n_splits > 1)
    combine_block: tuple


def attention_first_key(kv_len: int, n_queries: int, window: int = 0) -> int:
    """The first cache position any of the n_queries queries sees (ops.cu's attention_first_key):
    0 without a window (window = 0), else the earliest query's window start."""
    return max(0, kv_len - n_queries + 1 - window) if window > 0 else 0


def attention_launch(n_heads: int, n_queries: int, kv_len: int, head_dim: int, *, window: int = 0,
                     keys_per_split: int | None = None, warps: int = 4, target_blocks: int = 128) -> AttentionPlan:
    """Launch plan for attention_f16kv / attention_f32kv (+ attention_combine). The keys the queries
    can see ([attention_first_key, kv_len): all of them without a window, about window + n_queries − 1
    with one) are split so that about `target_blocks` blocks run (flash-decoding), but never fewer than
    64 keys per split."""
    if head_dim > ATTN_MAX_HEAD_DIM or head_dim < 1:
        raise ValueError(f"head_dim must be 1..{ATTN_MAX_HEAD_DIM}")
    if not 1 <= warps <= ATTN_MAX_WARPS:
        raise ValueError(f"attention warps per block must be 1..{ATTN_MAX_WARPS}")
    if window < 0:
        raise ValueError(f"attention window must be ≥ 0 (0: none), got {window}")
    n_keys = kv_len - attention_first_key(kv_len, n_queries, window)
    if keys_per_split is None:
        want_splits = max(1, target_blocks // max(1, n_heads * n_queries))
        keys_per_split = max(64, _cdiv(n_keys, want_splits))
    n_splits = max(1, _cdiv(n_keys, keys_per_split))
    part = (n_queries, n_heads, n_splits, head_dim + 2) if n_splits > 1 else (0,)
    return AttentionPlan((n_heads, n_splits, n_queries), (32 * warps, 1, 1), keys_per_split, n_splits, part,
                         (n_queries * n_heads, 1, 1), (min(256, 32 * math.ceil(head_dim / 32)), 1, 1))

"""A decode step's decoder layers as ONE compiled call (lean mode with the kernels; cpu_layers_kernels.py).

Model.block (runtime/model.py) as backend calls costs ~10 calls a layer — RMSNorm, the q/k/v stack, RoPE ×2,
attention, o, RMSNorm, the gate/up stack, SwiGLU, down — each a Python method, argument checks and a compiled
call's unboxing: ~3.8 ms of a SmolLM2 decode step's ~16 (bench_decode --breakdown: "rest"), more than the whole
attention. Here the same layer runs inside one compiled function, from a table of addresses made once per
model — per layer its norm weights, its four kernel stacks (cpu_stack.py) and its rotary frequencies — and
one per KV cache (its arrays' addresses: two threads may decode two caches of one model). Model.block stays
the reference: the fused layers run the same compiled pieces (cpu_ops, the stack and
team kernels) in the same order, and tests hold every family's logits to it.

A layer is fused when all four of its products are kernel stacks (affine blocks and vq blocks on the 8-bit grid
only: no fp16, lut or other vq block; cpu_stack.stackable) and the backend's compiled ops run; consecutive fused layers are one call, the others run Model.block.
This module has no Numba: the ahead-of-time kernels load without it.
"""
from __future__ import annotations

import math
import weakref

import numpy as np

from .cpu_team import CTRL_SIZE

# a layer's line of the table (int64): addresses (0: absent) and sizes
NORMS = ("attn_norm", "mlp_norm", "q_norm", "k_norm", "attn_out_norm", "mlp_out_norm")
STACK_FIELDS = ("table", "entries", "rows", "bias", "parts")  # a stack's fields, from its first
STACKS = ("qkv", "o", "gate_up", "down")
FIELDS = NORMS + tuple(f"{s}_{f}" for s in STACKS for f in STACK_FIELDS) + ("inv_freq", "n_freq", "window")
(ATTN_NORM, MLP_NORM, Q_NORM, K_NORM, ATTN_OUT_NORM, MLP_OUT_NORM) = range(len(NORMS))
STACK_TABLE, STACK_ENTRIES, STACK_ROWS, STACK_BIAS, STACK_PARTS = range(len(STACK_FIELDS))
QKV, O, GATE_UP, DOWN = (FIELDS.index(f"{s}_table") for s in STACKS)
INV_FREQ, N_FREQ, WINDOW = (FIELDS.index(f) for f in ("inv_freq", "n_freq", "window"))
KV_FIELDS = ("kc", "vc", "capacity")  # a layer's line of a cache's kv table: its keys' and values' addresses
KC, VC, CAPACITY = range(len(KV_FIELDS))
# the model's sizes (int64)
DIMS = ("q_width", "kv_width", "intermediate", "head_dim", "n_kv", "activation", "team_size", "attention_min_work")
(Q_WIDTH, KV_WIDTH, INTERMEDIATE, HEAD_DIM, N_KV, ACTIVATION, TEAM_SIZE, ATTENTION_MIN_WORK) = range(len(DIMS))


def address(a: np.ndarray) -> int:
    assert a.flags.c_contiguous, "fused layers' arrays must be C-contiguous"
    return a.__array_interface__["data"][0]


class FusedLayers:
    """The fused form of a model's layers on one backend (NumpyBackend.fused_layers makes it, once)."""

    def __init__(self, model, backend, attention_min_work: int):
        c, be = model.config, backend
        self.model, self.backend = model, backend
        self.keep = []  # arrays the table points to (biases, norm weights made contiguous)
        lines = []
        for i, w in enumerate(model.layers):
            stacks = [be.stack(members, 1) for members in ((w.q, w.k, w.v), (w.o,), (w.gate, w.up), (w.down,))]
            lines.append(None if None in stacks else self.line(model, i, w, stacks))
        self.fused = [line is not None for line in lines]
        self.table = np.array([line or [0] * len(FIELDS) for line in lines], np.int64)  # (layers, FIELDS)
        self.scales = np.array([1.0 / math.sqrt(c.head_dim) if c.attention_scale is None else c.attention_scale
                                for _ in model.layers], np.float64)
        dims = dict(q_width=c.num_attention_heads * c.head_dim,
                    kv_width=c.num_key_value_heads * c.head_dim, intermediate=c.intermediate_size,
                    head_dim=c.head_dim, n_kv=c.num_key_value_heads,
                    activation=int(c.family.activation == "gelu_tanh"),
                    team_size=be.team.size if be.team is not None else 1, attention_min_work=attention_min_work)
        self.dims = np.array([dims[name] for name in DIMS], np.int64)
        self.private_ctrl = np.zeros(CTRL_SIZE, np.int64)  # no team: its products all run serial (n_parts ≤ 1)
        self.runs = runs(self.fused)
        self.kv_tables = weakref.WeakKeyDictionary()  # cache → (its layers' key arrays, its kv table): see kv

    def array(self, a) -> int:
        a = np.ascontiguousarray(a, dtype=np.float32)
        self.keep.append(a)
        return address(a)

    def line(self, model, i: int, w, stacks) -> list[int]:
        line = dict.fromkeys(FIELDS, 0)
        for name in NORMS:
            if getattr(w, name) is not None:
                line[name] = self.array(getattr(w, name))
        biases = {"qkv": (w.q_bias, w.k_bias, w.v_bias), "o": (w.o_bias,), "gate_up": None, "down": None}
        for name, stack in zip(STACKS, stacks):
            bias = stack.bias(biases[name])
            line.update({f"{name}_table": address(stack.table), f"{name}_entries": stack.table.shape[0],
                         f"{name}_rows": address(stack.out_rows), f"{name}_bias": 0 if bias is None else self.array(bias),
                         f"{name}_parts": stack.team_parts})  # (0: the serial kernel)
        inv_freq = model.inv_freq[i]
        line.update(inv_freq=self.array(inv_freq), n_freq=inv_freq.shape[0])
        window = model.config.layer_window(i)
        line["window"] = -1 if window is None else int(window)
        return [int(line[name]) for name in FIELDS]

    def kv(self, cache) -> np.ndarray:
        """The cache's kv table (layers, KV_FIELDS) int64, made again when it grew. One per cache, apart from the
        shared table: two threads may decode two caches of one model."""
        arrays, table = self.kv_tables.get(cache, (None, None))
        if arrays is None or any(layer.k is not k for layer, k in zip(cache.layers, arrays)):
            table = np.array([[address(layer.k), address(layer.v), layer.k.shape[1]] for layer in cache.layers], np.int64)
            self.kv_tables[cache] = [layer.k for layer in cache.layers], table
        return table

    def run(self, x, positions, cache, start: int):
        """x (T, hidden) after every layer (Model.block's loop), or None when the compiled call failed or the team
        is busy with another thread's job (nothing written then but this step's cache positions, which the
        caller's Model.block rewrites)."""
        be, model = self.backend, self.model
        kv = self.kv(cache)
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        eps = float(model.config.rms_norm_eps)
        for first, end, fused in self.runs:
            if not fused:
                for i in range(first, end):
                    x = model.block(i, x, positions, cache.layers[i], start)
                continue
            x = np.ascontiguousarray(x, dtype=np.float32)
            out = np.empty_like(x)
            args = (x, self.table[first:end], kv[first:end], self.scales[first:end], positions, int(start), self.dims, eps)
            if be.team is None:
                done = be.run_op(be.team_kernels.decode_layers, *args, out, self.private_ctrl)
            else:
                done = be.run_team(be.team_kernels.decode_layers, *args, out, op=True)  # (+ team.ctrl)
            if not done:
                return None
            x = out
        return x


def runs(flags: list[bool]) -> list[tuple[int, int, bool]]:
    """[(first, end, flag)] of the consecutive equal flags."""
    out = []
    for i, flag in enumerate(flags):
        if out and out[-1][2] == flag:
            out[-1] = (out[-1][0], i + 1, flag)
        else:
            out.append((i, i + 1, flag))
    return out


_EXAMPLE_ARRAYS = []  # what the example table points to, kept alive


def example_layers() -> tuple:
    """decode_layers' arguments for a two-layer model of 4-bit stacks (hidden 64, 2 heads of 32, 1 kv head,
    intermediate 64; q/k norms and biases on the first layer, out norms on the second), typed as run() passes them."""
    from .cpu_stack_kernels import example_table

    rng = np.random.default_rng(0)
    hidden, head_dim, n_kv, inter = 64, 32, 1, 64

    def stack(rows, cols):
        packed = rng.integers(0, 256, (rows, cols * 4 // 8)).astype(np.uint8)
        codes = rng.integers(0, 256, (rows, cols // 32)).astype(np.uint8)
        meta = np.full((1, 2), 0.01, np.float32)
        table = example_table(packed, codes, meta, 4, 32)
        out_rows = np.arange(rows, dtype=np.int64)
        _EXAMPLE_ARRAYS.extend((table, out_rows))
        return table, out_rows

    def vec(n):
        a = rng.standard_normal(n).astype(np.float32)
        _EXAMPLE_ARRAYS.append(a)
        return address(a)

    lines, kv = [], []
    for i in range(2):
        line = dict.fromkeys(FIELDS, 0)
        line.update(attn_norm=vec(hidden), mlp_norm=vec(hidden))
        if i == 0:
            line.update(q_norm=vec(head_dim), k_norm=vec(head_dim), qkv_bias=vec(2 * head_dim + 2 * head_dim))
        else:
            line.update(attn_out_norm=vec(hidden), mlp_out_norm=vec(hidden))
        for name, (rows, cols) in zip(STACKS, ((4 * head_dim, hidden), (hidden, 2 * head_dim), (2 * inter, hidden),
                                              (hidden, inter))):
            table, out_rows = stack(rows, cols)
            line.update({f"{name}_table": address(table), f"{name}_entries": 1, f"{name}_rows": address(out_rows)})
        line.update(inv_freq=vec(head_dim // 2), n_freq=head_dim // 2, window=-1)
        lines.append([int(line[name]) for name in FIELDS])
        kc, vc = (np.zeros((n_kv, 4, head_dim), np.float32) for _ in range(2))
        _EXAMPLE_ARRAYS.extend((kc, vc))
        kv.append([address(kc), address(vc), 4])
    dims = dict(q_width=2 * head_dim, kv_width=n_kv * head_dim, intermediate=inter, head_dim=head_dim,
                n_kv=n_kv, activation=0, team_size=1, attention_min_work=1 << 15)
    x = rng.standard_normal((1, hidden)).astype(np.float32)
    return (x, np.array(lines, np.int64), np.array(kv, np.int64), np.full(2, 0.125), np.arange(1, dtype=np.int64), 0,
            np.array([dims[name] for name in DIMS], np.int64), 1e-5, np.empty_like(x), np.zeros(CTRL_SIZE, np.int64))

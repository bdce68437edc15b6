"""The compiled side of cpu_layers.py: a decode step's decoder layers as ONE compiled call.

    decode_layers(x, layers, kv, scales, positions, start, dims, eps, out, ctrl)

runs runtime/model.py's Model.block — the reference, read it first — for every row of `layers`, in order, on
x (T, hidden) float32 at `positions` (T,) = start .. start+T-1, writing each layer's keys and values into its
cache and the last layer's residual stream into out (T, hidden). The same compiled pieces as the backend's
one-call-per-op path: cpu_ops' rms_norm / rope / silu_mul / gelu_mul / attention_serial, and the stack products of
cpu_stack_kernels (serial) or cpu_team_kernels (the team: n_parts > 1), so the results equal that path's up to
the summation order fastmath may pick in another compiled function.

    layers  (n, len(cpu_layers.FIELDS)) int64: per layer the addresses of its norm weights (0: absent),
            its four kernel stacks (table, entries, out_rows, bias or 0, team parts), its rotary
            frequencies and its window (-1: none)
    kv      (n, len(cpu_layers.KV_FIELDS)) int64: per layer its cache's keys and values (n_kv, capacity, head_dim)
            float32: their addresses and the capacity
    scales  (n,) float64: each layer's attention scale
    dims    (len(cpu_layers.DIMS),) int64: the q/k/v and MLP widths, head_dim, the activation (0 SwiGLU, 1 GeGLU),
            the team's size (1: no team) and the work (MACs) from which attention runs on the team
    ctrl    the team's shared words (cpu_team.py); a private array when there is no team
"""
from __future__ import annotations

import numpy as np
from numba import carray, njit

from .cpu_kernels import SERIAL, pointer
from .cpu_layers import (ACTIVATION, ATTENTION_MIN_WORK, ATTN_NORM, ATTN_OUT_NORM, CAPACITY, DOWN, GATE_UP,
                         HEAD_DIM, INTERMEDIATE, INV_FREQ, K_NORM, KC, KV_WIDTH, MLP_NORM, MLP_OUT_NORM, N_FREQ,
                         N_KV, O, Q_NORM, Q_WIDTH, QKV, STACK_BIAS, STACK_ENTRIES, STACK_PARTS, STACK_ROWS, STACK_TABLE,
                         TEAM_SIZE, VC, WINDOW)
from .cpu_ops import attention_serial, gelu_mul, rms_norm, rope, silu_mul
from .cpu_stack import FIELDS as STACK_FIELDS
from .cpu_stack_kernels import stack_matmul_serial
from .cpu_team_kernels import attention_team, stack_matmul_team

N_STACK_FIELDS = len(STACK_FIELDS)


@njit(**SERIAL)
def vector(address, n):
    """The float32 (n,) array at address."""
    return carray(pointer(address), (n,), np.float32)


@njit(**SERIAL)
def product(layer, which, width, x, residual, ctrl):
    """x (T, in) @ stack `which` of `layer` (its fields from `which` on) + its bias + residual → (T, width)."""
    n = layer[which + STACK_ENTRIES]
    table = carray(pointer(layer[which + STACK_TABLE]), (n, N_STACK_FIELDS), np.int64)
    out_rows = carray(pointer(layer[which + STACK_ROWS]), (width,), np.int64)
    bias = vector(layer[which + STACK_BIAS], width) if layer[which + STACK_BIAS] else np.zeros(0, np.float32)
    y = np.empty((x.shape[0], width), np.float32)
    n_parts = layer[which + STACK_PARTS]
    if n_parts > 1:
        stack_matmul_team(x, table, out_rows, bias, residual, y, n_parts, ctrl)
    else:
        stack_matmul_serial(x, table, out_rows, bias, residual, y, 1)
    return y


@njit(**SERIAL)
def head_norm(x, address, head_dim, eps):
    """RMSNorm over every head of x (T, n·head_dim) with one (head_dim,) weight (Model.head_norm)."""
    T, width = x.shape
    out = np.empty((T, width), np.float32)
    rms_norm(np.ascontiguousarray(x).reshape(T * (width // head_dim), head_dim), vector(address, head_dim), eps,
             out.reshape(T * (width // head_dim), head_dim))
    return out


@njit(**SERIAL)
def branch_sum(x, layer, which, width, branch, out_norm, eps, ctrl):
    """Model.residual: x + branch @ Wᵀ (+ bias), the branch output normed first when out_norm is not 0."""
    if out_norm == 0:
        return product(layer, which, width, branch, x, ctrl)
    y = product(layer, which, width, branch, np.zeros((0, 0), np.float32), ctrl)
    normed = np.empty(y.shape, np.float32)
    rms_norm(y, vector(out_norm, width), eps, normed)
    return normed + x


@njit(**SERIAL)
def decode_layers(x, layers, kv, scales, positions, start, dims, eps, out, ctrl):
    T, hidden = x.shape
    q_width, kv_width, inter, head_dim = dims[Q_WIDTH], dims[KV_WIDTH], dims[INTERMEDIATE], dims[HEAD_DIM]
    n_kv = dims[N_KV]
    for i in range(layers.shape[0]):
        layer = layers[i]
        # attention block
        h = np.empty((T, hidden), np.float32)
        rms_norm(x, vector(layer[ATTN_NORM], hidden), eps, h)
        qkv = product(layer, QKV, q_width + 2 * kv_width, h, np.zeros((0, 0), np.float32), ctrl)
        q, k, v = qkv[:, :q_width], qkv[:, q_width:q_width + kv_width], qkv[:, q_width + kv_width:]
        if layer[Q_NORM] != 0:  # (Qwen3, Gemma 3)
            q = head_norm(q, layer[Q_NORM], head_dim, eps)
        if layer[K_NORM] != 0:
            k = head_norm(k, layer[K_NORM], head_dim, eps)
        inv_freq = vector(layer[INV_FREQ], layer[N_FREQ])
        q_rot = np.empty((T, q_width), np.float32)
        k_rot = np.empty((T, kv_width), np.float32)
        rope(q, positions, inv_freq, head_dim, q_rot)
        rope(k, positions, inv_freq, head_dim, k_rot)
        kc = carray(pointer(kv[i, KC]), (n_kv, kv[i, CAPACITY], head_dim), np.float32)
        vc = carray(pointer(kv[i, VC]), (n_kv, kv[i, CAPACITY], head_dim), np.float32)
        for t in range(T):  # this step's keys and values into the cache (the backend's attention does the same)
            for j in range(n_kv):
                for d in range(head_dim):
                    kc[j, start + t, d] = k_rot[t, j * head_dim + d]
                    vc[j, start + t, d] = v[t, j * head_dim + d]
        a = np.empty((T, q_width), np.float32)
        scale, window = np.float32(scales[i]), layer[WINDOW]
        if dims[TEAM_SIZE] > 1 and T * (start + T) * q_width >= dims[ATTENTION_MIN_WORK]:
            attention_team(q_rot, kc, vc, start, scale, window, a, ctrl)
        else:
            attention_serial(q_rot, kc, vc, start, scale, window, a, 1)
        x = branch_sum(x, layer, O, hidden, a, layer[ATTN_OUT_NORM], eps, ctrl)
        # MLP block (SwiGLU or GeGLU)
        rms_norm(x, vector(layer[MLP_NORM], hidden), eps, h)
        gate_up = product(layer, GATE_UP, 2 * inter, h, np.zeros((0, 0), np.float32), ctrl)
        m = np.empty((T, inter), np.float32)
        if dims[ACTIVATION] == 1:
            gelu_mul(gate_up[:, :inter], gate_up[:, inter:], m)
        else:
            silu_mul(gate_up[:, :inter], gate_up[:, inter:], m)
        x = branch_sum(x, layer, DOWN, hidden, m, layer[MLP_OUT_NORM], eps, ctrl)
    out[:] = x


def examples():
    """(kernel name, arguments) typed as cpu_layers calls it: a two-layer model of 4-bit stacks, hidden 64."""
    from .cpu_layers import example_layers

    yield "decode_layers", example_layers()


def warm_up() -> None:
    for name, args in examples():
        globals()[name](*args)

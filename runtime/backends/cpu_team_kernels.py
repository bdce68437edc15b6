"""The compiled side of cpu_team.py (a team of threads for the decode products, without OpenMP): the calling thread publishes a
product as a job of numbered parts, and every thread of the team — the caller included — claims parts
until none is left; the caller then waits only for the parts others claimed and are still running.

    stack_matmul_team(x, table, out_rows, bias, residual, y, n_parts, ctrl)   = stack_matmul (cpu_stack_kernels)
    fp16_matmul_team(x, half_bits, bias, residual, y, n_parts, ctrl)          = fp16_matmul
    vq_grid_matmul_team(x, packed, book, ..., y, n_parts, ctrl)               = vq_grid_matmul (cpu_vq_kernels)
    attention_team(q, kc, vc, start, scale, window, out, ctrl)                = cpu_ops.attention_serial, a query head a part
    team_serve(ctrl, spins)            a worker: claims parts of every new job; returns after `spins` idle
                                       polls (cpu_team.IDLE_S, ~5 ms) without one, or when ctrl[STOP] is set

Why. Numba's parallel loops (OpenMP) wake sleeping workers for every product: ~100 µs per wake-up on
this 2-core machine, more than a SmolLM2 product takes, so decode ran on one thread (ThreadChoice), and
the kernels built ahead of time (cpu_aot.py) cannot be parallel at all. Here a worker (a Python thread
of Team, inside the nogil compiled team_serve) spins between jobs, polling one shared word, so a job
starts on it within about a microsecond; it goes back to sleep (a threading.Event) after ~5 ms without
work (cpu_team.IDLE_S), and the caller wakes it again with the next job. A worker that is asleep, descheduled or slow
never holds the caller up: the caller claims the parts nobody took. So on a busy machine a product
degrades to the serial one instead of waiting a scheduler period for a worker.

The shared words (ctrl, int64; each on its own cache line):
    ctrl[TICKET]  (seq << 32) | (n_parts << 16) | next_part: the current job; a part is claimed by one
                  compare-and-swap of next_part → next_part + 1 that also checks seq (a worker that
                  looked at an older job can never claim a part of a newer one)
    ctrl[DONE]    parts of the current job finished (atomic add after each part)
    ctrl[JOB]     address of the current job's int64 argument array (written before the ticket; read
                  only after a successful claim, when the caller is still waiting for that part)
    ctrl[AWAKE]   workers inside team_serve (Team.wake sets the sleepers' events when fewer than all)
    ctrl[STOP]    set by Team.close: workers return
A job's arguments are addresses and sizes of its arrays (the caller's, alive until every part is done)
and each part runs exactly the serial kernels' loops (cpu_stack_kernels.entry_units, fp16_rows,
cpu_ops._head) on its share of the rows or heads, so the results equal the serial kernels' up to the
summation order fastmath may pick in another compiled function.
Atomics are LLVM's (acquire loads, release stores, acq_rel read-modify-writes), and waiting polls with the
CPU's spin hint (x86 pause, AArch64 yield): correct on weakly ordered CPUs as on x86.
"""
from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic

from .cpu_kernels import BLOCK, SERIAL, fp16_rows, pointer, quantize_x, tile_x
from .cpu_ops import _head
from .cpu_stack import FIELDS
from .cpu_stack_kernels import stack_blocks, stack_part_units, unstage
from .cpu_vq_kernels import grid_part
from .cpu_weights import NO_MAP
from .cpu_team import AWAKE, CTRL_SIZE, DONE, JOB, STOP, TICKET

N_FIELDS = len(FIELDS)

KIND_STACK, KIND_FP16, KIND_ATTENTION, KIND_VQ_GRID = 1, 2, 3, 4


def _slot(context, builder, signature, args):
    """Pointer to array[index] for an intrinsic's first two arguments (a 1-D int64 array, an index)."""
    data = context.make_array(signature.args[0])(context, builder, args[0]).data
    return builder.gep(data, [context.cast(builder, args[1], signature.args[1], types.intp)])


def _int64s(context, builder, signature, args):
    """An intrinsic's arguments after the first two, as int64 values."""
    return [context.cast(builder, a, t, types.int64) for a, t in zip(args[2:], signature.args[2:])]


def _typed(array, *integers) -> bool:
    """Whether an intrinsic's arguments are a 1-D int64 array and integers (else Numba tries others)."""
    return (isinstance(array, types.Array) and array.dtype == types.int64 and array.ndim == 1
            and all(isinstance(t, types.Integer) for t in integers))


@intrinsic
def atomic_load(typingctx, array, index):
    """array[index] (int64) read with acquire order."""
    if not _typed(array, index):
        return None

    def codegen(context, builder, signature, args):
        return builder.load_atomic(_slot(context, builder, signature, args), "acquire", 8)

    return types.int64(array, index), codegen


@intrinsic
def atomic_store(typingctx, array, index, value):
    """array[index] = value (int64) with release order."""
    if not _typed(array, index, value):
        return None

    def codegen(context, builder, signature, args):
        value, = _int64s(context, builder, signature, args)
        builder.store_atomic(value, _slot(context, builder, signature, args), "release", 8)
        return context.get_dummy_value()

    return types.void(array, index, value), codegen


@intrinsic
def atomic_add(typingctx, array, index, value):
    """array[index] += value atomically (acq_rel); returns the old value."""
    if not _typed(array, index, value):
        return None

    def codegen(context, builder, signature, args):
        value, = _int64s(context, builder, signature, args)
        return builder.atomic_rmw("add", _slot(context, builder, signature, args), value, "acq_rel")

    return types.int64(array, index, value), codegen


@intrinsic
def compare_and_swap(typingctx, array, index, expected, new):
    """If array[index] == expected, set it to new (acq_rel); whether it did."""
    if not _typed(array, index, expected, new):
        return None

    def codegen(context, builder, signature, args):
        old, new_value = _int64s(context, builder, signature, args)
        result = builder.cmpxchg(_slot(context, builder, signature, args), old, new_value, "acq_rel", "acquire")
        return builder.extract_value(result, 1)

    return types.boolean(array, index, expected, new), codegen


MACHINE = platform.machine().lower()


@intrinsic
def spin_hint(typingctx):
    """The CPU's busy-wait hint (x86 pause, AArch64 yield; nothing elsewhere)."""
    def codegen(context, builder, signature, args):
        if MACHINE in ("x86_64", "amd64", "i686", "i386"):
            fn = builder.module.declare_intrinsic("llvm.x86.sse2.pause", fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(fn, [])
        elif MACHINE in ("aarch64", "arm64"):
            fn = builder.module.declare_intrinsic("llvm.aarch64.hint", fnty=ir.FunctionType(ir.VoidType(), [ir.IntType(32)]))
            builder.call(fn, [ir.Constant(ir.IntType(32), 1)])
        return context.get_dummy_value()

    return types.void(), codegen


# -- the protocol ----------------------------------------------------------------------------------------

@njit(**SERIAL)
def claim(ctrl, seq):
    """The number of a part of job `seq` this thread now owns, or -1 when none is left (or a newer job runs)."""
    while True:
        ticket = atomic_load(ctrl, TICKET)
        if (ticket >> 32) != seq:
            return -1
        part, n_parts = ticket & 0xFFFF, (ticket >> 16) & 0xFFFF
        if part >= n_parts:
            return -1
        if compare_and_swap(ctrl, TICKET, ticket, ticket + 1):
            return part


@njit(**SERIAL)
def work(ctrl, seq):
    """Claim and run parts of job `seq` until none is left."""
    while True:
        part = claim(ctrl, seq)
        if part < 0:
            return
        run_part(ctrl[JOB], part)
        atomic_add(ctrl, DONE, 1)


@njit(**SERIAL)
def run_job(ctrl, job, n_parts):
    """Publish `job` (an int64 argument array, job[1] = n_parts) as the next job, work on it, and return
    when all its parts are done. The caller keeps the job's arrays alive until then."""
    ctrl[JOB] = job.ctypes.data
    atomic_store(ctrl, DONE, 0)
    seq = (atomic_load(ctrl, TICKET) >> 32) + 1
    atomic_store(ctrl, TICKET, (seq << 32) | (n_parts << 16))
    work(ctrl, seq)
    while atomic_load(ctrl, DONE) < n_parts:
        spin_hint()


@njit(**SERIAL)
def team_serve(ctrl, spins):
    """A worker's loop (see the module doc): runs parts of every new job; returns after `spins` idle polls."""
    atomic_add(ctrl, AWAKE, 1)
    seen, idle = np.int64(-1), 0
    while idle < spins and atomic_load(ctrl, STOP) == 0:
        seq = atomic_load(ctrl, TICKET) >> 32
        if seq != seen:
            seen = seq
            work(ctrl, seq)
            idle = 0
        else:
            spin_hint()
            idle += 1
    atomic_add(ctrl, AWAKE, -1)


# -- jobs ------------------------------------------------------------------------------------------------
# Argument arrays (int64): [kind, n_parts, ...]; addresses are of C-contiguous arrays.
# stack:     T, table, n entries, stage, stage cols, x_hat, x_hat cols, x blocks, then x as the tile kernels take
#            it (cpu_kernels.tile_x): high, low, dx, xsum. Parts write stored rows to the stage (staged_units);
#            the caller then adds bias and residual and puts the rows in their places (unstage).
# fp16:      T, half_bits, rows, cols, x, bias, bias size, residual, residual cols, y
# attention: T, q, q cols, kc, n_kv, capacity, head_dim, vc, start, window, out, scale (float64 bits)
# vq grid:   T, packed, rows, row bytes, book, points, index bits, grid step (float64 bits), scale codes, groups,
#            scale meta, runs, group size, row_ptr, its size, cols, values, nnz, bias, bias size, residual, residual
#            cols, y, then x as cpu_kernels.quantize_x gives it: high, low, dx, blocks, xsum, xsum cols, x_hat, in, pair
JOB_WORDS = 36  # a job's argument array: the longest kind (vq grid) uses 34


@njit(**SERIAL)
def run_part(address, part):
    """Part `part` of the job whose argument array is at `address` (its kind and n_parts: the first two)."""
    head = carray(pointer(address), (2,), np.int64)
    kind, n_parts = head[0], head[1]
    if kind == KIND_STACK:
        stack_part(address, part, n_parts)
    elif kind == KIND_FP16:
        fp16_part(address, part, n_parts)
    elif kind == KIND_ATTENTION:
        attention_part(address, part)
    elif kind == KIND_VQ_GRID:
        vq_grid_part(address, part, n_parts)


@njit(**SERIAL)
def fp16_part(address, part, n_parts):
    """Part `part` of an fp16 job: its share of the rows (as cpu_kernels.fp16_matmul's parts)."""
    job = carray(pointer(address), (JOB_WORDS,), np.int64)
    T, R, C = job[2], job[4], job[5]
    half_bits = carray(pointer(job[3]), (R, C), np.uint16)
    x = carray(pointer(job[6]), (T, C), np.float32)
    bias = carray(pointer(job[7]), (job[8],), np.float32)
    residual = carray(pointer(job[9]), (T, job[10]), np.float32)
    y = carray(pointer(job[11]), (T, R), np.float32)
    step = -(-R // n_parts)
    fp16_rows(part * step, min(R, (part + 1) * step), x, half_bits, bias, residual, y)


@njit(**SERIAL)
def attention_part(address, part):
    """Part `part` of an attention job: query head `part` (cpu_ops._head reads its kv head's keys and values
    once per query head, so parts of one kv head cost nothing extra; a part per kv head split SmolLM2's 3
    over two threads 2:1)."""
    job = carray(pointer(address), (JOB_WORDS,), np.int64)
    T, cols, n_kv, capacity, head_dim = job[2], job[4], job[6], job[7], job[8]
    q = carray(pointer(job[3]), (T, cols), np.float32)
    kc = carray(pointer(job[5]), (n_kv, capacity, head_dim), np.float32)
    vc = carray(pointer(job[9]), (n_kv, capacity, head_dim), np.float32)
    out = carray(pointer(job[12]), (T, cols), np.float32)
    scale = np.float32(carray(pointer(address + 8 * 13), (1,), np.float64)[0])
    heads(q, kc, vc, job[10], scale, job[11], out, part, part + 1)


@njit(**SERIAL)
def heads(q, kc, vc, start, scale, window, out, h0, h1):
    """Query heads h0 .. h1-1 of cpu_ops.attention_serial. (The loop starts at 0: with qh from h0, Numba could
    not prove the column indices non-negative and the head's loops, wrapping negative indices around, ran
    2.7x slower — measured.)"""
    n_kv, _, head_dim = kc.shape
    n_rep = q.shape[1] // head_dim // n_kv
    for qh in range(h1):
        if qh >= h0:
            _head(q, kc, vc, start, scale, window, out, n_rep, head_dim, qh)


@njit(**SERIAL)
def stack_part(address, part, n_parts):
    """Part `part` of a stack job: its stretch of the entries' units (as cpu_stack_kernels.stack_matmul's parts)."""
    job = carray(pointer(address), (JOB_WORDS,), np.int64)
    T, n, blocks = job[2], job[4], job[9]
    table = carray(pointer(job[3]), (n, N_FIELDS), np.int64)
    stage = carray(pointer(job[5]), (T, job[6]), np.float32)
    x_hat = carray(pointer(job[7]), (T, job[8]), np.float32)
    x_parts = (carray(pointer(job[10]), (T, blocks * BLOCK), np.int8), carray(pointer(job[11]), (T, blocks * BLOCK), np.int8),
               carray(pointer(job[12]), (T, blocks), np.float32), carray(pointer(job[13]), (T, blocks), np.float32))
    stack_part_units(table, x_parts, x_hat, stage, part, n_parts)


@njit(**SERIAL)
def vq_grid_part(address, part, n_parts):
    """Part `part` of a vq grid job: its share of the rows (as cpu_vq_kernels.vq_grid_matmul's parts)."""
    job = carray(pointer(address), (JOB_WORDS,), np.int64)
    T, R, n_bytes, G, blocks = job[2], job[4], job[5], job[11], job[28]
    packed = carray(pointer(job[3]), (R, n_bytes), np.uint8)
    book = carray(pointer(job[6]), (job[7], 4), np.uint8)
    grid_step = np.float32(carray(pointer(address + 8 * 9), (1,), np.float64)[0])
    scale_codes = carray(pointer(job[10]), (R, G), np.uint8)
    scale_meta = carray(pointer(job[12]), (job[13], 2), np.float32)
    row_ptr = carray(pointer(job[15]), (job[16],), np.uint32)
    cols = carray(pointer(job[17]), (job[19],), np.uint16)
    values = carray(pointer(job[18]), (job[19],), np.uint16)
    bias = carray(pointer(job[20]), (job[21],), np.float32)
    residual = carray(pointer(job[22]), (T, job[23]), np.float32)
    y = carray(pointer(job[24]), (T, R), np.float32)
    high = carray(pointer(job[25]), (T, blocks * BLOCK), np.int8)
    low = carray(pointer(job[26]), (T, blocks * BLOCK), np.int8)
    dx = carray(pointer(job[27]), (T, blocks), np.float32)
    xsum = carray(pointer(job[29]), (T, job[30]), np.float32)
    x_hat = carray(pointer(job[31]), (T, job[32]), np.float32)
    step = -(-R // n_parts)
    a = (packed, book, grid_step, scale_codes, scale_meta, row_ptr, cols, values, bias, residual, y, high, low, dx, xsum,
         x_hat, NO_MAP)
    grid_part(part * step, min(R, (part + 1) * step), a, job[8], job[14], job[33] != 0)


@njit(**SERIAL)
def vq_grid_matmul_team(x, packed, book, index_bits, grid_step, scale_codes, scale_meta, group_size, row_ptr, cols,
                        values, bias, residual, y, n_parts, ctrl):
    """cpu_vq_kernels.vq_grid_matmul with the team: x rounded here, the rows in n_parts parts."""
    n_blocks = scale_codes.shape[1] * group_size // BLOCK
    pair = n_blocks % 2 == 0
    high, low, dx, xsum, x_hat = quantize_x(x, 8, group_size, n_blocks, pair)
    job = np.zeros(JOB_WORDS, np.int64)
    job[0], job[1], job[2], job[3], job[4], job[5] = KIND_VQ_GRID, n_parts, x.shape[0], packed.ctypes.data, \
        packed.shape[0], packed.shape[1]
    job[6], job[7], job[8] = book.ctypes.data, book.shape[0], index_bits
    job.view(np.float64)[9] = np.float64(grid_step)
    job[10], job[11], job[12], job[13], job[14] = scale_codes.ctypes.data, scale_codes.shape[1], \
        scale_meta.ctypes.data, scale_meta.shape[0], group_size
    job[15], job[16], job[17], job[18], job[19] = row_ptr.ctypes.data, row_ptr.size, cols.ctypes.data, \
        values.ctypes.data, cols.size
    job[20], job[21], job[22] = bias.ctypes.data, bias.size, residual.ctypes.data
    job[23], job[24] = residual.shape[1] if residual.size > 0 else 0, y.ctypes.data
    job[25], job[26], job[27], job[28] = high.ctypes.data, low.ctypes.data, dx.ctypes.data, n_blocks
    job[29], job[30], job[31], job[32], job[33] = xsum.ctypes.data, xsum.shape[1], x_hat.ctypes.data, \
        x_hat.shape[1], 1 if pair else 0
    run_job(ctrl, job, n_parts)
    return high.size + low.size + dx.size + xsum.size + x_hat.shape[0] + job[0]  # alive until every part is done


@njit(**SERIAL)
def stack_matmul_team(x, table, out_rows, bias, residual, y, n_parts, ctrl):
    """cpu_stack_kernels.stack_matmul with the team: x rounded here, the units in n_parts parts."""
    high, low, steps, xsum, x_hat = tile_x(x, stack_blocks(table))
    job = np.zeros(JOB_WORDS, np.int64)
    stage = np.empty(y.shape, np.float32)
    job[0], job[1], job[2], job[3], job[4] = KIND_STACK, n_parts, x.shape[0], table.ctypes.data, table.shape[0]
    job[5], job[6], job[7], job[8], job[9] = stage.ctypes.data, stage.shape[1], x_hat.ctypes.data, x_hat.shape[1], \
        steps.shape[1]
    job[10], job[11], job[12], job[13] = high.ctypes.data, low.ctypes.data, steps.ctypes.data, xsum.ctypes.data
    run_job(ctrl, job, n_parts)
    unstage(stage, out_rows, bias, residual, y)
    return high.size + low.size + xsum.size + x_hat.shape[0] + job[0]  # used after the job: alive until every part is done


@njit(**SERIAL)
def fp16_matmul_team(x, half_bits, bias, residual, y, n_parts, ctrl):
    """cpu_kernels.fp16_matmul with the team (rows in n_parts parts)."""
    job = np.zeros(JOB_WORDS, np.int64)
    job[0], job[1], job[2], job[3], job[4], job[5] = (KIND_FP16, n_parts, x.shape[0], half_bits.ctypes.data,
                                                      half_bits.shape[0], half_bits.shape[1])
    job[6], job[7], job[8], job[9] = x.ctypes.data, bias.ctypes.data, bias.size, residual.ctypes.data
    job[10], job[11] = residual.shape[1] if residual.size > 0 else 0, y.ctypes.data
    run_job(ctrl, job, n_parts)
    return job[0]


@njit(**SERIAL)
def attention_team(q, kc, vc, start, scale, window, out, ctrl):
    """cpu_ops.attention with the team: one part per query head."""
    n_kv, capacity, head_dim = kc.shape
    job = np.zeros(JOB_WORDS, np.int64)
    job[0], job[1], job[2], job[3], job[4], job[5] = KIND_ATTENTION, n_kv, q.shape[0], q.ctypes.data, q.shape[1], \
        kc.ctypes.data
    job[6], job[7], job[8], job[9], job[10], job[11] = n_kv, capacity, head_dim, vc.ctypes.data, start, window
    job[12] = out.ctypes.data
    job.view(np.float64)[13] = np.float64(scale)
    run_job(ctrl, job, q.shape[1] // head_dim)
    return job[0]


def examples():
    """(kernel name, arguments) typed as the backend calls them (see cpu_kernels.examples)."""
    from . import cpu_kernels, cpu_ops, cpu_stack_kernels, cpu_vq_kernels

    ctrl = np.zeros(CTRL_SIZE, np.int64)
    kernels = dict(cpu_kernels.examples())
    yield "stack_matmul_team", dict(cpu_stack_kernels.examples())["stack_matmul_serial"] + (ctrl,)  # ... y, n_parts, ctrl
    yield "fp16_matmul_team", kernels["fp16_matmul_serial"] + (ctrl,)
    yield "attention_team", dict(cpu_ops.examples())["attention_serial"][:-1] + (ctrl,)
    yield "vq_grid_matmul_team", dict(cpu_vq_kernels.examples())["vq_grid_matmul_serial"] + (ctrl,)
    yield "team_serve", (ctrl, 0)


def warm_up() -> None:
    for name, args in examples():
        globals()[name](*args)

"""The team of threads (runtime/backends/cpu_team.py, cpu_team_kernels.py): its products and attention write
what the serial kernels write — for any number of parts, with workers awake, asleep or absent, and after
thousands of jobs back to back with more workers than cores — up to the summation order fastmath may pick
in another compiled function (test_cpu_kernels.py's tolerance); ahead-of-time and JIT kernels alike.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from mxq.runtime.backends.cpu_team import AWAKE, CTRL_SIZE, TICKET, Team, idle_spins
from mxq.runtime.backends.cpu_weights import NO_FLOAT, NO_RESIDUAL
from test_cpu_kernels import _Entry, assert_close, backends  # noqa: F401 - the fixture
from test_cpu_stack import members

pytest.importorskip("numba")


def stack_of(fast, rng, in_features=333):
    parts = members(rng, in_features, ["rows(3:b2g32,40:b8g128+o9,1:b5g64,20:b3g128)", "b4g64+o3",
                                       "rows(2:b6g32,5:b3g32)", "b5g32", "v3d4g64s+o2",
                                       "rows(4:b4g32,20:v3d4g32s,7:v2d4g128)"])
    stack = fast.stack(tuple(fast.prepare(_Entry(n, s, c), b) for n, s, c, b, _ in parts), 1)
    assert stack is not None
    return stack


def test_team_products_match_the_serial_kernels(backends):
    fast, _ = backends
    kernels, team = fast.kernels, fast.team
    assert team is not None and team.size == 2
    rng = np.random.default_rng(5)
    stack = stack_of(fast, rng)
    width = stack.shape[0]
    half_bits = rng.standard_normal((301, 333)).astype(np.float16).view(np.uint16)
    for T in (1, 3):
        x = rng.standard_normal((T, 333)).astype(np.float32)
        for bias, residual in ((NO_FLOAT, NO_RESIDUAL), (rng.standard_normal(width).astype(np.float32),
                                                         rng.standard_normal((T, width)).astype(np.float32))):
            want = np.empty((T, width), np.float32)
            kernels.stack_matmul_serial(x, stack.table, stack.out_rows, bias, residual, want, 1)
            for n_parts in (1, 2, 3, 7, 50):  # more parts than some entries have rows
                got = np.full((T, width), np.nan, np.float32)
                team.wake()
                kernels.stack_matmul_team(x, stack.table, stack.out_rows, bias, residual, got, n_parts, team.ctrl)
                assert not np.isnan(got).any(), (T, n_parts)
                assert_close(got, want)
        want = np.empty((T, 301), np.float32)
        kernels.fp16_matmul_serial(x, half_bits, NO_FLOAT, NO_RESIDUAL, want, 1)
        for n_parts in (1, 2, 5, 301):
            got = np.full((T, 301), np.nan, np.float32)
            kernels.fp16_matmul_team(x, half_bits, NO_FLOAT, NO_RESIDUAL, got, n_parts, team.ctrl)
            assert_close(got, want)


def test_team_vq_grid_products_match_the_serial_kernel(backends):
    """vq_grid_matmul_team (12- and 8-bit indices, a codebook on the 8-bit grid) writes what vq_grid_matmul_serial
    writes, for any number of parts, with outliers, bias and residual."""
    from test_cpu_vq import grid_args, grid_blobs, vq_blobs, vq_config

    fast, _ = backends
    kernels, team = fast.kernels, fast.team
    rng = np.random.default_rng(9)
    for bits, group in ((3, 32), (2, 64), (3, 128)):
        shape = (301, 333)
        config = vq_config(bits, 4, group, 40)
        blobs = grid_blobs(rng, shape, config)
        blobs.update({k: v for k, v in vq_blobs(rng, shape, config).items() if k.startswith("outlier")})
        args = grid_args(blobs, config)
        for T in (1, 3):
            x = rng.standard_normal((T, 333)).astype(np.float32)
            for bias, residual in ((NO_FLOAT, NO_RESIDUAL), (rng.standard_normal(301).astype(np.float32),
                                                             rng.standard_normal((T, 301)).astype(np.float32))):
                want = np.empty((T, 301), np.float32)
                kernels.vq().vq_grid_matmul_serial(x, *args, bias, residual, want, 1)
                for n_parts in (1, 2, 3, 7, 301):
                    got = np.full((T, 301), np.nan, np.float32)
                    team.wake()
                    kernels.vq_grid_matmul_team(x, *args, bias, residual, got, n_parts, team.ctrl)
                    assert_close(got, want)


@pytest.mark.parametrize("n_kv,n_rep,window", [(1, 1, -1), (3, 3, -1), (2, 4, 5), (4, 1, 1)])
def test_team_attention_matches_the_serial_kernel(backends, n_kv, n_rep, window):
    fast, _ = backends
    rng = np.random.default_rng(n_kv * 10 + n_rep)
    head_dim, start = 16, 37
    kc, vc = (rng.standard_normal((n_kv, 50, head_dim)).astype(np.float32) for _ in range(2))
    for T in (1, 3):
        q = rng.standard_normal((T, n_kv * n_rep * head_dim)).astype(np.float32)
        want, got = np.empty_like(q), np.full_like(q, np.nan)
        fast.kernels.ops.attention_serial(q, kc, vc, start, np.float32(0.3), window, want, 1)
        fast.team.wake()
        fast.kernels.attention_team(q, kc, vc, start, np.float32(0.3), window, got, fast.team.ctrl)
        assert_close(got, want)


def test_a_job_nobody_helps_with_is_done_by_the_caller(backends):
    """No worker (a bare ctrl), or workers asleep and never woken: the caller claims every part itself."""
    fast, _ = backends
    rng = np.random.default_rng(6)
    stack = stack_of(fast, rng)
    x = rng.standard_normal((1, 333)).astype(np.float32)
    want = np.empty((1, stack.shape[0]), np.float32)
    fast.kernels.stack_matmul_serial(x, stack.table, stack.out_rows, NO_FLOAT, NO_RESIDUAL, want, 1)
    sleeping = Team(fast.kernels, 2, spins=0)  # its workers return at once and wait for a wake-up
    for ctrl in (np.zeros(CTRL_SIZE, np.int64), sleeping.ctrl):
        for _ in range(3):
            got = np.full_like(want, np.nan)
            fast.kernels.stack_matmul_team(x, stack.table, stack.out_rows, NO_FLOAT, NO_RESIDUAL, got, 4, ctrl)
            assert_close(got, want)
        assert ctrl[TICKET] >> 32 == 3  # three jobs published, each finished
    sleeping.close()


def test_thousands_of_jobs_with_more_workers_than_cores(backends):
    """The claim protocol under contention: 3 workers (this machine has 2 cores), workers falling asleep
    between jobs (few spins) and woken again, parts of every size: every result right, no job lost."""
    fast, _ = backends
    rng = np.random.default_rng(7)
    stack = stack_of(fast, rng)
    team = Team(fast.kernels, 3, spins=50)
    xs = rng.standard_normal((16, 1, 333)).astype(np.float32)
    wants = []
    for x in xs:
        wants.append(np.empty((1, stack.shape[0]), np.float32))
        fast.kernels.stack_matmul_serial(x, stack.table, stack.out_rows, NO_FLOAT, NO_RESIDUAL, wants[-1], 1)
    for i in range(2000):
        got = np.full_like(wants[0], np.nan)
        if i % 3:
            team.wake()
        fast.kernels.stack_matmul_team(xs[i % 16], stack.table, stack.out_rows, NO_FLOAT, NO_RESIDUAL, got, 1 + i % 9,
                                       team.ctrl)
        assert_close(got, wants[i % 16])
    team.close()


def test_close_stops_the_workers(backends):
    fast, _ = backends
    team = Team(fast.kernels, 2)
    team.wake()
    deadline = time.monotonic() + 10
    while team.ctrl[AWAKE] < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    team.close()
    for thread in team.threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in team.threads)
    assert team.ctrl[AWAKE] == 0


def test_workers_spin_for_a_time_not_a_count():
    """idle_spins turns cpu_team.IDLE_S into polls at this CPU's cost of one, timed on a private ctrl word (a
    Team's workers, test_close_stops_the_workers, spin that many): here with a stand-in for team_serve whose polls
    take at least 1 µs each (a sleep)."""
    seen = []

    def slow_polls(ctrl, polls):
        seen.append((ctrl.shape, int(ctrl.sum()), polls))
        time.sleep(polls * 1e-6)

    assert 1000 <= idle_spins(slow_polls, seconds=0.01, probe=1000) <= 10000
    assert idle_spins(slow_polls, seconds=0.0, probe=1000) == 1000  # never fewer than the probe
    assert seen == [((CTRL_SIZE,), 0, 1000)] * 2  # a fresh, empty ctrl: no job, no STOP


def test_one_thread_has_no_team_and_products_agree_with_it(backends):
    """threads=1: no team (the serial kernels); threads=2: a big product runs on the team — the same numbers
    within tolerance."""
    from mxq.runtime.backends.numpy_backend import NumpyBackend

    fast, _ = backends
    solo = NumpyBackend(threads=1)
    assert solo.team is None and fast.team is not None
    rng = np.random.default_rng(8)
    (name, shape, config, blobs, _), = members(rng, 576, ["rows(100:b3g64,200:b5g32+o4)"])
    w_solo, w_team = (backend.prepare(_Entry(name, shape, config), blobs) for backend in (solo, fast))
    x = rng.standard_normal((1, 576)).astype(np.float32)
    jobs = fast.team.ctrl[TICKET] >> 32
    assert_close(fast.linear(x, w_team), solo.linear(x, w_solo))
    assert fast.team.ctrl[TICKET] >> 32 == jobs + 1  # it ran on the team
    solo.close()


def test_two_threads_sharing_a_backend_take_turns_on_the_team(backends):
    """The team runs one job at a time: a product asked for while another thread's holds it runs on its
    own thread (serial kernels) — right results, no hang."""
    import threading

    fast, _ = backends
    rng = np.random.default_rng(9)
    (name, shape, config, blobs, _), = members(rng, 576, ["rows(150:b4g64,200:b3g32+o4)"])
    weight = fast.prepare(_Entry(name, shape, config), blobs)
    xs = rng.standard_normal((8, 1, 576)).astype(np.float32)
    wants = [fast.linear(x, weight) for x in xs]
    errors = []

    def run(offset):
        try:
            for i in range(300):
                assert_close(fast.linear(xs[(i + offset) % 8], weight), wants[(i + offset) % 8])
        except AssertionError as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads) and not errors


def test_the_team_bench_times_every_decode_stack_and_attention(tiny_models, monkeypatch, capsys):
    """tools/bench_team.py runs end to end on a converted model: a row per stack kind and per position."""
    import json

    bench_team = pytest.importorskip("bench_team")
    monkeypatch.setenv("MXQ_THREADS", "2")
    bench_team.main([str(tiny_models["tiny-llama"]), "--rounds", "1", "--positions", "3,9", "--json"])
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["call"] for r in rows] == ["q/k/v stack", "o stack", "gate/up stack", "down stack", "sum of the four",
                                         "lm_head", "attention @3", "attention @9"]
    assert all(r["serial_us"] > 0 and r["team_us"] > 0 for r in rows)
    assert rows[4]["serial_us"] == pytest.approx(sum(r["serial_us"] for r in rows[:4]))


def test_the_team_bench_compares_another_kernel_build_in_the_same_rounds(tiny_models, monkeypatch, capsys):
    """--baseline: another ahead-of-time build's stacks, head and attention (here this build's own module) timed
    beside the loaded ones."""
    import json

    from mxq.runtime.backends import cpu_aot

    bench_team = pytest.importorskip("bench_team")
    monkeypatch.setenv("MXQ_THREADS", "2")
    monkeypatch.setenv("MXQ_KERNELS", "aot")
    if not cpu_aot.module_path().exists() and isinstance(cpu_aot.load(), str):
        pytest.skip("no ahead-of-time kernel build on this machine")
    bench_team.main([str(tiny_models["tiny-llama"]), "--rounds", "1", "--positions", "3", "--json",
                     "--baseline", str(cpu_aot.module_path())])
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert len(rows) == 7 and all(r["baseline_serial_us"] > 0 and r["baseline_team_us"] > 0 for r in rows)


def test_the_decode_bench_breaks_a_step_down_into_its_kernels(tiny_models, monkeypatch):
    """tools/bench_decode.py --breakdown: every compiled kernel call of decode timed; kernels plus the rest make
    up the step's wall time."""
    bench_decode = pytest.importorskip("bench_decode")
    monkeypatch.setenv("MXQ_THREADS", "2")
    r = bench_decode.run_mxq(str(tiny_models["tiny-llama"]), False, 5, 6, breakdown=True)
    kernels = r["kernel_ms_per_token"]
    assert "decode_layers" in kernels and "rms_norm" in kernels  # every decoder layer in one call, the final norm ...
    assert any("matmul" in name for name in kernels)  # ... and the head (tiny-llama's: fp16)
    assert all(ms > 0 for ms in kernels.values()) and r["rest_ms_per_token"] > 0
    assert sum(kernels.values()) + r["rest_ms_per_token"] == pytest.approx(1e3 / r["decode_tok_s"])

"""A team of threads for the compiled decode products (cpu_team_kernels.py has the protocol and why):
the calling thread publishes a product as a job of numbered parts in `ctrl`, and every thread of the team —
the caller included — claims parts until none is left. This module is the Python side, without Numba (the
ahead-of-time kernels are loaded without it): the worker threads, waking them, the shared words' layout.
"""
from __future__ import annotations

import threading
import time
import weakref

import numpy as np

TICKET, DONE, JOB, AWAKE, STOP = 0, 8, 16, 24, 25  # ctrl slots (8 int64 = one 64-byte cache line apart)
CTRL_SIZE = 32
MAX_PARTS = 0xFFFF  # n_parts fits 16 bits of the ticket
# A worker sleeps after this long without a job: longer than the Python between a decode step's products
# and between steps (~1 ms: sampling, the next token's glue), so it does not sleep and wake once every few tokens.
# With 20000 polls (0.65 ms here) it slept 40 times in 100 SmolLM2 tokens; woken, the scheduler may put it on
# the caller's CPU for a while (seen with `ps -L`: both threads on one of 2 vCPUs). Decode 1.00-1.11x as fast
# with the workers awake throughout (4 alternated pairs of processes, 100 tokens each, on 2 vCPUs).
IDLE_S = 5e-3


class Team:
    """The calling thread plus `workers` Python threads running team_serve (compiled, nogil) of `kernels`.
    Products call wake() first (cheap when the workers are awake) and then a *_team kernel with `ctrl`,
    holding `lock` (one job at a time: a second caller's job would overwrite the first one's ticket).
    The workers stop on close(), when the Team is garbage-collected, and at interpreter exit (before
    anything they read is freed)."""

    def __init__(self, kernels, workers: int, spins: int | None = None):
        self.ctrl = np.zeros(CTRL_SIZE, np.int64)
        spins = idle_spins(kernels.team_serve) if spins is None else spins
        self.lock = threading.Lock()
        self.size = workers + 1
        self.events = [threading.Event() for _ in range(workers)]
        self.threads = [threading.Thread(target=_serve, args=(kernels.team_serve, self.ctrl, event, spins),
                                         name=f"mxq-team-{i}", daemon=True) for i, event in enumerate(self.events)]
        for thread in self.threads:
            thread.start()
        self._finalizer = weakref.finalize(self, _stop, self.ctrl, self.events, self.threads)

    def wake(self) -> None:
        """Wake the sleeping workers (a job is coming); nothing to do when all are spinning."""
        if self.ctrl[AWAKE] < len(self.events):
            for event in self.events:
                event.set()

    def close(self) -> None:
        self._finalizer()


def idle_spins(team_serve, seconds: float = IDLE_S, probe: int = 10000) -> int:
    """Idle polls of team_serve that take about `seconds` on this CPU, timed with a private ctrl word (no jobs):
    a poll's spin hint (x86 pause, AArch64 yield) costs from ~1 to ~40 ns across CPUs (32 ns on this Zen 1)."""
    ctrl = np.zeros(CTRL_SIZE, np.int64)
    start = time.perf_counter()
    team_serve(ctrl, probe)
    per_poll = max((time.perf_counter() - start) / probe, 1e-10)
    return max(probe, int(seconds / per_poll))


def _serve(team_serve, ctrl, event: threading.Event, spins: int) -> None:
    """A worker thread: sleep until woken, then serve jobs until `spins` idle polls; until ctrl[STOP]."""
    while True:
        event.wait()
        event.clear()
        if ctrl[STOP]:
            return
        team_serve(ctrl, spins)


def _stop(ctrl, events, threads) -> None:
    ctrl[STOP] = 1
    for event in events:
        event.set()
    for thread in threads:
        if thread is not threading.current_thread():
            thread.join(timeout=1.0)  # out of team_serve within one poll

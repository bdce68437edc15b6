"""A team of threads for the compiled decode products (cpu_team_kernels.py has the protocol and why):
the calling thread publishes a product as a job of numbered parts in `ctrl`, and every thread of the team —
the caller included — claims parts until none is left. This module is the Python side, without Numba (the
ahead-of-time kernels are loaded without it): the worker threads, waking them, the shared words' layout.
"""
from __future__ import annotations

import threading

import numpy as np

TICKET, DONE, JOB, AWAKE, STOP = 0, 8, 16, 24, 25  # ctrl slots (8 int64 = one 64-byte cache line apart)
CTRL_SIZE = 32
MAX_PARTS = 0xFFFF  # n_parts fits 16 bits of the ticket
SPINS = 20000  # idle polls before a worker sleeps: ~0.5-2 ms (a spin hint is ~20-100 ns)


class Team:
    """The calling thread plus `workers` Python threads running team_serve (compiled, nogil) of `kernels`.
    Products call wake() first (cheap when the workers are awake) and then a *_team kernel with `ctrl`."""

    def __init__(self, kernels, workers: int, spins: int = SPINS):
        self.kernels, self.spins = kernels, spins
        self.ctrl = np.zeros(CTRL_SIZE, np.int64)
        self.size = workers + 1
        self.events = [threading.Event() for _ in range(workers)]
        self.threads = [threading.Thread(target=self._serve, args=(event,), name=f"mxq-team-{i}", daemon=True)
                        for i, event in enumerate(self.events)]
        for thread in self.threads:
            thread.start()

    def _serve(self, event: threading.Event) -> None:
        while True:
            event.wait()
            event.clear()
            if self.ctrl[STOP]:
                return
            self.kernels.team_serve(self.ctrl, self.spins)

    def wake(self) -> None:
        """Wake the sleeping workers (a job is coming); nothing to do when all are spinning."""
        if self.ctrl[AWAKE] < len(self.events):
            for event in self.events:
                event.set()

    def close(self) -> None:
        self.ctrl[STOP] = 1
        for event in self.events:
            event.set()

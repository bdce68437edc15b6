"""One model, one generation at a time: a worker thread takes jobs from a bounded queue.

The runtime is not re-entrant (one backend, one set of buffers), so every generation runs on the
single worker thread. The HTTP side submits a Job (refused with QueueFull when `queue_size` jobs are
already waiting) and reads its events from an asyncio queue:

    ("text", piece)                                      text to send, stop strings already cut out
    ("done", finish_reason, prompt_tokens, completion_tokens)   finish_reason: "stop" or "length"
    ("error", exception)

A job is cancelled (client gone) by `job.cancel()`: the worker checks between tokens and stops pulling
from the runtime's generator, so no token is computed for nobody; a cancelled job still waiting in the
queue is dropped when it comes up.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field

from .schema import GenerationRequest


class QueueFull(Exception):
    pass


@dataclass
class Job:
    request: GenerationRequest  # prompt ids, sampling, stop strings (cut before the first, not returned)
    loop: asyncio.AbstractEventLoop  # the requesting handler's event loop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, *event) -> None:
        """Called on the worker thread: hand an event to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


class StopText:
    """Cuts generated text at the first stop string. Text that might be the start of a stop string is
    held back until it is clear (at most len(longest stop) - 1 characters)."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Text that is safe to emit now; sets self.stopped when a stop string appeared."""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return out
        safe = max(len(self.pending) - self.hold, 0)
        out, self.pending = self.pending[:safe], self.pending[safe:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Engine:
    """Owns the LoadedModel; `start()` its worker thread, `submit(job)`, `stop()` at shutdown."""

    def __init__(self, model, queue_size: int = 16):
        if queue_size < 1:
            raise ValueError(f"the queue size must be >= 1, got {queue_size}")
        self.model = model
        self.queue_size = queue_size
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.running: Job | None = None
        self.tokens_generated = 0  # every token the runtime produced, for /health (and tests)
        self.thread = threading.Thread(target=self._work, name="mxq-generate", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        if self.running is not None:
            self.running.cancel()
        while True:  # drop waiting jobs, then wake the worker with the sentinel
            try:
                self.jobs.get_nowait().cancel()
            except queue.Empty:
                break
        self.jobs.put(None)
        self.thread.join(timeout=30)

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise QueueFull when `queue_size` jobs already wait."""
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            self.running = job
            try:
                job.emit("done", *self._generate(job))
            except Exception as error:  # noqa: BLE001 - reported to the request; the worker lives on
                job.emit("error", error)
            finally:
                self.running = None

    def _generate(self, job: Job) -> tuple:
        """Run one job; returns (finish_reason, prompt_tokens, completion_tokens)."""
        model, r = self.model, job.request
        text = model.tokenizer.stream(r.ids)
        stop = StopText(r.stop)
        tokens = model.generate_ids(r.ids, r.max_tokens, r.temperature, r.top_k, r.top_p, r.seed)
        try:
            for token in tokens:  # the runtime computes the next token only when asked for it
                self.tokens_generated += 1
                piece = stop.push(text.push(token))
                if piece:
                    job.emit("text", piece)
                if stop.stopped or job.cancelled.is_set():
                    break
            else:
                piece = stop.push(text.flush())
                piece += "" if stop.stopped else stop.flush()
                if piece:
                    job.emit("text", piece)
        finally:
            tokens.close()
        stats = model.last_stats
        finish = "stop" if stop.stopped or stats.stop_reason == "eos" else "length"
        return finish, stats.prompt_tokens, stats.new_tokens

"""`mxq convert --cluster ADDRESS`: calibration and measurement as Ray tasks; the only module that imports Ray.

    driver (this process)                               Ray workers (any node, CPUS_PER_TASK cores each)
    read checkpoint, embed ──► per layer: x[batch] ───► _forward_task:  layer i over a chunk batch
                             ◄── outputs, Σx² per batch
    head gradient          ──► per layer: (x, ∂L/∂y) ─► _backward_task: Fisher of a chunk batch
                             ◄── Σ(∂L/∂W)², ∂L/∂x per batch
    sums the batches in chunk order (calibrate.add_in_order), writes the statistics cache
    measure                ──► per matrix ────────────► _measure_task: measure.measure_matrix
                             ◄── errors, in any order; the driver files them in the error cache
    solve (MILP), quantize and write the file

Every task is a pure function of its arguments, computed with the same code as a local run, and the
driver combines results in a fixed order: the file is byte-identical to a local conversion whatever the
scheduling, the number of workers or the workers that die (Ray runs a task again, up to MAX_RETRIES
times). A task computes with one thread (CPUS_PER_TASK) where a local run uses every core: the same
bits, since the arithmetic does not depend on the thread count (tests/test_cluster.py compares every
calibration statistic and measured error of SmolLM2 with a local run's). The probe refuses a node whose
libraries or mxq sources differ from the driver's. A driver that dies loses only what it had not saved:
a finished calibration, and the error cache, which measure() saves every 16 matrices; the next run
resumes from them.

Workers read weights from the checkpoint path and calibration statistics from the cache directory, so
both must be on storage every node sees under the same path (checked by a probe task on every node);
activations and gradients travel through Ray's object store.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from .errors import ConversionError

try:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError:
    raise ConversionError("--cluster needs Ray: pip install 'mxq[cluster]'") from None

MAX_RETRIES = 5  # a task whose worker process (or node) dies runs again, this many times at most
CPUS_PER_TASK = 1  # one task per core: tasks are many and independent


# -- on the workers ----------------------------------------------------------------------------------

_SHARED: dict[str, object] = {}  # per worker process: object id -> value fetched from the object store
_STREAM: dict[str, object] = {}  # per worker process: the calibration LayerStream and its loaded layer


def _shared(box: list):
    """box: [ObjectRef] (in a list, so Ray passes the reference, not the value) → the value, fetched
    once per worker process (the checkpoint's index and the measurement function are reused by every
    task)."""
    key = box[0].hex()
    if key not in _SHARED:
        if len(_SHARED) >= 4:
            _SHARED.clear()
        _SHARED[key] = ray.get(box[0])
    return _SHARED[key]


def _worker() -> str:
    return f"{ray.util.get_node_ip_address()}/{os.getpid()}"


def _task(function, *args):
    """Run function(*args) with CPUS_PER_TASK threads → (value, worker, (seconds, CPU seconds)). A
    ConversionError gets the worker's name (a node that cannot read a file says which node it is)."""
    import numba
    import torch

    started, cpu = time.perf_counter(), time.process_time()
    numba.set_num_threads(min(CPUS_PER_TASK, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(CPUS_PER_TASK)
    try:
        value = function(*args)
    except ConversionError as error:
        raise ConversionError(f"on worker {_worker()}: {error}") from None
    return value, _worker(), (time.perf_counter() - started, time.process_time() - cpu)


def _layer(box: list, i: int, trainable: bool):
    """The worker's LayerStream over the shared checkpoint with layer i loaded → (stream, linears)."""
    from .calibrate import LayerStream

    checkpoint = _shared(box)
    state = _STREAM.get("state")
    if state is None or state["key"] != box[0].hex():
        state = _STREAM["state"] = {"key": box[0].hex(), "stream": LayerStream(checkpoint), "loaded": None}
    stream = state["stream"]
    if state["loaded"] != (i, trainable):
        if state["loaded"] is not None:
            stream.free_layer(state["loaded"][0])
        state["linears"], state["loaded"] = stream.load_layer(i, trainable), (i, trainable)
    return stream, state["linears"]


def _forward(box, i, x):
    from .calibrate import forward_batch

    stream, _ = _layer(box, i, trainable=False)
    return forward_batch(stream, i, x)


def _backward(box, i, x, grad):
    from .calibrate import backward_batch

    stream, linears = _layer(box, i, trainable=True)
    return backward_batch(stream, i, linears, x, grad)


@ray.remote(num_cpus=CPUS_PER_TASK, max_retries=MAX_RETRIES)
def _forward_task(box, i, x):
    return _task(_forward, box, i, x)


@ray.remote(num_cpus=CPUS_PER_TASK, max_retries=MAX_RETRIES)
def _backward_task(box, i, x, grad):
    return _task(_backward, box, i, x, grad)


def _apply(box, job):
    return _shared(box)(job)


@ray.remote(num_cpus=CPUS_PER_TASK, max_retries=MAX_RETRIES)
def _measure_task(box, job):
    return _task(_apply, box, job)


def _environment() -> dict:
    """What must match between the driver and every node for identical bits."""
    import llvmlite.binding
    import numba
    import numpy
    import torch

    from .. import __version__

    return {"mxq": __version__, "mxq code": _code_digest(), "torch": torch.__version__, "numpy": numpy.__version__,
            "numba": numba.__version__, "python": sys.version.split()[0], "cpu": llvmlite.binding.get_host_cpu_name()}


@functools.cache
def _code_digest() -> str:
    """sha256 of mxq's Python sources (tests and tools aside), 12 hex digits: two checkouts that share a
    version number but not their code compute different numbers."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] not in ("tests", "tools") and not any(p.startswith(".") for p in relative.parts):
            digest.update(str(relative).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


@ray.remote(num_cpus=0, max_retries=MAX_RETRIES)
def _probe(paths: list):
    """This node's environment and the paths it cannot read."""
    return ray.util.get_node_ip_address(), _environment(), [p for p in paths if not os.access(p, os.R_OK)]


# -- on the driver -----------------------------------------------------------------------------------

class Cluster:
    """A connection to a Ray cluster (or a local Ray instance) and the per-worker accounting of the
    tasks run through it. Use as a context manager: leaving it disconnects (and stops a local instance)."""

    def __init__(self, address: str):
        self.address = address
        # stage -> worker -> {"seconds": in tasks, "cpu": CPU seconds in tasks, "tasks": count}
        self.work: dict = defaultdict(lambda: defaultdict(lambda: {"seconds": 0.0, "cpu": 0.0, "tasks": 0}))
        self.notes: list[str] = []
        self.probed: set = set()

    def __enter__(self):
        options = dict(logging_level=logging.WARNING, log_to_driver=False, configure_logging=True)
        if self.address.startswith("local"):
            cpus = int(self.address.partition(":")[2] or os.cpu_count() or 1)
            options.update(num_cpus=cpus, include_dashboard=False)
            address = "local"  # a new instance, even where RAY_ADDRESS or a `ray start` cluster would be found
        else:
            address = self.address
        try:
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as error:
            raise ConversionError(f"--cluster {self.address}: cannot connect to Ray: "
                                  f"{str(error).strip().splitlines()[0][:200]}") from None
        return self

    def __exit__(self, *exc):
        ray.shutdown()

    # -- checks ------------------------------------------------------------------------------------

    def require(self, paths: list) -> None:
        """Every node with CPUs runs mxq's versions of the numeric libraries and can read `paths`
        (absolute paths on shared storage); else a one-line error naming the node and the problem."""
        paths = [str(Path(p).absolute()) for p in paths if str(Path(p).absolute()) not in self.probed]
        if not paths and self.probed:
            return
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
        if not nodes:
            raise ConversionError(f"--cluster {self.address}: the cluster has no node with CPUs")
        probes = [_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                  .remote(paths) for n in nodes]
        here = _environment()
        for node, environment, unreadable in self._wait(probes):
            if unreadable:
                raise ConversionError(f"--cluster: node {node} cannot read {unreadable[0]}: the checkpoint and "
                                      "the cache directory must be on storage every node sees under the same path")
            differ = [f"{k} {environment[k]} (here {here[k]})" for k in here if k != "cpu" and environment[k] != here[k]]
            if differ:
                raise ConversionError(f"--cluster: node {node} runs {', '.join(differ)}: install the same versions "
                                      "on every node (identical results need identical code)")
            if environment["cpu"] != here["cpu"] and not any("CPU" in n for n in self.notes):
                self.notes.append(f"node {node} has a different CPU ({environment['cpu']}, here {here['cpu']}): "
                                  "compiled kernels may round differently, the file may differ in the last bits "
                                  "from a conversion on this machine")
        self.probed.update(paths)

    def _wait(self, refs: list) -> list:
        try:
            return ray.get(refs)
        except ray.exceptions.RayError as error:
            raise ConversionError(f"--cluster {self.address}: {_reason(error)}") from None

    # -- runners -----------------------------------------------------------------------------------

    def _result(self, stage: str, ref):
        try:
            value, worker, (seconds, cpu) = ray.get(ref)
        except ray.exceptions.RayError as error:
            raise ConversionError(f"--cluster: a {stage} task failed: {_reason(error)}") from None
        work = self.work[stage][worker]
        work["seconds"], work["cpu"], work["tasks"] = work["seconds"] + seconds, work["cpu"] + cpu, work["tasks"] + 1
        return value

    def calibration_runner(self, checkpoint):
        """calibrate()'s runner: each layer's chunk batches as tasks, results yielded in batch order."""
        self.require([checkpoint.path])
        return _CalibrationRunner(self, [ray.put(_absolute(checkpoint))])

    def map(self, function, jobs: list):
        """measure()'s runner: function(job) for every job as a task; yields (index, result) as they
        complete (cluster-wide progress), in any order."""
        box = [ray.put(function)]
        pending = {_measure_task.remote(box, job): j for j, job in enumerate(jobs)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                yield pending.pop(ref), self._result("measure", ref)

    def worker_seconds(self) -> dict:
        """stage -> worker ("ip/pid") -> {"seconds": in tasks, "cpu": CPU seconds in tasks, "tasks": count}."""
        return {stage: {w: {k: round(v, 3) for k, v in work.items()} for w, work in sorted(workers.items())}
                for stage, workers in self.work.items()}


class _CalibrationRunner:
    """The runner calibrate() expects (forward, backward), with Ray tasks; see calibrate.LocalBatches."""

    def __init__(self, cluster: Cluster, box: list):
        self.cluster, self.box = cluster, box

    def forward(self, i: int, batches):
        refs = [_forward_task.remote(self.box, i, x.clone()) for x in batches]  # clone: a view would ship its base
        for ref in refs:
            yield self.cluster._result("calibrate", ref)

    def backward(self, i: int, batches):
        refs = [_backward_task.remote(self.box, i, x.clone(), grad.clone()) for x, grad in batches]
        for ref in refs:
            yield self.cluster._result("calibrate", ref)


def _absolute(checkpoint):
    """The checkpoint with absolute file paths (workers do not share the driver's working directory)."""
    tensors = {name: replace(info, file=Path(info.file).absolute()) for name, info in checkpoint.tensors.items()}
    return replace(checkpoint, path=Path(checkpoint.path).absolute(), tensors=tensors)


def _reason(error: Exception) -> str:
    """One line for a Ray failure: a task's own ConversionError as it is, else the error's first line."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, ConversionError):
        return str(cause)
    if cause is not None:
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0][:300] if str(cause).strip() else ''}"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def connect(address: str) -> Cluster:
    return Cluster(address)

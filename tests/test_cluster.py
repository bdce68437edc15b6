"""`mxq convert --cluster`: a Ray head and a second node on 127.0.0.1, one CPU (one worker process) each,
started once for this module. Conversions through them are byte-identical to local ones — every
calibration statistic and measured error too — for tiny models and SmolLM2, also when a worker process
is killed mid-task (Ray runs the task again) and when the driver is killed and run again (it resumes
from the cache)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import fixtures
import mxq
from mxq.converter.errors import ConversionError
from mxq.converter.pipeline import convert

RAY = Path(sys.executable).with_name("ray")
PACKAGE = Path(mxq.__file__).resolve().parent  # every process of the test runs this mxq
PACKAGE_PARENT = PACKAGE.parent
QUICK = dict(bpw=3.5, calib_tokens=2048)  # 8 chunks: two calibration batches per layer, summed in order
START_SECONDS = 600  # per start-up step; ~10 s on a quiet machine, minutes when the 2 cores are oversubscribed
STOP_SECONDS = 30
DIE_WITH_US = ["setpriv", "--pdeathsig", "SIGTERM"] if shutil.which("setpriv") else []  # should pytest be killed


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _free_ports(n: int) -> list[int]:
    """n distinct ports nothing on this machine listens on now (never Ray's defaults by chance: those
    of a running cluster are taken, and the OS hands out ephemeral ports, not 6379/8265/10001)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _wait(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


WAIT_FOR_CPUS = """import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[3])
while ray.cluster_resources().get("CPU", 0) < float(sys.argv[2]):
    if time.monotonic() > deadline:
        sys.exit(f"the cluster has {ray.cluster_resources().get('CPU', 0)} CPUs, not {sys.argv[2]}")
    time.sleep(0.2)
"""


class RayCluster:
    """A Ray head and a second node on 127.0.0.1 with one CPU each: two worker processes on two nodes
    (tasks spread over both; the driver probes both). Lean and isolated, so that it starts on a loaded
    2-core machine and never meets a user's cluster: no dashboard, log monitor or metrics; every port
    one the OS reported free; its own session directory and its own authentication token; no RAY_*
    variable of the caller's. Drivers are `mxq convert` processes (Ray reads its configuration once per
    process, so it never runs in the test process).

    Every process it starts carries the token's path in its environment: stop() SIGTERMs the `ray
    start --block` processes, then SIGKILLs whatever still carries it, and checks that nothing is
    left. Each `ray start` and each driver also gets SIGTERM should the test process die without
    stopping them (a killed pytest leaves only the session directory behind)."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="mxqray", dir="/tmp"))  # short: socket paths have a length cap
        self.token = self.root / "token"
        self.token.write_text(secrets.token_hex(32))
        self.marker = f"RAY_AUTH_TOKEN_PATH={self.token}".encode()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update({
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token), "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_enable_metrics_collection": "0",
            "RAY_worker_register_timeout_seconds": str(START_SECONDS),  # a worker's start-up under load
            "RAY_health_check_failure_threshold": "100",  # a starved raylet is slow, not dead (default 5 × 3 s)
            "PYTHONPATH": os.pathsep.join([str(PACKAGE_PARENT), os.environ.get("PYTHONPATH", "")])})
        self.processes, self.logs = [], []
        try:
            head, node = self._ports(head=True), self._ports(head=False)
            self.address = f"127.0.0.1:{head[0]}"
            self._start("head", "--head", f"--port={head[0]}", f"--ray-client-server-port={head[1]}",
                        f"--dashboard-port={head[2]}", "--include-dashboard=false", "--include-log-monitor=false",
                        f"--temp-dir={self.root}", *head[3])
            self._start("node", f"--address={self.address}", *node[3])
            waiter = subprocess.run([sys.executable, "-c", WAIT_FOR_CPUS, self.address, "2", str(START_SECONDS)],
                                    env=self.env, capture_output=True, text=True, timeout=START_SECONDS + 60)
            if waiter.returncode != 0:
                raise RuntimeError(f"the Ray nodes did not join: {waiter.stderr.strip()[-500:]}")
        except BaseException:
            self.stop()
            raise

    def _ports(self, head: bool):
        """(GCS, client server, dashboard, [ray start options]) with a free port for everything a node binds."""
        ports = _free_ports(3 + 6 + 16)
        node = ports[3:9]
        options = [f"--node-manager-port={node[0]}", f"--object-manager-port={node[1]}",
                   f"--dashboard-agent-listen-port={node[2]}", f"--dashboard-agent-grpc-port={node[3]}",
                   f"--metrics-export-port={node[4]}", f"--runtime-env-agent-port={node[5]}",
                   f"--worker-port-list={','.join(map(str, ports[9:]))}",  # workers and drivers
                   "--num-cpus=1", "--object-store-memory=200000000", "--node-ip-address=127.0.0.1",
                   "--disable-usage-stats", "--block"]
        return ports[0], ports[1], ports[2], options

    def _start(self, name: str, *args):
        """`ray start ARGS --block`, returning once it says the node runs."""
        log = self.root / f"{name}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            process = subprocess.Popen([*DIE_WITH_US, str(RAY), "start", *args], env=self.env, stdout=out,
                                       stderr=subprocess.STDOUT)
        self.processes.append(process)

        def started():
            if process.poll() is not None:
                raise RuntimeError(f"ray start ({name}) exited: {log.read_text(errors='replace')[-800:]}")
            return b"Ray runtime started" in log.read_bytes()
        _wait(started, START_SECONDS, f"the Ray {name} did not start in {START_SECONDS} s")

    def convert(self, path, out, cache, *options) -> subprocess.Popen:
        """`mxq convert --cluster HOST:PORT` as a driver process."""
        command = [*DIE_WITH_US, sys.executable, "-c", "from mxq.cli import main; main()", "convert", str(path),
                   "-o", str(out), "--cache-dir", str(cache), "--cluster", self.address, "-q", *options]
        return subprocess.Popen(command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def pids(self) -> list[int]:
        """Every live process started with this cluster's environment (ray start, GCS, raylets, agents,
        workers, drivers), whatever its process title says."""
        return _pids_with(self.marker)

    def stop(self):
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # ray start --block stops its node's processes
        deadline = time.monotonic() + STOP_SECONDS
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for _ in range(50):  # what did not stop in time, and what ray start left behind
            left = self.pids()
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for process in self.processes:
                if process.poll() is None:
                    process.wait(timeout=10)
            time.sleep(0.2)
        shutil.rmtree(self.root, ignore_errors=True)
        left = self.pids()
        assert not left, f"Ray processes survived stop(): {left}"


def _pids_with(marker: bytes) -> list:
    """Processes of this user whose environment contains `marker`, zombies excluded."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and int(entry.name) != os.getpid() and marker in (entry / "environ").read_bytes()
                    and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray")
    from mxq.converter.cluster import _code_digest

    cluster = RayCluster()
    cluster.code = _code_digest()  # the sources on disk now, which this process imported moments ago
    try:
        yield cluster
    finally:
        cluster.stop()


def _finish(driver: subprocess.Popen, seconds: float = 900) -> str:
    """The driver's stdout once it exited 0 (killed, and its stderr reported, when it takes too long)."""
    try:
        stdout, stderr = driver.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        driver.kill()
        stdout, stderr = driver.communicate()
        raise AssertionError(f"mxq convert --cluster took more than {seconds} s: {stderr[-2000:]}") from None
    assert driver.returncode == 0, stderr
    return stdout


def _intermediates(cache: Path) -> dict:
    """What a conversion computed before solving, from its cache directory: {calibration statistics file
    → sha256, error-cache entry → [err_sq, weighted, weighted_se] or ‖W‖²}. Two conversions that agree
    here agree on every number the file is made from (the file's sha256 alone would miss a difference
    the allocation happens to absorb)."""
    found = {f"calibration/{f.relative_to(cache / 'calibration')}": sha256(f)
             for f in sorted((cache / "calibration").rglob("*")) if f.is_file()}
    for table in sorted((cache / "errors").glob("*.json")):
        data = json.loads(table.read_text())
        found.update({f"errors/{key}/{name}": value for key, entries in data["errors"].items()
                      for name, value in entries.items()})
        found.update({f"norms/{name}": value for name, value in data["norms"].items()})
    return found


def assert_same_intermediates(ray_cluster, cluster_cache: Path, local_cache: Path, calibrated: bool = True):
    """Bit for bit; and this process (the local conversion) still runs the code on disk (the cluster's)."""
    from mxq.converter.cluster import _code_digest

    assert _code_digest.__wrapped__() == ray_cluster.code, "mxq's sources changed on disk during the test"
    cluster, local = _intermediates(cluster_cache), _intermediates(local_cache)
    assert any(key.startswith("errors/") for key in local), f"no measured errors under {local_cache}"
    assert calibrated == any(key.startswith("calibration/") for key in local), f"calibration under {local_cache}?"
    assert cluster.keys() == local.keys()
    differ = [key for key in local if cluster[key] != local[key]]
    first = differ[0] if differ else None
    assert not differ, f"{len(differ)} of {len(local)} differ, first {first}: {cluster[first]} (cluster) != {local[first]}"


def _workers(summary: str, stage: str) -> dict:
    """`<stage> seconds per worker: w s (CPU c, n tasks), ...` → {worker: tasks}."""
    line = next((line for line in summary.splitlines() if line.startswith(f"{stage} seconds per worker: ")), "")
    return {worker: int(tasks) for worker, tasks in re.findall(r"(\S+) [0-9.]+ \(CPU [0-9.]+, ([0-9]+) tasks\)", line)}


ARGS = ["--bpw", "3.5", "--calib-tokens", "2048"]  # 8 chunks: two calibration batches per layer, summed in order


@pytest.mark.slow
@pytest.mark.parametrize("name, objective", [("tiny-llama", "fisher"), ("tiny-qwen2", "output")])
def test_cluster_conversion_is_byte_identical_to_local(ray_cluster, tmp_path, name, objective):
    path = fixtures.ensure(name)
    driver = ray_cluster.convert(path, tmp_path / "cluster.mxq", tmp_path / "cluster-cache", *ARGS,
                                 "--objective", objective)
    convert(path, tmp_path / "local.mxq", cache_dir=str(tmp_path / "local-cache"), objective=objective, **QUICK)
    summary = _finish(driver)
    assert_same_intermediates(ray_cluster, tmp_path / "cluster-cache", tmp_path / "local-cache")
    assert sha256(tmp_path / "cluster.mxq") == sha256(tmp_path / "local.mxq")
    # both stages ran as tasks on the two worker processes, and the summary says so
    calibrate, measure = _workers(summary, "calibrate"), _workers(summary, "measure")
    assert sum(measure.values()) == 14 and sum(calibrate.values()) == 2 * 2 * 2  # matrices; layers × passes × batches
    assert len(set(calibrate) | set(measure)) >= 2


SMOLLM2_ARGS = ["--bpw", "4.25", "--calib-tokens", "1280", "--configs", "b3g64,b4g128,b5g64,b4g64+o0.5%"]


@pytest.mark.slow
def test_smollm2_on_the_cluster_is_byte_identical_to_local(ray_cluster, tmp_path):
    """A real model's sizes: here torch splits GEMMs and reductions over this process's threads (every
    core), while each worker computes its tasks with one thread; the numbers must still agree to the
    bit. 5 calibration chunks (batches of 4 and 1, summed in order) and four configs (row-sampled and
    whole-matrix measurement) keep it to about a minute."""
    path = fixtures.ensure("smollm2")
    driver = ray_cluster.convert(path, tmp_path / "cluster.mxq", tmp_path / "cluster-cache", *SMOLLM2_ARGS)
    convert(path, tmp_path / "local.mxq", cache_dir=str(tmp_path / "local-cache"), bpw=4.25, calib_tokens=1280,
            configs=SMOLLM2_ARGS[-1])
    summary = _finish(driver)
    assert_same_intermediates(ray_cluster, tmp_path / "cluster-cache", tmp_path / "local-cache")
    assert sha256(tmp_path / "cluster.mxq") == sha256(tmp_path / "local.mxq")
    assert sum(_workers(summary, "measure").values()) == 30 * 7


def _kill_first(cluster: RayCluster, title: bytes, stop: threading.Event, killed: list):
    """SIGKILL the cluster's first process whose title (Ray sets it to ray::<task> while a task runs)
    starts with `title`."""
    while not stop.is_set():
        for entry in Path("/proc").iterdir():
            try:
                if (entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(title)
                        and cluster.marker in (entry / "environ").read_bytes()):
                    pid = int(entry.name)
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            except OSError:
                continue
        time.sleep(0.002)


@pytest.mark.slow
def test_a_worker_killed_during_measurement_changes_nothing(ray_cluster, tmp_path):
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first, args=(ray_cluster, b"ray::_measure_task", stop, killed), daemon=True)
    path = fixtures.ensure("tiny-llama")
    killer.start()
    try:  # data-free: measurement only
        driver = ray_cluster.convert(path, tmp_path / "cluster.mxq", tmp_path / "cluster-cache", "--bpw", "3.5",
                                     "--objective", "frobenius")
        summary = _finish(driver)
    finally:
        stop.set()
        killer.join()
    assert killed, "no measurement task was seen running"
    convert(path, tmp_path / "local.mxq", cache_dir=str(tmp_path / "local-cache"), bpw=3.5, objective="frobenius")
    assert_same_intermediates(ray_cluster, tmp_path / "cluster-cache", tmp_path / "local-cache", calibrated=False)
    assert sha256(tmp_path / "cluster.mxq") == sha256(tmp_path / "local.mxq")
    assert sum(_workers(summary, "measure").values()) == 14  # every matrix once: the killed one's result came from its retry


@pytest.mark.slow
def test_a_killed_driver_resumes_from_the_cache(ray_cluster, tmp_path):
    path, cache = fixtures.ensure("tiny-qwen3"), tmp_path / "cluster-cache"
    driver = ray_cluster.convert(path, tmp_path / "cluster.mxq", cache, *ARGS)
    try:  # killed once calibration is cached (its directory renamed into place: a `.partial` one's meta.json is
        # written just before that), during measurement
        _wait(lambda: any(not meta.parent.name.endswith(".partial") for meta in (cache / "calibration").glob("*/meta.json"))
              or driver.poll() is not None, 900, "calibration did not finish")
        driver.kill()
    finally:
        driver.communicate()
    assert driver.returncode == -signal.SIGKILL and not (tmp_path / "cluster.mxq").exists()
    summary = _finish(ray_cluster.convert(path, tmp_path / "cluster.mxq", cache, *ARGS))
    assert not _workers(summary, "calibrate") and _workers(summary, "measure")  # resumed after calibration
    convert(path, tmp_path / "local.mxq", cache_dir=str(tmp_path / "local-cache"), **QUICK)
    assert_same_intermediates(ray_cluster, cache, tmp_path / "local-cache")
    assert sha256(tmp_path / "cluster.mxq") == sha256(tmp_path / "local.mxq")


@pytest.mark.slow
def test_a_driver_running_other_code_than_the_workers_is_refused(ray_cluster, tmp_path):
    """Same version number, one comment changed: the nodes would run other code than the driver, so
    their numbers could differ; the driver names the node and stops before any work."""
    copy = tmp_path / "other" / "mxq"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns(".*", "tests", "tools", "__pycache__"))
    with open(copy / "converter" / "quantize.py", "a") as source:
        source.write("# another checkout\n")
    command = [*DIE_WITH_US, sys.executable, "-c", "from mxq.cli import main; main()", "convert",
               str(fixtures.ensure("tiny-llama")), "-o", str(tmp_path / "x.mxq"), "--bpw", "3.5",
               "--objective", "frobenius", "--cluster", ray_cluster.address]
    result = subprocess.run(command, env={**ray_cluster.env, "PYTHONPATH": str(copy.parent)}, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode != 0 and not (tmp_path / "x.mxq").exists()
    assert re.fullmatch(r"mxq: error: --cluster: node \S+ runs mxq code [0-9a-f]{12} \(here [0-9a-f]{12}\): "
                        r"install the same versions on every node \(identical results need identical code\)",
                        result.stderr.strip().splitlines()[-1]), result.stderr


def test_without_ray_the_option_says_how_to_install(tmp_path, monkeypatch):
    from mxq.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    monkeypatch.delitem(sys.modules, "mxq.converter.cluster", raising=False)
    result = CliRunner().invoke(main, ["convert", str(fixtures.ensure("tiny-llama")), "-o", str(tmp_path / "x.mxq"),
                                       "--bpw", "4", "--cluster", "local:2"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == ["mxq: error: --cluster needs Ray: pip install 'mxq[cluster]'"]
    assert not (tmp_path / "x.mxq").exists()


@pytest.mark.parametrize("address", ["ray://head", "local:0", "http://x:1", "local:two", ""])
def test_a_malformed_address_is_one_line(address):
    with pytest.raises(ConversionError, match="--cluster"):
        convert("unused", "unused.mxq", bpw=4, cluster=address)


def test_the_converter_does_not_import_ray_without_cluster():
    code = ("import sys; from mxq.converter import pipeline, commands, calibrate, measure; "
            "print('ray' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE_PARENT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr

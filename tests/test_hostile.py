"""Hostile and careless input above the byte level (issue 10): metadata values, chat templates, file
kinds, output locations, interrupted writes, converter input. Every case must end in one typed
error naming the problem (one line at the CLI), never a hang, a traceback or a leftover file."""
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from mxq.format_spec import MxqFile, MxqFormatError, MxqWriter, StorageConfig, TensorPlan
from mxq.format_spec.strict_json import JsonError, loads
from mxq.format_spec.tokenizer_schema import MetadataError
from mxq.format_spec.writer import OutputPathError, check_output_path, remove_stale_temporaries, temp_path
from mxq.runtime.chat_template import TemplateError, render_chat_template
from test_corruption import _rewrite_json

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO.parent)}


def _seal(raw: bytes) -> bytes:
    """A file of just header + JSON `raw` (no data region)."""
    end = -(-(32 + len(raw)) // 64) * 64
    return (b"\x89MXQ\r\n\x1a\n" + struct.pack("<HHIQQ", 1, 0, zlib.crc32(raw), len(raw), end) + raw
            + b"\0" * (end - 32 - len(raw)))


def _cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "mxq.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def _one_line_error(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "internal error" not in result.stderr, result.stderr
    return lines[0]


# -- strict JSON -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    (b'{"a": NaN}', "NaN"), (b'{"a": -Infinity}', "Infinity"), (b'{"a": 1e999}', "out of range"),
    (b'{"a": 1, "a": 2}', "twice"), (b'{"a": "\\ud800"}', "surrogate"), (b"[" * 65 + b"]" * 65, "deep"),
    (b'{"a": 1' + b"0" * 5000 + b"}", "parse"), (b"\xff{}", "UTF-8"),
])
def test_strict_json_rejects(text, message):
    with pytest.raises(JsonError, match=message):
        loads(text)


def test_json_cost_is_bounded_before_parsing(tmp_path):
    """A 63 MB `[{},{},…]` is refused by the pre-scan, without building 21 million dicts."""
    raw = b"[" + b"{}," * (21 << 20) + b"{}]"
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(JsonError, match="values"):
        loads(raw)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 400 << 10  # KiB: < 400 MiB
    assert time.perf_counter() - start < 30


# -- tokenizer metadata ----------------------------------------------------------------------------
TOKENIZER_EDITS = {
    "float eos": (lambda t: t.update(eos_token_ids=[2.0]), "eos_token_ids"),
    "eos not a list": (lambda t: t.update(eos_token_ids=2), "eos_token_ids"),
    "bos beyond vocab": (lambda t: t.update(bos_token_id=10**6), "bos_token_id"),
    "bos 2^53": (lambda t: t.update(bos_token_id=2**53), "bos_token_id"),
    "negative bos": (lambda t: t.update(bos_token_id=-1), "bos_token_id"),
    "string bos": (lambda t: t.update(bos_token_id="1"), "bos_token_id"),
    "bool bos": (lambda t: t.update(bos_token_id=True), "bos_token_id"),
    "add_bos string": (lambda t: t.update(add_bos_token="false"), "add_bos_token"),
    "add_bos without bos": (lambda t: t.update(add_bos_token=True, bos_token_id=None), "add_bos_token"),
    "template not a string": (lambda t: t.update(chat_template=["x"]), "chat_template"),
    "template too long": (lambda t: t.update(chat_template="x" * (300 << 10)), "chat_template"),
    "unknown kind": (lambda t: t.update(kind="tiktoken"), "kind"),
}


@pytest.mark.parametrize("name", list(TOKENIZER_EDITS))
def test_tokenizer_metadata_schema(small_file, tmp_path, name):
    edit, field = TOKENIZER_EDITS[name]
    path, _, _ = small_file
    target = tmp_path / "bad.mxq"

    def change(document):
        document["model"]["vocab_size"] = 1000
        edit(document["tokenizer"])

    target.write_bytes(_rewrite_json(path.read_bytes(), change, room=320 << 10))
    with pytest.raises(MxqFormatError, match=field) as caught:
        MxqFile.open(target)
    assert "\n" not in str(caught.value)
    tokenizer = {"kind": "sentencepiece"}
    edit(tokenizer)
    with pytest.raises(MetadataError, match=field):  # the writer refuses to write it in the first place
        MxqWriter(tmp_path / "w.mxq", model={"vocab_size": 1000}, tokenizer=tokenizer, tokenizer_data=b"x",
                  tensors=[])


def test_valid_tokenizer_metadata_is_accepted(small_file, tmp_path):
    path, _, _ = small_file
    target = tmp_path / "ok.mxq"
    target.write_bytes(_rewrite_json(path.read_bytes(), lambda d: d["tokenizer"].update(
        bos_token_id=1, eos_token_ids=[2, 3], add_bos_token=True, chat_template="{{ messages }}")))
    with MxqFile.open(target) as f:
        assert f.tokenizer["eos_token_ids"] == [2, 3] and not f.verify()


# -- chat templates --------------------------------------------------------------------------------
HOSTILE_TEMPLATES = {
    "huge repeat": "{{ 'a' * 1000000000 }}",
    "nested range loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "huge range": "{% for i in range(10**12) %}x{% endfor %}",
    "doubling with ~": "{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}{{ ns.s }}",
    "doubling with +": "{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                       "{% endfor %}{{ ns.s }}",
    "big power": "{{ 7 ** 100000000 }}",
    "center filter": "{{ 'x'|center(1000000000) }}",
    "str method": "{{ 'x'.ljust(1000000000) }}",
    "format width": "{{ '{:>1000000000}'.format(1) }}",
    "percent width": "{{ '%1000000000d' % 1 }}",
    "join explosion": "{{ (range(100000)|list)|join('x' * 4000000) }}",
    "replace explosion": "{% set s = 'a' * 4000000 %}{{ s.replace('a', 'bbbbbbbbbb') }}",
    "nested list repr": "{% set l = range(100000)|list %}{{ [l] * 100000 }}",
    "macro explosion": "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "macro block output": "{% macro m() %}{% for i in range(100000) %}" + "y" * 100000 + "{% endfor %}"
                          "{% endmacro %}{{ m() }}",
    "infinite recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "indent explosion": "{{ ('\\n' * 1000000)|indent(1000) }}",
    "tojson indent": "{{ messages|tojson(indent=100000000) }}",
    "output cap": "{% for i in range(100000) %}{{ 'z' * 1000 }}{% endfor %}",
    "division by zero": "{{ 1 / 0 }}",
    "syntax error": "{% for %}",
    "deep nesting": "{% if 1 %}" * 5000 + "{% endif %}" * 5000,
    "private attribute": "{{ messages.__class__.__mro__ }}",
    "raise_exception": "{{ raise_exception('only user and assistant roles') }}",
}


@pytest.mark.parametrize("name", list(HOSTILE_TEMPLATES))
def test_hostile_chat_templates_fail_cleanly(name):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        render_chat_template(HOSTILE_TEMPLATES[name], messages=[{"role": "user", "content": "hi"}],
                             add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    except TemplateError as error:
        assert "\n" not in str(error)
    else:
        assert name == "private attribute"  # the sandbox renders it as empty (undefined), harmlessly
    assert time.perf_counter() - start < 30
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1 << 20  # KiB: < 1 GiB


def test_ordinary_chat_template_renders():
    template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' ~ m['content'] | trim }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{{ messages | tojson }}")
    out = render_chat_template(template, messages=[{"role": "user", "content": " hi "}], add_generation_prompt=True,
                               bos_token="<s>", eos_token="</s>")
    assert out == '<|user|>hi<|assistant|>[{"role": "user", "content": " hi "}]'


# -- file kinds ------------------------------------------------------------------------------------
@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.mxq"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("command", [["inspect", "@"], ["verify", "@"], ["generate", "@", "hi"], ["eval", "@", "--text", __file__],
                                     ["export-hf", "@", "OUT"]])
def test_cli_refuses_fifo_directory_and_symlinked_fifo(fifo, tmp_path, command):
    link = tmp_path / "link.mxq"
    link.symlink_to(fifo)
    for target in (fifo, link, tmp_path):
        args = [str(target) if a == "@" else str(tmp_path / "out") if a == "OUT" else a for a in command]
        line = _one_line_error(_cli(*args, timeout=60))  # a FIFO used to block forever here
        assert str(target) in line
    assert not (tmp_path / "out").exists()


def test_verify_streams_a_sparse_file(small_file, tmp_path):
    """1 GiB of zero padding after the last blob: verify reads it in chunks (flat memory) and
    accepts it; a non-zero byte at the end is reported."""
    path, _, _ = small_file
    sparse = tmp_path / "sparse.mxq"
    sparse.write_bytes(path.read_bytes())
    os.truncate(sparse, 1 << 30)
    code = ("import resource, sys; from mxq.format_spec import MxqFile\n"
            "f = MxqFile.open(sys.argv[1]); problems = f.verify()\n"
            "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
            "print(len(problems), int(hwm.split()[1]))")  # VmHWM: ru_maxrss would include pytest's own peak
    result = subprocess.run([sys.executable, "-c", code, str(sparse)], capture_output=True, text=True, env=ENV,
                            timeout=120)
    problems, peak_kib = map(int, result.stdout.split())
    assert problems == 0 and peak_kib < 300 << 10, result.stdout  # < 300 MiB for a 1 GiB file
    with open(sparse, "r+b") as f:
        f.seek((1 << 30) - 1)
        f.write(b"\1")
    with MxqFile.open(sparse) as f:
        assert any("padding" in p for p in f.verify())


# -- output locations and temporaries --------------------------------------------------------------
def _plans():
    return [TensorPlan("n", (7,), StorageConfig.fp16(), "norm")]


def _write(path):
    with MxqWriter(path, model={}, tokenizer={"kind": "sentencepiece"}, tokenizer_data=b"t", tensors=_plans()) as w:
        w.write("n", {"data": np.ones(7, dtype=np.float16)})


def test_output_path_checks(tmp_path):
    (tmp_path / "real.mxq").write_bytes(b"keep")
    (tmp_path / "link.mxq").symlink_to(tmp_path / "real.mxq")
    (tmp_path / "dir.mxq").mkdir()
    for bad, message in ((tmp_path / "missing" / "x.mxq", "does not exist"), (tmp_path / "link.mxq", "symbolic"),
                         (tmp_path / "dir.mxq", "not a regular file")):
        with pytest.raises(OutputPathError, match=message):
            check_output_path(bad)
        with pytest.raises(OutputPathError):
            _write(bad)
    assert (tmp_path / "real.mxq").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.mxq", "link.mxq", "real.mxq"]


def test_temporaries_are_unpredictable_and_stale_ones_are_removed(tmp_path):
    target = tmp_path / "m.mxq"
    assert temp_path(target) != temp_path(target)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f".m.mxq.partial-{dead.pid}", tmp_path / f".m.mxq.partial-{dead.pid}-0123456789abcdef"]
    live = tmp_path / f".m.mxq.partial-{os.getppid()}-0123456789abcdef"
    other = tmp_path / f".n.mxq.partial-{dead.pid}"
    for p in stale + [live, other]:
        p.write_bytes(b"x")
    _write(target)
    assert not any(p.exists() for p in stale) and live.exists() and other.exists()
    assert remove_stale_temporaries(target) == []


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "m.mxq"
    with pytest.raises(RuntimeError):
        with MxqWriter(target, model={}, tokenizer={"kind": "sentencepiece"}, tokenizer_data=b"t",
                       tensors=_plans()):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_signal_during_write_leaves_nothing_after_the_next_run(tmp_path, signum):
    code = ("import sys, time, numpy as np\n"
            "from mxq.format_spec import MxqWriter, StorageConfig, TensorPlan\n"
            "plans = [TensorPlan(f't{i}', (7,), StorageConfig.fp16(), 'norm') for i in range(1000)]\n"
            "with MxqWriter(sys.argv[1], model={}, tokenizer={'kind': 'sentencepiece'}, tokenizer_data=b't',\n"
            "               tensors=plans) as w:\n"
            "    print('writing', flush=True)\n"
            "    for p in plans:\n"
            "        w.write(p.name, {'data': np.ones(7, dtype=np.float16)}); time.sleep(0.01)\n")
    target = tmp_path / "m.mxq"
    process = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, env=ENV,
                               stderr=subprocess.DEVNULL)
    assert process.stdout.readline() == b"writing\n"
    process.send_signal(signum)
    process.wait(timeout=60)
    leftovers = list(tmp_path.iterdir())
    assert not target.exists()
    if signum != signal.SIGKILL:
        assert leftovers == []  # cleaned up by the interrupted process itself
    _write(target)  # the next run removes what a SIGKILLed one left
    assert [p.name for p in tmp_path.iterdir()] == ["m.mxq"]


# -- real models: load verification, export-hf, interrupted convert/export -------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """tiny-qwen2 written as fp16 through the test writer (no conversion needed)."""
    fixtures = pytest.importorskip("fixtures")
    from test_runtime_files import write_test_mxq

    return write_test_mxq(fixtures.ensure("tiny-qwen2"), tmp_path_factory.mktemp("tiny") / "m.mxq")


def _damaged_copy(path, tmp_path):
    image = bytearray(path.read_bytes())
    image[-1] ^= 0xFF  # the last blob: only its checksum can tell
    target = tmp_path / "damaged.mxq"
    target.write_bytes(bytes(image))
    return target


def test_load_verifies_checksums_unless_told_not_to(tiny_model, tmp_path):
    import mxq

    damaged = _damaged_copy(tiny_model, tmp_path)
    with pytest.raises(MxqFormatError, match="damaged.*crc32"):
        mxq.load(damaged)
    with mxq.load(damaged, verify=False) as model:  # the opt-out: loads (and computes garbage silently)
        assert model.tokenizer.encode("hi")
    assert "damaged" in _one_line_error(_cli("generate", damaged, "hi", "-n", "1"))
    image = bytearray(tiny_model.read_bytes())
    with MxqFile.open(tiny_model) as f:
        blob = f.tokenizer_blob
    image[blob.offset] ^= 0xFF  # the tokenizer blob is checked even with --no-verify
    damaged.write_bytes(bytes(image))
    assert "tokenizer blob" in _one_line_error(_cli("generate", damaged, "hi", "-n", "1", "--no-verify"))


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_hf_is_checked_and_atomic(tiny_model, tmp_path):
    from mxq.runtime.errors import ModelError
    from mxq.runtime.export_hf import export_hf

    out = tmp_path / "hf"
    export_hf(tiny_model, out)
    first = _tree(out)
    export_hf(tiny_model, out)  # re-export over a previous export: replaced, same bytes
    assert _tree(out) == first and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    with pytest.raises(MxqFormatError, match="damaged"):
        export_hf(_damaged_copy(tiny_model, tmp_path), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    (tmp_path / "link").symlink_to(out)
    with pytest.raises(OutputPathError, match="symbolic link"):
        export_hf(tiny_model, tmp_path / "link")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match="notes.txt"):
        export_hf(tiny_model, out)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert _tree(out) == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (tmp_path / "empty").mkdir()
    for where, target in [("empty", "."), ("empty", ".."), ("hf", str(out)), ("empty", str(tmp_path))]:
        with pytest.raises(ModelError, match="current directory"):  # it would be renamed away, then deleted
            with pytest.MonkeyPatch.context() as patch:
                patch.chdir(tmp_path / where)
                export_hf(tiny_model, target)
    assert _tree(out) == first and not list((tmp_path / "empty").iterdir())


@pytest.mark.parametrize("command", ["convert", "export-hf"])
def test_interrupted_runs_leave_nothing_and_rerun_gives_identical_bytes(tiny_model, tmp_path, command):
    """SIGINT, SIGTERM and SIGKILL at random moments; afterwards the next run cleans up what a
    killed run left and writes exactly the bytes of an uninterrupted run."""
    fixtures = pytest.importorskip("fixtures")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if command == "convert":
        target = out_dir / "c.mxq"
        args = ["convert", fixtures.ensure("tiny-qwen2"), "-o", target, "--bpw", "4.25", "--objective", "frobenius",
                "--quantizer", "rtn", "--configs", "paper", "--no-cache", "-q"]
    else:
        target = out_dir / "hf"
        args = ["export-hf", tiny_model, target, "--no-progress"]
    started = time.perf_counter()
    assert _cli(*args, timeout=300).returncode == 0
    duration = time.perf_counter() - started  # signals land anywhere from start-up to the final rename
    expected = _tree(out_dir)
    rng = np.random.default_rng(0)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        for p in list(out_dir.iterdir()):
            subprocess.run(["rm", "-rf", str(p)], check=True)
        process = subprocess.Popen([sys.executable, "-m", "mxq.cli", *map(str, args)], env=ENV,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(float(rng.uniform(0.0, 1.0)) * duration)  # a fast run can finish in < 0.2 s
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
        assert b"Traceback" not in stderr, stderr
        if process.returncode != 0 and signum != signal.SIGKILL:
            # nothing left, or (a signal that landed after the final rename) the complete output
            assert list(out_dir.iterdir()) == [] or _tree(out_dir) == expected, (signum, list(out_dir.iterdir()))
        result = _cli(*args, timeout=300)
        assert result.returncode == 0, result.stderr
        assert _tree(out_dir) == expected, signum
        assert [p.name for p in out_dir.iterdir()] == [target.name]


# -- converter input -------------------------------------------------------------------------------
def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header, nbytes, message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 8, "overlaps"),  # aliased
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 16, "gap"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "needs 12"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 16, "cover 8 of the 16"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}, 8, "invalid data_offsets"),
    ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, 4, "invalid shape"),
])
def test_safetensors_offsets_must_tile_the_data(tmp_path, header, nbytes, message):
    from mxq.converter import ConversionError
    from mxq.converter.checkpoint import _index_tensors

    _safetensors(tmp_path / "model.safetensors", header, bytes(nbytes))
    with pytest.raises(ConversionError, match=message):
        _index_tensors(tmp_path)


def test_safetensors_header_is_parsed_strictly(tmp_path):
    from mxq.converter import ConversionError
    from mxq.converter.checkpoint import _index_tensors

    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}'
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(ConversionError, match="twice"):
        _index_tensors(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    os.mkfifo(tmp_path / "model.safetensors")  # would block a plain open() forever
    with pytest.raises(ConversionError, match="FIFO"):
        _index_tensors(tmp_path)


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors",
                                   "link.safetensors"])
def test_shards_must_stay_inside_the_checkpoint(tmp_path, shard):
    from mxq.converter import ConversionError
    from mxq.converter.checkpoint import _index_tensors

    folder = tmp_path / "ckpt"
    folder.mkdir()
    outside = _safetensors(tmp_path / "outside.safetensors", {"a": {"dtype": "F32", "shape": [1],
                                                                    "data_offsets": [0, 4]}}, bytes(4))
    (folder / "link.safetensors").symlink_to(outside)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
    with pytest.raises(ConversionError, match="inside the checkpoint folder|outside the checkpoint folder"):
        _index_tensors(folder)


def test_hugging_face_cache_symlinks_are_allowed(tmp_path):
    from mxq.converter.checkpoint import _index_tensors

    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    blob = _safetensors(repo / "blobs" / "f00d", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                        bytes(4))
    (snapshot / "model.safetensors").symlink_to(Path("../../blobs") / blob.name)
    assert set(_index_tensors(snapshot)) == {"a"}


@pytest.mark.parametrize("name, value", [("model.norm.weight", 1e6), ("model.layers.0.self_attn.q_proj.bias", -7e4),
                                         ("model.embed_tokens.weight", float("inf"))])
def test_values_beyond_fp16_are_rejected_by_name(tmp_path, name, value):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from mxq.converter import ConversionError
    from mxq.converter.checkpoint import read_checkpoint

    fixtures = pytest.importorskip("fixtures")
    folder = tmp_path / "ckpt"
    shutil.copytree(fixtures.ensure("tiny-qwen2"), folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(folder / "model.safetensors"))
    checkpoint = read_checkpoint(folder)
    with pytest.raises(ConversionError, match=f"'{name}'.*(fp16|NaN or Inf)"):
        checkpoint.load(name)
    assert torch.isfinite(checkpoint.load("model.layers.0.mlp.up_proj.weight")).all()


# -- fuzz (fast tier: a bounded slice of tools/fuzz.py) --------------------------------------------
def test_fuzz_metadata_and_bytes():
    """Metadata-level (types, ranges, huge numbers, NaN/Infinity text, duplicate keys, templates),
    byte-level and row_order (rows tensors, loaded without the checksum pass) mutations of a real model
    file: every case is ok, damaged or a typed rejection."""
    fuzz = pytest.importorskip("fuzz")
    report = fuzz.fuzz(n_metadata=600, n_bytes=600, n_rows=200, seed=1, timeout=20, budget_seconds=40, log=None)
    assert sum(report["cases"].values()) >= 200, report["cases"]
    assert report["outcomes"].get("rows rejected", 0) > 0, report["outcomes"]  # the runtime's own check
    assert report["crashes"] == [] and report["hangs"] == [], report
    assert report["peak_memory"]["excess"] <= 64 << 20, report["peak_memory"]  # growth <= 4 x size + 64 MiB


def test_convert_checks_the_output_location_first(tmp_path):
    """Before reading the checkpoint (let alone calibrating): the output directory must exist."""
    line = _one_line_error(_cli("convert", tmp_path / "no-checkpoint", "-o", tmp_path / "missing" / "x.mxq",
                                "--bpw", "4"))
    assert "missing" in line and "does not exist" in line
    (tmp_path / "x.mxq").mkdir()
    assert "not a regular file" in _one_line_error(_cli("convert", tmp_path / "no-checkpoint", "-o",
                                                        tmp_path / "x.mxq", "--bpw", "4"))


def test_fuzz_checkpoints():
    """A bounded slice of tools/fuzz_checkpoint.py: `mxq convert` on damaged tiny checkpoints (config,
    tokenizer files, safetensors headers and data, file kinds, shard index) ends ok (and the file then
    verifies, loads and runs) or in a typed one-line error with nothing left behind."""
    fuzz_checkpoint = pytest.importorskip("fuzz_checkpoint")
    kinds = ("config", "tokenizer_config", "tokenizer", "safetensors", "file_kind", "index", "dims")
    report = fuzz_checkpoint.fuzz_checkpoints(cases=300, seed=1, fixtures=("tiny-qwen3", "tiny-gemma3", "tiny-phi3"),
                                              timeout=30, kinds=kinds, budget_seconds=30, log=None)
    assert report["cases"] >= 10, report
    assert report["problems"] == [], report


# -- checkpoint files and fields (found by tools/fuzz_checkpoint.py) -------------------------------
@pytest.fixture
def checkpoint_copy(tmp_path):
    """A writable copy of a tiny hf-tokenizers checkpoint (tiny-qwen3) with a generation_config.json."""
    import shutil

    fixtures = pytest.importorskip("fixtures")
    folder = tmp_path / "ckpt"
    shutil.copytree(fixtures.ensure("tiny-qwen3"), folder)
    (folder / "generation_config.json").write_text('{"eos_token_id": 1}')
    return folder


def _read_checkpoint_within(folder, seconds=30):
    """read_checkpoint, failing the test (not hanging the suite) if it blocks."""
    from mxq.converter.checkpoint import read_checkpoint

    def blocked(signum, frame):
        raise AssertionError("read_checkpoint blocked")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(seconds)
    try:
        return read_checkpoint(folder)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                                  "README.md", "chat_template.jinja", "model.safetensors.index.json"])
def test_every_checkpoint_file_must_be_regular(checkpoint_copy, name):
    """A FIFO in place of any file the converter opens used to hang `convert` (plain open() blocks
    until a writer comes); now it is one error naming the file."""
    from mxq.converter import ConversionError

    if name == "chat_template.jinja":  # read only when tokenizer_config.json has no template
        config = checkpoint_copy / "tokenizer_config.json"
        config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "chat_template"}))
    (checkpoint_copy / name).unlink(missing_ok=True)
    os.mkfifo(checkpoint_copy / name)
    with pytest.raises(ConversionError, match=f"{name}.*FIFO"):
        _read_checkpoint_within(checkpoint_copy)


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "tokenizer.json"])
def test_checkpoint_file_reads_are_capped(checkpoint_copy, name):
    """A (sparse) file far beyond any real one is refused by its size, not read into memory."""
    from mxq.converter import ConversionError

    with open(checkpoint_copy / name, "r+b") as handle:
        handle.truncate(1 << 30)
    with pytest.raises(ConversionError, match=f"{name}: {name} is 1,073,741,824 bytes \\(cap"):
        _read_checkpoint_within(checkpoint_copy)


@pytest.mark.parametrize("name, change, message", [
    ("config.json", lambda text: text.replace('"vocab_size"', '"vocab_size": NaN, "x"', 1), "config.json.*NaN"),
    ("config.json", lambda text: text.replace('"vocab_size"', '"vocab_size": 1, "vocab_size"', 1),
     "config.json.*twice"),
    ("tokenizer_config.json", lambda text: _set(text, chat_template=5), "tokenizer_config.json: chat_template must"),
    ("tokenizer_config.json", lambda text: _set(text, chat_template=[1]), "tokenizer_config.json: chat_template must"),
    ("tokenizer_config.json", lambda text: _set(text, chat_template="{% if %}"),
     "tokenizer_config.json: chat_template does not parse"),
    ("tokenizer_config.json", lambda text: _set(text, chat_template="{{" + "(" * 5000 + "}}"),
     "tokenizer_config.json: chat_template does not parse: nested too deeply"),
    ("tokenizer_config.json", lambda text: _set(text, chat_template="x" * 300_000),
     "tokenizer_config.json: .*chat_template.*characters"),
    ("generation_config.json", lambda text: _set(text, eos_token_id=2.0),
     "generation_config.json: eos_token_id must be a token id"),
    ("generation_config.json", lambda text: _set(text, eos_token_id=[1, True]),
     "generation_config.json: eos_token_id must be a token id"),
    ("generation_config.json", lambda text: _set(text, eos_token_id=10**6),
     "generation_config.json: .*eos_token_ids.0.*outside the vocabulary"),
    ("tokenizer.json", lambda text: text[: len(text) // 2], "tokenizer.json: does not load"),
])
def test_checkpoint_field_errors_name_file_and_field(checkpoint_copy, name, change, message):
    """Before any heavy work, one line naming the file and the field (some of these used to print
    "internal error", or to fail only when the finished file was written)."""
    from mxq.converter import ConversionError

    file = checkpoint_copy / name
    file.write_text(change(file.read_text()))
    with pytest.raises(ConversionError, match=message):
        _read_checkpoint_within(checkpoint_copy)


def _set(text: str, **values) -> str:
    return json.dumps({**json.loads(text), **values})


def test_sentencepiece_add_bos_token_must_be_a_boolean(tmp_path):
    """`"add_bos_token": "false"` (a string) was taken as true."""
    import shutil

    from mxq.converter import ConversionError

    fixtures = pytest.importorskip("fixtures")
    folder = tmp_path / "ckpt"
    shutil.copytree(fixtures.ensure("tiny-llama"), folder)
    file = folder / "tokenizer_config.json"
    file.write_text(_set(file.read_text(), add_bos_token="false"))
    with pytest.raises(ConversionError, match="tokenizer_config.json: add_bos_token must be true or false"):
        _read_checkpoint_within(folder)


def test_safetensors_dtype_must_be_a_string(tmp_path):
    """A list as dtype was an "internal error" (unhashable type)."""
    from mxq.converter import ConversionError
    from mxq.converter.checkpoint import _index_tensors

    _safetensors(tmp_path / "model.safetensors", {"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}},
                 bytes(4))
    with pytest.raises(ConversionError, match="'a' has an invalid dtype"):
        _index_tensors(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"rope_theta": 1e-300}, "rope_theta must be a positive number in float32's range"),
    ({"rms_norm_eps": 1e39}, "rms_norm_eps must be a positive number in float32's range"),
    ({"rms_norm_eps": 1e-45}, "rms_norm_eps must be a positive number in float32's range"),
    ({"rope_theta": 1.2e-38, "rope_scaling": {"rope_type": "linear", "factor": 1.2e-38}}, "non-finite RoPE"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 1.2e-38}}, "non-finite RoPE"),  # finite until × position
])
def test_real_config_values_must_fit_float32(change, message):
    """Values the runtime computes with in float32: 1e-300 became 0 and a NaN forward pass."""
    from mxq.runtime.config import ModelConfig
    from mxq.runtime.errors import ModelError

    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 1, "num_attention_heads": 2}
    ModelConfig.from_hf(config)
    with pytest.raises(ModelError, match=message):
        ModelConfig.from_hf({**config, **change})


def test_a_nearly_constant_group_quantizes():
    import torch

    from mxq.converter.candidates import parse_candidates
    from mxq.converter.quantize import quantize

    for label in ("b8g32", "b2g32"):
        (candidate,) = parse_candidates(label)
        weight = torch.tensor([[1.0] * 31 + [1.001], [-300.0] * 16 + [-300.01] * 16])
        for quantizer in ("rtn", "hqq", "wls"):
            result = quantize(weight, candidate.storage(weight.shape), quantizer)
            # the zero point is capped (quantize.ZERO_LIMIT): every weight stays within 0.1% of its value
            limit = torch.tensor([32 * 1e-3 ** 2, 32 * 0.3 ** 2], dtype=torch.float64)
            assert (result.row_error_sq <= limit).all(), (label, quantizer, result.row_error_sq)


def test_sampling_options_are_checked():
    from mxq.runtime.errors import ModelError
    from mxq.runtime.sampler import Sampler

    for options, message in [({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")},
                             "temperature"), ({"temperature": 0.5, "seed": -1}, "seed")]:
        with pytest.raises(ModelError, match=message):
            Sampler(**options)
    assert Sampler(temperature=0.5, seed=0)(np.array([0.0, 1.0])) in (0, 1)


def test_a_damaged_models_perplexity_is_refused():
    """NaN, or a mean NLL past exp()'s range: one line, never NaN in a report or an OverflowError."""
    from mxq.runtime.errors import ModelError
    from mxq.runtime.perplexity import _summary

    assert _summary([6.0, 2.0], [3, 1])["ppl"] == pytest.approx(np.e ** 2)
    for sums in ([float("nan"), 1.0], [1e4, 1e4]):
        with pytest.raises(ModelError, match="damaged"):
            _summary(sums, [1, 1])


def test_tensor_names_must_be_printable(small_file, tmp_path):
    path, _, _ = small_file
    target = tmp_path / "bad.mxq"

    def change(document):
        document["tensors"][0]["name"] = "x\n  y"

    target.write_bytes(_rewrite_json(path.read_bytes(), change))
    with pytest.raises(MxqFormatError, match="non-printable"):
        MxqFile.open(target)
    assert "non-printable" in _one_line_error(_cli("verify", target))


def test_plot_paths_are_checked_and_written_whole(tmp_path, monkeypatch):
    plot = pytest.importorskip("mxq.plot")
    pytest.importorskip("matplotlib")
    for bad in ("x.jpgx", "noext", ""):
        with pytest.raises(OutputPathError):
            plot.check_png_path(tmp_path / bad if bad else bad)
    entries = [(f"model.layers.{i}.mlp.up_proj.weight", "b4g64", 4.19) for i in range(2)]
    out = tmp_path / "heat.PNG"
    assert plot.heatmap(entries, out) == str(out) and out.read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", lambda *a, **k: (_ for _ in ()).throw(OSError("full")))
    with pytest.raises(OSError, match="full"):
        plot.heatmap(entries, tmp_path / "half.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.PNG"]  # no half-written plot, no temporary


def test_damaged_error_cache_values_are_measured_again(tmp_path):
    """Finite values near float64's limit overflowed when summed ('Out of range float values')."""
    from mxq.converter.measure import _is_value

    assert _is_value([1.0, 2.0, 0.0]) and not _is_value([1e308, 1e308, 1e308]) and not _is_value([1.0, -1.0, 0.0])


def test_a_native_panic_is_one_line(monkeypatch):
    """pyo3's PanicException (a Rust library's panic) derives from BaseException, not Exception."""
    from click.testing import CliRunner

    import mxq.cli as cli

    class PanicException(BaseException):
        pass

    def panic(*args, **kwargs):
        raise PanicException("Onig: Regex search error:\nretry-limit-in-match over")

    monkeypatch.setattr(cli, "summarize", panic)
    monkeypatch.setattr(cli, "_open", lambda path: __import__("contextlib").nullcontext(None))
    result = CliRunner().invoke(cli.main, ["inspect", "x.mxq"])
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0
    assert "retry-limit-in-match" in result.output


def test_python_api_arguments_are_checked(tiny_model):
    """Wrong types at the Python API are one ModelError naming the argument, never a raw TypeError,
    AttributeError or OverflowError from deep inside (and a closed model says so)."""
    import mxq
    from mxq.runtime.errors import ModelError

    for path, device in [(b"x.mxq", "cpu"), ("x\0.mxq", "cpu"), (tiny_model, ["cpu"])]:
        with pytest.raises(ModelError):
            mxq.load(path, device=device)
    model = mxq.load(tiny_model)
    for args, kwargs, message in [((None,), {}, "prompt must be a str"), ((b"x",), {}, "prompt must be a str"),
                                  (("hi",), {"max_new_tokens": 1.5}, "new tokens"),
                                  (("hi",), {"max_new_tokens": float("nan")}, "new tokens"),
                                  (("hi",), {"max_new_tokens": "3"}, "new tokens"),
                                  (("hi",), {"temperature": "hot"}, "temperature"),
                                  (("hi",), {"temperature": 0.5, "top_k": 1.5}, "top-k"),
                                  (("hi",), {"temperature": 0.5, "seed": 1.5}, "seed")]:
        with pytest.raises(ModelError, match=message):
            list(model.generate(*args, **kwargs))
    for ids in ([2 ** 63], [-1], np.array([2 ** 64 - 1], np.uint64), [1.5]):
        with pytest.raises(ModelError, match="token id"):
            model.logits(ids)
        with pytest.raises(ModelError, match="token id"):
            list(model.generate_ids(ids, 2))
    assert list(model.generate_ids(np.array([1, 2], np.int32), 2, seed=np.int64(3), temperature=np.float32(0.5)))
    model.close()
    with pytest.raises(ModelError, match="closed"):
        model.logits([1])


def test_a_terminated_kernel_build_leaves_no_staging_directory(tmp_path):
    """`cpu_aot_build` stages in a hidden .build-* directory beside its output; SIGTERM (a parent's timeout,
    a killed session) must still remove it."""
    out = tmp_path / "kernels.so"
    build = subprocess.Popen([sys.executable, "-m", "mxq.runtime.backends.cpu_aot_build", str(out)], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".build-*")) and time.time() < deadline and build.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(".build-*")), "the build never staged"
    build.send_signal(signal.SIGTERM)
    assert build.wait(timeout=60) == 143
    assert not list(tmp_path.iterdir())

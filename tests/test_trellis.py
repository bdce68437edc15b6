"""The `trellis` scheme (format 1.9, SPEC.md §13): its stream, labels, cost model and file round trip, hostile
files, and the converter's quantizer (Viterbi, scales, row samples, tables) and a conversion that picks it."""
from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import file_plans_and_blobs, random_affine_blobs, random_trellis_blobs, random_walks, write_random_file
from mxq.format_spec import (MxqFile, MxqFormatError, MxqWriter, StorageConfig, TensorPlan, content_problem,
                              decode_meta, dequantize, join_blocks, tensor_nbytes)
from mxq.format_spec.layout import TRELLIS_BITS, file_codebooks, trellis_dims
from mxq.format_spec.trellis import pack_windows, trellis_windows

SHAPES = [(1, 1), (3, 7), (5, 64), (4, 65), (2, 200), (9, 576)]


# -- the stream (SPEC.md §13.1) ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", TRELLIS_BITS)
def test_windows_round_trip_through_the_stream(bits):
    rng = np.random.default_rng(bits)
    for shape in SHAPES:
        walks = random_walks(rng, shape, bits)
        qweight = pack_windows(walks, bits)
        assert qweight.shape == (shape[0], trellis_dims(shape, StorageConfig.trellis(bits, 32))[2])
        assert np.array_equal(trellis_windows(qweight, shape[1], bits), walks)


def test_stream_is_the_spec_bit_string():
    """Stream bit i is bit i mod 32 of word i div 32; window c is the 12 bits from bit c·K; the bits after the
    last window are 0 — checked bit by bit against a string built from SPEC.md §13.1's words."""
    rng = np.random.default_rng(1)
    for bits in TRELLIS_BITS:
        walks = random_walks(rng, (3, 37), bits)
        qweight = pack_windows(walks, bits)
        for r in range(3):
            stream = "".join(format(int(word), "032b")[::-1] for word in qweight[r])  # LSB first
            for c in range(37):
                assert int(stream[c * bits:c * bits + 12][::-1], 2) == walks[r, c]
            assert set(stream[12 + 36 * bits:]) <= {"0"}


def test_pack_windows_rejects_what_is_not_a_walk():
    walks = random_walks(np.random.default_rng(2), (2, 10), 4)
    walks[1, 5] ^= 1  # its low bits no longer continue window 4
    with pytest.raises(ValueError, match="walk"):
        pack_windows(walks, 4)
    with pytest.raises(ValueError, match="0..4095"):
        pack_windows(np.full((1, 3), 4096), 4)


# -- labels and the cost model (SPEC.md §5, §11) ----------------------------------------------------------------------
@pytest.mark.parametrize("label", ["t2g32", "t4g64", "t5g128m8", "rows(3:t3g64,4:b4g64)"])
def test_labels_round_trip(label):
    assert StorageConfig.parse(label).label == label


@pytest.mark.parametrize("label", ["t1g64", "t6g64", "t4g16", "t4g64m7", "t4g64+o1", "t4g64+o0.5%", "t4"])
def test_bad_labels_are_rejected(label):
    with pytest.raises(ValueError):
        StorageConfig.parse(label)


def test_cost_model_is_the_spec_formula():
    for (out, inp), bits, group, meta in itertools.product(SHAPES, TRELLIS_BITS, (32, 64, 128), (6, 8)):
        words = -(-(12 + (inp - 1) * bits) // 32)
        runs = -(-(out * -(-inp // group)) // 128)
        codes = out * -(-inp // group) if meta == 8 else 4 * meta * -(-(out * -(-inp // group)) // 32)
        assert tensor_nbytes((out, inp), StorageConfig.trellis(bits, group, meta)) == 4 * out * words + codes + 4 * runs


def test_file_round_trip_costs_and_tables(tmp_path):
    """Every K × group size × odd shape (and rows with trellis blocks): the writer's bytes are the cost model's,
    the file is 1.9 with one table per K, and the reader's blobs dequantize to the written ones."""
    tensors = [(f"t{i}", shape, StorageConfig.trellis(bits, group, meta))
               for i, (shape, bits, (group, meta)) in enumerate(itertools.product(
                   SHAPES[1:], TRELLIS_BITS, ((32, 6), (64, 6), (128, 8))))]
    path = tmp_path / "t.mxq"
    written = write_random_file(path, tensors)
    rows_config = StorageConfig.parse("rows(3:t4g64,2:b4g32,4:t2g32m8)")
    rng = np.random.default_rng(5)
    blocks = [random_trellis_blobs(rng, (n, 70), c) if c.scheme == "trellis" else random_affine_blobs(rng, (n, 70), c)
              for n, c in rows_config.blocks]
    rows_blobs = join_blocks(rng.permutation(9), blocks)
    plans, stored = file_plans_and_blobs([TensorPlan("r", (9, 70), rows_config, "linear")], {"r": rows_blobs}.get)
    with MxqWriter(tmp_path / "r.mxq", model={"architecture": "llama"}, tokenizer={"kind": "sentencepiece"},
                   tokenizer_data=b"t", tensors=plans) as writer:
        for plan in plans:
            writer.write(plan.name, stored[plan.name])
    with MxqFile.open(path) as f:
        assert f.version == (1, 9) and f.verify() == []
        assert sorted(f.codebooks) == [f"codebook.t{k}" for k in TRELLIS_BITS]
        for name, shape, config in tensors:
            entry = f.tensors[name]
            assert entry.config == config and entry.nbytes == tensor_nbytes(shape, config)
            assert np.array_equal(dequantize(f.blobs(name), shape, config), dequantize(written[name], shape, config))
    with MxqFile.open(tmp_path / "r.mxq") as f:
        entry = f.tensors["r"]
        assert entry.config == rows_config and entry.nbytes == tensor_nbytes((9, 70), rows_config)
        assert np.array_equal(dequantize(f.blobs("r"), (9, 70), rows_config), dequantize(rows_blobs, (9, 70), rows_config))


def test_dequantization_is_the_spec_formula():
    rng = np.random.default_rng(3)
    config = StorageConfig.trellis(3, 32)
    blobs = random_trellis_blobs(rng, (4, 77), config)
    windows = trellis_windows(blobs["qweight"], 77, 3)
    scale = decode_meta(blobs["scale_codes"], blobs["scale_meta"])
    table = blobs["codebook"].astype(np.float32)[:, 0]
    expected = np.array([[scale[r, c // 32] * table[windows[r, c]] for c in range(77)] for r in range(4)], np.float32)
    assert np.array_equal(dequantize(blobs, (4, 77), config), expected)


def _entry(document, name):
    return next(t for t in document["tensors"] if t["name"] == name)


HOSTILE = {  # edits of a trellis file's JSON, each rejected at open with one line naming the problem
    "table missing": (lambda d: d["tensors"].remove(_entry(d, "codebook.t4")), "'codebook.t4' is not in the file"),
    "table as a model tensor": (lambda d: _entry(d, "codebook.t4").update(role="other"), "not in the file"),
    "table shorter": (lambda d: _entry(d, "codebook.t4").update(shape=[2048, 1]), "shape [2048, 1] != [4096, 1]"),
    "window bits": (lambda d: _entry(d, "a")["config"].update(window_bits=16), "window_bits=16 is not supported"),
    "bits 6": (lambda d: _entry(d, "a")["config"].update(bits=6), "is not supported"),
    "no group size": (lambda d: _entry(d, "a")["config"].pop("group_size"), "group_size"),
    "group size 48": (lambda d: _entry(d, "a")["config"].update(group_size=48), "is not supported"),
    "meta bits 0": (lambda d: _entry(d, "a")["config"].update(meta_bits=0), "is not supported"),
    "meta bits 7": (lambda d: _entry(d, "a")["config"].update(meta_bits=7), "is not supported"),
    "meta runs of 64": (lambda d: _entry(d, "a")["config"].update(meta_group_size=64), "is not supported"),
    "no window bits": (lambda d: _entry(d, "a")["config"].pop("window_bits"), "window_bits"),
    "window bits as text": (lambda d: _entry(d, "a")["config"].update(window_bits="12"), "window_bits"),
    "block bits": (lambda d: _entry(d, "r")["config"]["blocks"][0]["config"].update(bits=1), "block 0"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_trellis_files_are_rejected(tmp_path, name):
    from test_corruption import _rewrite_json

    path = tmp_path / "t.mxq"
    write_random_file(path, [("a", (5, 70), StorageConfig.parse("t4g64")), ("n", (7,), StorageConfig.fp16())])
    rows_config = StorageConfig.parse("rows(2:t4g32,3:fp16)")
    if name == "block bits":  # a file with a rows tensor
        rng = np.random.default_rng(0)
        blobs = join_blocks(rng.permutation(5), [random_trellis_blobs(rng, (2, 70), rows_config.blocks[0][1]),
                                                 {"data": rng.standard_normal((3, 70)).astype(np.float16)}])
        plans, stored = file_plans_and_blobs([TensorPlan("a", (5, 70), StorageConfig.parse("t4g64"), "linear"),
                                              TensorPlan("r", (5, 70), rows_config, "linear")],
                                             {"a": random_trellis_blobs(rng, (5, 70), StorageConfig.parse("t4g64")),
                                              "r": blobs}.get)
        with MxqWriter(path, model={"architecture": "llama"}, tokenizer={"kind": "sentencepiece"}, tokenizer_data=b"t",
                       tensors=plans) as writer:
            for plan in plans:
                writer.write(plan.name, stored[plan.name])
    edit, message = HOSTILE[name]
    target = tmp_path / "hostile.mxq"
    target.write_bytes(_rewrite_json(path.read_bytes(), edit))
    with pytest.raises(MxqFormatError) as caught:
        MxqFile.open(target)
    assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_a_non_finite_table_is_a_content_problem(tmp_path):
    path = tmp_path / "t.mxq"
    write_random_file(path, [("a", (5, 70), StorageConfig.parse("t2g64"))])
    with MxqFile.open(path) as f:
        blobs = dict(f.blobs("a"))
    blobs["codebook"] = blobs["codebook"].copy()
    blobs["codebook"][17] = np.inf
    assert "codebook" in content_problem(blobs, (5, 70), StorageConfig.parse("t2g64"))


def test_writer_needs_the_table(tmp_path):
    plans = [TensorPlan("a", (5, 70), StorageConfig.parse("t3g64"), "linear")]
    assert file_codebooks(plans[0].config) == {"codebook.t3": (4096, 1)}
    for extra in ([], [TensorPlan("codebook.t3", (4096, 4), StorageConfig.fp16(), "codebook")]):
        with pytest.raises(ValueError, match="'codebook.t3'"):
            MxqWriter(tmp_path / "x.mxq", model={}, tokenizer={"kind": "sentencepiece"}, tokenizer_data=b"t",
                      tensors=plans + extra)
    assert list(tmp_path.iterdir()) == []


def test_inspect_reports_trellis(tmp_path):
    path = tmp_path / "s.mxq"
    write_random_file(path, [("a", (16, 128), StorageConfig.affine(4, 32)), ("t", (16, 128), StorageConfig.trellis(4, 64))])
    result = subprocess.run([sys.executable, "-m", "mxq.cli", "inspect", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "trellis tensors" in result.stdout and "mxq format 1.9" in result.stdout and "t4g64" in result.stdout


# -- the quantizer (converter/trellis.py) -----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_viterbi_finds_the_best_walk(bits):
    """Against every walk of a 3-weight row (4096 · 2^K · 2^K of them): the Viterbi's walk has the least cost."""
    from mxq.converter.trellis import viterbi

    rng = np.random.default_rng(4 + bits)
    table = rng.standard_normal(4096)
    w, f, s = rng.standard_normal((1, 3)), rng.uniform(0.1, 2.0, (1, 3)), rng.uniform(0.5, 1.5, (1, 3))
    windows = viterbi(w, f, s, table, bits)[0]
    first, keep = np.arange(4096), (1 << (12 - bits)) - 1
    heads = np.arange(1 << bits)
    w1 = (first[:, None] >> bits) | (heads[None, :] << (12 - bits))  # (4096, 2^K)
    w2 = (w1[:, :, None] >> bits) | (heads[None, None, :] << (12 - bits))  # (4096, 2^K, 2^K)
    costs = sum(f[0, c] * (w[0, c] - s[0, c] * table[x]) ** 2 for c, x in enumerate((first[:, None, None], w1[:, :, None], w2)))
    ours = sum(f[0, c] * (w[0, c] - s[0, c] * table[windows[c]]) ** 2 for c in range(3))
    assert np.isclose(ours, costs.min(), rtol=1e-12, atol=0)
    assert windows[1] & keep == windows[0] >> bits and windows[2] & keep == windows[1] >> bits  # a walk


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
@pytest.mark.parametrize("n, ties", [(1, False), (2, False), (77, False), (300, True)])
def test_viterbi_equals_a_scan_in_window_order(bits, n, ties):
    """The vectorized layout changes the order of nothing that decides: the same windows as the textbook scan
    (tools/bench_viterbi.scan_row, the converter's before), ties (a table of 16 distinct levels repeated) broken
    the same way."""
    from bench_viterbi import scan_row

    from mxq.converter.trellis import viterbi

    rng = np.random.default_rng(bits * 1000 + n)
    table = rng.standard_normal(16)[rng.integers(0, 16, 4096)] if ties else rng.standard_normal(4096)
    w, f, s = rng.standard_normal((2, n)), rng.uniform(0.1, 2.0, (2, n)), rng.uniform(0.5, 1.5, (2, n))
    if ties:
        w = np.round(w * 2) / 2
        f[:] = 1.0
        s[:] = 1.0
    windows = viterbi(w, f, s, table, bits)
    for r in range(2):
        scanned = np.empty(n, np.int32)
        scan_row(w[r], f[r], s[r], table, bits, scanned)
        np.testing.assert_array_equal(windows[r], scanned)


def test_the_viterbi_bench_checks_then_times(capsys, monkeypatch):
    """tools/bench_viterbi.py: a row per K with both times and the speed-up; it stops when the walks differ."""
    import bench_viterbi
    from mxq.converter import trellis

    bench_viterbi.main(["--K", "2,5", "--cols", "40", "--rows", "1", "--rounds", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[0] for r in rows] == ["2", "5"] and all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)

    def wrong(w, f, s, table, bits, out):
        out[:] = 0

    monkeypatch.setattr(trellis, "_viterbi_row", wrong)
    with pytest.raises(SystemExit, match="K = 3: the converter's walk differs from the scan's"):
        bench_viterbi.main(["--K", "3", "--cols", "40", "--rows", "1", "--rounds", "1"])


def test_outliers_leave_trellis_candidates_as_they_are():
    from mxq.converter.candidates import parse_candidates, with_outliers

    candidates = [with_outliers(c, 0.5) for c in parse_candidates("b4g64,t4g64")]
    assert [c.label for c in candidates] == ["b4g64+o0.5%", "t4g64"]


def _table(bits):
    from mxq.converter.trellis import fit_table, table_rows

    rng = np.random.default_rng(6)
    samples = [table_rows(rng.standard_normal((64, 128)), None, 16)]
    return fit_table(samples, bits)


def test_quantized_errors_are_those_of_the_stored_bytes_and_rows_are_independent():
    from mxq.converter.quantize import quantize

    rng = np.random.default_rng(7)
    weight = torch.from_numpy(rng.standard_normal((24, 100)).astype(np.float32))
    importance = torch.from_numpy(rng.uniform(0.0, 3.0, (24, 100)).astype(np.float32))
    config, table = StorageConfig.trellis(3, 32), _table(3)
    books = {(3, 0): table}
    q = quantize(weight, config, "wls", importance=importance, codebooks=books)
    stored = dequantize({**q.blobs, "codebook": table}, (24, 100), config)
    difference = weight.numpy() - stored
    assert np.isclose(q.error_sq, float(np.square(difference, dtype=np.float64).sum()), rtol=1e-9)
    assert np.allclose(q.residual.numpy(), difference)
    sample = torch.tensor([2, 9, 23])
    part = quantize(weight, config, "wls", importance=importance, rows=sample, codebooks=books)
    whole = trellis_windows(q.blobs["qweight"], 100, 3)[[2, 9, 23]]
    assert np.array_equal(trellis_windows(pack_windows(  # the sample's walks are the whole matrix's rows' walks
        trellis_windows(quantize(weight[sample], config, "wls", importance=importance[sample],
                                 codebooks=books).blobs["qweight"], 100, 3), 3), 100, 3), whole)
    assert np.allclose(part.row_weighted.numpy(), q.row_weighted.numpy()[[2, 9, 23]], rtol=0.05)
    with pytest.raises(ValueError, match="no trellis table for K = 3"):
        quantize(weight, config, "wls", codebooks={})


def test_rows_coded_in_chunks_give_the_bytes_of_the_whole_matrix(monkeypatch):
    """quantize_trellis codes CHUNK_WEIGHTS at a time, each chunk whole metadata runs of 128 scales: the same blobs
    and errors as one chunk (40 rows × 4 groups: chunks of 32 rows, then 8)."""
    import mxq.converter.trellis as trellis
    from mxq.converter.quantize import quantize

    rng = np.random.default_rng(9)
    weight = torch.from_numpy(rng.standard_normal((40, 100)).astype(np.float32))
    config, books = StorageConfig.trellis(4, 32), {(4, 0): _table(4)}
    whole = quantize(weight, config, "wls", codebooks=books)
    monkeypatch.setattr(trellis, "CHUNK_WEIGHTS", 1)
    chunked = quantize(weight, config, "wls", codebooks=books)
    assert whole.blobs.keys() == chunked.blobs.keys()
    for name in whole.blobs:
        assert np.array_equal(whole.blobs[name], chunked.blobs[name]), name
    assert whole.error_sq == chunked.error_sq and torch.equal(whole.residual, chunked.residual)


def test_trellis_beats_affine_at_equal_bits_on_gaussian_weights():
    """The reason for the scheme (SPEC.md §13.3): on Gaussian rows of 576, t3g64 (3.15 bits a weight) has a smaller
    error than b3g64 (3.19 bits)."""
    from mxq.converter.quantize import quantize

    rng = np.random.default_rng(8)
    weight = torch.from_numpy(rng.standard_normal((32, 576)).astype(np.float32))
    trellis = quantize(weight, StorageConfig.trellis(3, 64), "wls", codebooks={(3, 0): _table(3)})
    affine = quantize(weight, StorageConfig.affine(3, 64), "wls")
    assert trellis.error_sq < 0.8 * affine.error_sq
    assert tensor_nbytes((32, 576), StorageConfig.trellis(3, 64)) < tensor_nbytes((32, 576), StorageConfig.affine(3, 64))


def test_a_conversion_with_trellis_candidates(trellis_llama):
    """tiny-llama with `b4g64,t4g64,t2g64` (conftest's trellis_llama): the file holds the tables the chosen blocks
    read, its linears' bytes are within the budget, the reader dequantizes every trellis tensor to a smaller error
    than affine at the same bits with more bytes."""
    fixtures = pytest.importorskip("fixtures")
    from mxq.converter.checkpoint import read_checkpoint
    from mxq.converter.quantize import quantize

    source, path = fixtures.ensure("tiny-llama"), trellis_llama
    with MxqFile.open(path) as f:
        assert f.quantization["achieved_bpw_linear"] <= 4.6
    checkpoint = read_checkpoint(source)
    with MxqFile.open(path) as f:
        assert f.version == (1, 9) and f.verify() == []
        assert sorted(f.codebooks) == ["codebook.t2", "codebook.t4"]
        chosen = [e for e in f.tensors.values() if e.config.scheme == "trellis"]
        assert chosen, "no matrix picked a trellis config"
        for entry in chosen:  # each below affine's error at the same bits per weight, with fewer bytes
            weight = checkpoint.load(entry.name)
            stored = dequantize(f.blobs(entry.name), entry.shape, entry.config)
            error = float(np.square(weight.numpy() - stored, dtype=np.float64).sum())
            affine = StorageConfig.affine(entry.config.bits, 64)
            assert error < quantize(weight, affine, "wls").error_sq, entry.name
            assert entry.nbytes < tensor_nbytes(entry.shape, affine)


# -- the converted file through the tools (conftest's trellis_llama) ----------------------------------------------
def test_a_converted_trellis_file_through_verify_inspect_export_hf_and_generate(trellis_llama, tmp_path):
    """`mxq verify` passes; `mxq inspect` lists each trellis tensor with its label (t2g64, t4g64); `mxq export-hf`
    writes each trellis tensor as the spec's formula of its stored bytes (scale[r, c div g] · table[window], the table
    read from the file's codebook.tK tensor; = format_spec.dequantize) and no table as a weight, and transformers
    on the export gives the runtime's logits (NumPy path: the same float32 weights, sums in other orders: 1e-4 of
    max|logits|, measured ≤ 1e-6) and greedy tokens; `mxq generate` (greedy, the default kernels) prints the NumPy
    path's continuation."""
    from click.testing import CliRunner
    from safetensors.numpy import load_file

    import mxq
    from conftest import hf_greedy
    from mxq.cli import main
    from test_cpu_kernels import kernels_mode
    transformers = pytest.importorskip("transformers")

    runner = CliRunner()
    result = runner.invoke(main, ["verify", str(trellis_llama)])
    assert result.exit_code == 0 and "OK" in result.stdout, result.output
    result = runner.invoke(main, ["inspect", str(trellis_llama)])
    assert result.exit_code == 0 and "mxq format 1.9" in result.stdout, result.output
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    out = tmp_path / "hf"
    result = runner.invoke(main, ["export-hf", str(trellis_llama), str(out)])
    assert result.exit_code == 0, result.output
    exported = load_file(str(out / "model.safetensors"))
    with MxqFile.open(trellis_llama) as f:
        assert set(exported) == set(f.tensors) and sorted(f.codebooks) == ["codebook.t2", "codebook.t4"]
        trellis = [(name, e) for name, e in f.tensors.items() if e.config.scheme == "trellis"]
        assert {e.config.label for _, e in trellis} == {"t2g64", "t4g64"}
        for name, entry in f.tensors.items():
            blobs, got = f.blobs(name), exported[name]
            assert got.dtype == np.float32 and got.shape == tuple(entry.shape), name
            if entry.config.scheme == "fp16":
                assert np.array_equal(got, blobs["data"].astype(np.float32)), name
                continue
            assert entry.config.scheme == "trellis" and lines[name][2] == entry.config.label, (name, lines.get(name))
            bits, group = entry.config.bits, entry.config.group_size
            table = f.blobs(f"codebook.t{bits}")["data"].astype(np.float32)[:, 0]
            windows = trellis_windows(blobs["qweight"], entry.shape[1], bits)
            scale = np.repeat(decode_meta(blobs["scale_codes"], blobs["scale_meta"]), group, axis=1)
            assert np.array_equal(got, scale[:, :entry.shape[1]] * table[windows]), name
            assert np.array_equal(got, dequantize(blobs, entry.shape, entry.config)), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    ids = np.random.default_rng(6).integers(0, hf.config.vocab_size, size=24)
    with torch.no_grad():
        want = hf(torch.tensor(ids)[None]).logits[0].numpy()
    want_tokens = hf_greedy(hf, ids[:8].tolist(), 6)
    with kernels_mode("numpy"), mxq.load(trellis_llama) as lm:
        assert lm.backend.kernels is None
        logits = lm.logits(ids)
        assert np.abs(logits - want).max() <= 1e-4 * np.abs(want).max()
        generated = list(lm.generate_ids(ids[:8].tolist(), max_new_tokens=6))  # stops at EOS, never yielded
        assert generated == want_tokens[:len(generated)]
        assert len(generated) == 6 or want_tokens[len(generated)] in lm.tokenizer.eos_ids
        text = "".join(lm.generate("Once upon a time", max_new_tokens=6))
    assert text.strip()
    result = runner.invoke(main, ["generate", str(trellis_llama), "Once upon a time", "-n", "6"])
    assert result.exit_code == 0 and result.stdout == text + "\n", result.output

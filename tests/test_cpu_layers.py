"""Decode's decoder layers as one compiled call (runtime/backends/cpu_layers.py) against Model.block run op by op
(the reference), for every family, both kernel builds, with and without the team; layers it cannot fuse run
Model.block; a failing compiled call falls back with one notice."""
from __future__ import annotations

import numpy as np
import pytest

import mxq
from mxq.converter import convert
from mxq.runtime.backends import cpu_jit
from test_cpu_kernels import kernels_mode
from test_runtime_files import write_test_mxq

fixtures = pytest.importorskip("fixtures")  # tools/fixtures.py (conftest puts tools/ on sys.path)

FAMILIES = ("tiny-llama", "tiny-qwen2", "tiny-llama3", "tiny-qwen3", "tiny-gemma3", "tiny-phi3")
RTOL = 1e-4  # of the largest logit: the same compiled pieces, summed in the order fastmath picks in each function


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """name → a 4.5-bpw data-free conversion of that fixture (row blocks, every product affine), made once."""
    files = {}

    def get(name):
        if name not in files:
            path = tmp_path_factory.mktemp(name) / "q.mxq"
            convert(fixtures.ensure(name), path, bpw=4.5, objective="frobenius", quantizer="rtn", cache_dir=None)
            files[name] = path
        return files[name]

    return get


def decode_logits(lm, fuse: bool, steps=(1, 1, 3, 1, 1, 1, 1)) -> np.ndarray:
    """Logits of a 20-token prompt's continuation fed `steps` tokens at a time (a cache of 8 positions: it grows
    while decoding), with the fused layers on or off."""
    lm.backend.fuse_layers = fuse
    ids = np.random.default_rng(3).integers(0, lm.config.vocab_size, size=20 + sum(steps))
    cache = lm.model.new_cache(8)
    lm.model.forward(ids[:20], cache)
    out, t = [], 20
    for n in steps:
        out.append(lm.backend.to_host(lm.model.forward(ids[t:t + n], cache)))
        t += n
    return np.concatenate(out)  # (sum(steps), vocab)


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("kind", ["aot", "jit"])
@pytest.mark.parametrize("name", FAMILIES)
def test_fused_layers_match_model_block(quantized, monkeypatch, name, kind, threads):
    monkeypatch.setenv("MXQ_THREADS", threads)
    with kernels_mode(kind), mxq.load(quantized(name)) as lm:
        assert lm.backend.kernels is not None and lm.backend.kernels.kind == kind
        fused = lm.backend.fused_layers(lm.model, 1)
        assert fused is not None and all(fused.fused)  # every product affine: every layer in one call
        assert (lm.backend.team is None) == (threads == "1")
        got, ref = decode_logits(lm, True), decode_logits(lm, False)
    assert np.abs(got - ref).max() <= RTOL * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("kind", ["aot", "jit"])
def test_layers_with_vq_grid_products_are_fused(tmp_path_factory, monkeypatch, kind, threads):
    """tiny-llama converted with shared-codebook vq candidates (`all+vqs`: the 4-D codebooks on the 8-bit grid) has
    vq products in every layer; they are kernel stack entries too (cpu_stack.py), so every layer is still one call,
    and its logits are Model.block's."""
    from mxq.runtime.backends.cpu_vq import VqWeight

    path = tmp_path_factory.getbasetemp() / "tiny-llama-vqs.mxq"
    if not path.exists():
        convert(fixtures.ensure("tiny-llama"), path, bpw=4.6, objective="frobenius", quantizer="rtn", configs="all+vqs",
                cache_dir=None)
    monkeypatch.setenv("MXQ_THREADS", threads)
    with kernels_mode(kind), mxq.load(path) as lm:
        assert lm.backend.kernels is not None and lm.backend.kernels.kind == kind
        for layer in lm.model.layers:
            products = [b for m in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down)
                        for b in getattr(m, "blocks", [m])]
            assert any(isinstance(b, VqWeight) and b.codebook.grid_book is not None for b in products)
        fused = lm.backend.fused_layers(lm.model, 1)
        assert fused is not None and all(fused.fused)
        got, ref = decode_logits(lm, True), decode_logits(lm, False)
    assert np.abs(got - ref).max() <= RTOL * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.fixture(scope="module")
def trellis_mixed(trellis_llama, tmp_path_factory):
    """conftest's trellis_llama (every decoder linear trellis) with layer 0's linears and layer 1's q_proj and gate_proj
    rewritten as b4g32 (RTN of the trellis matrices' weights): layer 0 fuses, layer 1 multiplies q next to trellis k
    and v, gate next to trellis up, o and down alone — trellis matrices the kernel stacks do not take (cpu_stack)."""
    from conftest import file_plans_and_blobs
    from test_runtime_files import rtn_affine

    from mxq.format_spec import MxqFile, MxqWriter, StorageConfig, TensorPlan, dequantize

    path = tmp_path_factory.mktemp("trellis-mixed") / "m.mxq"
    affine = StorageConfig.affine(4, 32)

    def rewritten(name, entry):
        return entry.role == "linear" and (name.startswith("model.layers.0.") or
                                           name.endswith(("self_attn.q_proj.weight", "mlp.gate_proj.weight")))

    with MxqFile.open(trellis_llama) as f:
        plans = [TensorPlan(name, entry.shape, affine if rewritten(name, entry) else entry.config, entry.role)
                 for name, entry in f.tensors.items()]

        def blobs_of(name):
            entry, blobs = f.tensors[name], f.blobs(name)
            return rtn_affine(dequantize(blobs, entry.shape, entry.config), 4, 32) if rewritten(name, entry) else blobs

        plans, stored = file_plans_and_blobs(plans, blobs_of)
        tokenizer = {key: value for key, value in f.tokenizer.items() if key != "blob"}
        with MxqWriter(path, model=f.model, tokenizer=tokenizer, tokenizer_data=f.tokenizer_data(), tensors=plans,
                       provenance=f.provenance) as writer:
            for plan in plans:
                writer.write(plan.name, stored[plan.name])
    return path


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("kind", ["aot", "jit"])
def test_layers_with_trellis_products_run_model_block(trellis_mixed, monkeypatch, kind, threads):
    """A converted trellis model with layer 0 all affine and layer 1 half trellis (trellis_mixed): layer 0 is one
    fused call, layer 1 runs Model.block — its q/k/v and gate/up not stacked (a trellis member), each product through
    its own kernel (the trellis GEMV for decode) — and the logits are Model.block's throughout and the NumPy
    reference path's within the affine kernels' activation rounding (1e-3 of max|logits|, as test_rows_scheme's
    kernels; measured ≤ 1e-4)."""
    from types import SimpleNamespace

    from mxq.format_spec import MxqFile
    from mxq.runtime.backends.cpu_trellis import TrellisWeight
    from mxq.runtime.backends.numpy_backend import NumpyBackend
    from mxq.runtime.config import ModelConfig
    from mxq.runtime.model import Model

    kernel_tokens = []
    kernel = TrellisWeight.kernel_matmul
    monkeypatch.setattr(TrellisWeight, "kernel_matmul", lambda self, kernels, x, *rest: kernel_tokens.append(
        x.shape[0]) or kernel(self, kernels, x, *rest))
    monkeypatch.setenv("MXQ_THREADS", threads)
    with kernels_mode(kind), mxq.load(trellis_mixed) as lm:
        assert lm.backend.kernels is not None and lm.backend.kernels.kind == kind
        layers = lm.model.layers
        assert not any(isinstance(m, TrellisWeight) for m in (layers[0].q, layers[0].k, layers[0].v, layers[0].o,
                                                               layers[0].gate, layers[0].up, layers[0].down))
        assert [isinstance(m, TrellisWeight) for m in (layers[1].q, layers[1].k, layers[1].v, layers[1].o,
                                                       layers[1].gate, layers[1].up, layers[1].down)] == \
            [False, True, True, True, False, True, True]
        fused = lm.backend.fused_layers(lm.model, 1)
        assert fused.fused == [True, False] and fused.runs == [(0, 1, True), (1, 2, False)]
        assert lm.backend.stack((layers[1].q, layers[1].k, layers[1].v), 1) is None
        assert lm.backend.stack((layers[1].gate, layers[1].up), 1) is None
        got, ref = decode_logits(lm, True), decode_logits(lm, False)
        assert lm.backend.kernels is not None  # no kernel failed (a failure switches them off: the NumPy path)
    assert kernel_tokens and set(kernel_tokens) <= {1, 3}  # decode's steps (1 and 3 tokens) through the GEMV
    assert np.abs(got - ref).max() <= RTOL * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    with MxqFile.open(trellis_mixed) as f:
        config = ModelConfig.from_json(f.model)
        backend = NumpyBackend(threads=1, kernels=False)
        numpy_path = decode_logits(SimpleNamespace(backend=backend, config=config,
                                                   model=Model.from_file(f, config, backend)), False)
    assert np.abs(got - numpy_path).max() <= 1e-3 * np.abs(numpy_path).max()
    assert (got.argmax(-1) == numpy_path.argmax(-1)).all()


def test_two_caches_decoded_in_turn_keep_their_own_keys_and_values(quantized):
    """Each cache has its own kv table (and a cache that grows gets a new one): two sequences decoded step by step in
    turn give what each gives alone."""
    with mxq.load(quantized("tiny-qwen3")) as lm:
        model, rng = lm.model, np.random.default_rng(5)
        prompts = [rng.integers(0, lm.config.vocab_size, size=n).tolist() for n in (5, 11)]

        def decode(seqs, steps=6):
            caches = [model.new_cache(4) for _ in seqs]  # too small: both grow while decoding
            tokens = [[int(np.argmax(model.forward(p, c, last_only=True)[-1]))] for p, c in zip(seqs, caches)]
            for _ in range(steps):
                for seq, cache in zip(tokens, caches):
                    seq.append(int(np.argmax(model.forward([seq[-1]], cache)[-1])))
            return tokens

        together = decode(prompts)
        assert together == [decode([p])[0] for p in prompts]
        assert len(lm.backend.fused_layers(model, 1).kv_tables) == 0  # dropped with their caches


def test_layers_with_a_product_it_cannot_fuse_run_model_block(tmp_path):
    """tiny-llama with layer 1's o_proj in fp16: layer 0 fused, layer 1 by Model.block, the same logits."""
    def choose(name, shape, role):
        return "fp16" if name == "model.layers.1.self_attn.o_proj.weight" or role == "embedding" else (4, 32, 0)

    path = write_test_mxq(fixtures.ensure("tiny-llama"), tmp_path / "m.mxq", choose)
    with mxq.load(path) as lm:
        fused = lm.backend.fused_layers(lm.model, 1)
        assert fused.fused == [True, False] and fused.runs == [(0, 1, True), (1, 2, False)]
        got, ref = decode_logits(lm, True), decode_logits(lm, False)
    assert np.abs(got - ref).max() <= RTOL * np.abs(ref).max()


def test_a_failing_fused_call_falls_back_with_one_notice(quantized, capsys, monkeypatch):
    with mxq.load(quantized("tiny-qwen2")) as lm:
        ref = decode_logits(lm, False)
        kernels = lm.backend.team_kernels

        class Broken:
            def __getattr__(self, name):
                return getattr(kernels, name)

            def decode_layers(self, *args):
                raise RuntimeError("simulated kernel failure")

        lm.backend.team_kernels = Broken()
        monkeypatch.setattr(cpu_jit, "_state", dict(cpu_jit._state))  # the notice's once-only state, restored after
        got = decode_logits(lm, True)
        assert lm.backend.kernels is None and lm.backend.ops is None  # the NumPy path from now on
    assert capsys.readouterr().err.count("simulated kernel failure") == 1
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()  # the NumPy path: its own float32 rounding

"""Calibration: run the model over a text and collect, for every decoder linear,
  * the Fisher diagonal  F = Σ_chunks (∂L_c/∂W)²  (L_c: summed next-token cross-entropy of chunk c),
    so that Σ F·ΔW² estimates the loss increase a weight perturbation ΔW causes (×½), and
  * the input second moments  m[j] = Σ_tokens x_j²  per input column (the diagonal of XᵀX).

The forward pass is the runtime's own Model (runtime/model.py) executed by TorchBackend, streamed one
decoder layer at a time so that memory does not grow with depth. Chunks of CHUNK_TOKENS tokens are
independent sequences; with x_i (chunks, T, hidden) the activations entering layer i:

  forward   x_0 = embed(ids); x_{i+1} = block_i(x_i), one layer's weights loaded at a time. Every x_i is
            kept (in RAM up to a budget, beyond it in a memory-mapped file); Σx² of each linear's input
            is recorded on the way.
  head      h = final_norm(x_L); loss and ∂L/∂h = (softmax − onehot)·W over vocabulary slices of the
            lm_head in one pass (online softmax), so a 150k vocabulary costs one slice.
  backward  for i = L-1 … 0: load layer i with trainable linears; per chunk c recompute block_i from
            x_i[c], backpropagate the stored ∂L_c/∂x_{i+1}[c], square-accumulate the weight gradients
            (Fisher) and keep ∂L_c/∂x_i[c] for the layer below; write layer i's statistics; free it.

Within a layer the chunks run in batches of BATCH_CHUNKS (forward_batch, backward_batch): each batch's
statistics are summed over its chunks, then the batches' sums are added in chunk order. That is the
same arithmetic whether the batches run here one after another (LocalBatches) or as tasks on a cluster
(converter/cluster.py), so the statistics are bit-identical either way.

Resident memory: one layer's weights, gradients and Fisher (float32), two activation/gradient
boundaries, one vocabulary slice, and whatever boundaries fit the RAM budget.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..runtime import model as runtime_model
from .calibration_store import (FISHER_DTYPE, ActivationStore, CheckpointRows, LazyStats, MatrixFisher, StatsWriter,
                                open_stats)
from .errors import ConversionError
from .torch_backend import TorchBackend

DEFAULT_CALIB_TOKENS = 8192
CHUNK_TOKENS = 256
BATCH_CHUNKS = 4  # chunks per batch (one cluster task); part of the statistics' definition (summation order)
ACTIVATION_RAM_BYTES = 256 << 20  # layer-boundary activations kept in RAM; the rest go to a memory-mapped file
HEAD_SLICE_BYTES = 64 << 20  # float32 logits of one vocabulary slice over all calibration tokens


@dataclass
class Calibration:
    fisher: Mapping  # linear name -> float32 tensor shaped like W, read from disk on access
    input_sq: Mapping  # linear name -> float32 tensor (in_features,), read from disk on access
    tokens: int
    text_sha256: str
    loss: float  # mean next-token loss of the fp32 model on the calibration text
    directory: Path  # the statistics directory (calibration_store.py)
    matrices: Mapping = None  # embedding / lm_head name -> float32 Fisher (vocab, hidden), read on access
    keepalive: object = None  # the temporary directory holding it when there is no cache


def default_text() -> str:
    return resources.files("mxq.converter").joinpath("data/calibration-botchan.txt").read_text(encoding="utf-8")


def encode(checkpoint, text: str) -> list[int]:
    """Token ids of `text` with the checkpoint's own tokenizer (BOS prepended where it is default)."""
    bos = sequence_start(checkpoint)
    return ([bos] if bos is not None else []) + text_ids(checkpoint, text)


def text_ids(checkpoint, text: str) -> list[int]:
    """Token ids of `text` with the checkpoint's own tokenizer, no special tokens."""
    kind, data = checkpoint.tokenizer["kind"], checkpoint.tokenizer_data
    if kind == "hf-tokenizers":  # a hostile tokenizer.json may fail on this text (or panic): one line
        from ..runtime.errors import ModelError
        from ..runtime.tokenizer import load_hf_tokenizer, tokenizer_errors

        file = Path(checkpoint.path) / "tokenizer.json"
        try:
            tokenizer = load_hf_tokenizer(data, str(file))
            with tokenizer_errors(f"{file}: fails to encode the calibration text"):
                return tokenizer.encode(text, add_special_tokens=False).ids
        except ModelError as error:
            raise ConversionError(str(error)) from None
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(model_proto=data).encode(text)


def sequence_start(checkpoint) -> int | None:
    """The BOS id every sequence starts with, when the tokenizer adds one (else None)."""
    bos = checkpoint.tokenizer.get("bos_token_id")
    return bos if checkpoint.tokenizer.get("add_bos_token") and bos is not None else None


def text_chunks(checkpoint, text: str) -> torch.Tensor:
    """The whole text as independent sequences of CHUNK_TOKENS tokens: (chunks, CHUNK_TOKENS) int64, in text
    order. Each chunk starts the way the model's sequences start: with BOS when the tokenizer adds one (then
    CHUNK_TOKENS − 1 text tokens), else with CHUNK_TOKENS text tokens. A model trained with BOS at position
    0 keeps an attention sink there; a chunk cut from the middle of a text without it puts the model in a
    state it never saw (Gemma 3 270M on the Botchan excerpt: loss 5.06 nats/token with BOS only before the
    first chunk, 3.51 with BOS in every chunk), and the Fisher measured there misjudges which weights
    matter."""
    bos, ids = sequence_start(checkpoint), text_ids(checkpoint, text)
    body = CHUNK_TOKENS - (bos is not None)  # text tokens per chunk
    n = len(ids) // body
    rows = torch.tensor(ids[:n * body], dtype=torch.int64).view(n, body)
    return rows if bos is None else torch.cat([torch.full((n, 1), bos, dtype=torch.int64), rows], dim=1)


def calibration_chunks(checkpoint, text: str, tokens: int) -> torch.Tensor:
    """The text's first ⌊tokens / CHUNK_TOKENS⌋ chunks (all, when it has fewer): (chunks, CHUNK_TOKENS);
    text_chunks says what a chunk holds. The text must give at least 2 chunks."""
    chunks = text_chunks(checkpoint, text)
    if len(chunks) < 2:
        raise ConversionError(f"calibration text gives {len(chunks)} chunk(s) of {CHUNK_TOKENS} tokens; "
                              f"at least 2 are needed")
    return chunks[:tokens // CHUNK_TOKENS]


class LayerStream:
    """The runtime Model on TorchBackend whose decoder layers are loaded from the checkpoint one at a
    time. Between loads a layer holds shape-only (meta) matrices; the embedding reads only the rows
    it is asked for. `on_linear(name, x)` sees the input of every linear while `recording`."""

    def __init__(self, checkpoint, on_linear=None):  # on_linear may also be set later (forward_batch does)
        self.checkpoint, self.on_linear, self.recording = checkpoint, on_linear, False
        self.config = checkpoint.config
        self.backend = TorchBackend(on_linear=self._observe)
        self.names: dict[int, str] = {}  # id(weight handle) -> checkpoint name, for the loaded layer
        self.model = runtime_model.Model(self.config, self.backend, self._skeleton_tensor)
        self.placeholders = list(self.model.layers)
        c = self.config
        self.cache = self.backend.new_cache(1, c.num_key_value_heads, c.head_dim, CHUNK_TOKENS).layers[0]

    def _tensor(self, name, shape, required, make):
        checked = runtime_model.checked_tensors(self.checkpoint.tensors, self.checkpoint.path, ConversionError,
                                                lambda _, info: make(info))
        return checked(name, shape, required)

    def _skeleton_tensor(self, name, shape, required=True):
        def make(info):
            if info.role == "embedding":
                return CheckpointRows(self.checkpoint, name)  # (vocab, hidden) rows read on demand
            if len(info.shape) == 1:
                return self.checkpoint.load(name)  # norms and biases: small
            return torch.empty(info.shape, device="meta")
        return self._tensor(name, shape, required, make)

    def load_layer(self, i: int, trainable: bool) -> dict:
        """Load decoder layer i; returns its linears' weights {name: float32 (out, in) leaf tensor},
        requiring grad when `trainable`."""
        linears = {}

        def make(info):
            weight = self.checkpoint.load(info.name)
            if info.role == "linear":
                linears[info.name] = weight.requires_grad_(trainable)
                self.names[id(weight)] = info.name
            return weight

        self.model.layers[i] = runtime_model.model_layer_weights(
            self.config, i, lambda name, shape, required=True: self._tensor(name, shape, required, make))
        return linears

    def free_layer(self, i: int) -> None:
        self.model.layers[i] = self.placeholders[i]
        self.names.clear()

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Layer i over one whole chunk x (T, hidden) → (T, hidden)."""
        positions = np.arange(x.shape[0], dtype=np.int64)
        return self.model.block(i, x, positions, self.cache, 0)

    def _observe(self, x, weight):
        if self.recording and self.on_linear is not None:
            self.on_linear(self.names[id(weight)], x)


def stored_once(checkpoint) -> tuple[str, str]:
    """Names of the embedding matrix and of the matrix the head multiplies by (the embedding when tied)."""
    roles = {info.role: name for name, info in checkpoint.tensors.items()}
    return roles["embedding"], roles.get("lm_head", roles["embedding"])


def _head_gradient(stream: LayerStream, x_last: torch.Tensor, chunks: torch.Tensor, fisher_dtype=FISHER_DTYPE):
    """Summed next-token CE of every chunk (C,) float64 and ∂L_c/∂x_L (C, T, hidden), reading the
    lm_head in vocabulary slices, in one pass (online softmax, as flash attention does): with the
    running peak m and Σexp(z − m) per token, acc = Σ_slices exp(z − m)·W_slice is rescaled whenever m
    grows; at the end ∂L/∂h = acc / Σexp(z − m) − W[target] and L = m + log Σexp(z − m) − z[target].
    This is Model.head's math (logits = h·W_lm_headᵀ); a family with a non-linear head (logit
    soft-capping) would need its Jacobian here."""
    C, T, H = x_last.shape
    model = stream.model
    with torch.no_grad():
        h = torch.stack([model.final_norm(x_last[c]) for c in range(C)]).view(C * T, H)  # (N, H)
    targets = torch.cat([chunks[:, 1:], chunks[:, :1]], dim=1).reshape(-1)  # (N,); each chunk's last is unused
    has_target = (torch.arange(C * T) % T) != T - 1
    head = CheckpointRows(stream.checkpoint, stored_once(stream.checkpoint)[1])
    vocab = head.shape[0]
    step = max(1, HEAD_SLICE_BYTES // (4 * C * T))
    peak = torch.full((C * T,), -torch.inf)
    total = torch.zeros(C * T)
    acc = torch.zeros(C * T, H)
    target_logit = torch.zeros(C * T)
    with torch.no_grad():
        for v0 in range(0, vocab, step):
            weight = head.slice(v0, min(vocab, v0 + step))  # (V_s, H)
            z = stream.backend.linear(h, weight)  # (N, V_s) logits of this slice
            local = targets - v0
            hit = (local >= 0) & (local < weight.shape[0])
            target_logit[hit] = z[hit, local[hit]]
            new_peak = torch.maximum(peak, z.max(dim=1).values)
            rescale = torch.exp(peak - new_peak)  # (N,)
            p = z.sub_(new_peak[:, None]).exp_()  # (N, V_s) exp(z − m), in place
            total = total * rescale + p.sum(dim=1)
            acc = acc * rescale[:, None] + p @ weight
            peak = new_peak
        nll = torch.where(has_target, peak + torch.log(total) - target_logit, 0.0)  # (N,)
        dh = acc / total[:, None] - head[targets]  # (N, H)
        dh[~has_target] = 0.0
        fisher = head_fisher(stream, head, h.view(C, T, H), targets.view(C, T), peak, total, step, fisher_dtype)
    grad = torch.empty_like(x_last)
    for c in range(C):
        x = x_last[c].clone().requires_grad_(True)
        (grad[c],) = torch.autograd.grad(model.final_norm(x), x, dh.view(C, T, H)[c])
    return nll.view(C, T).sum(dim=1, dtype=torch.float64), grad, fisher


# -- Fisher of the stored-once matrices: the lm_head and the embedding ---------------------------------

def head_fisher(stream: LayerStream, head: CheckpointRows, h: torch.Tensor, targets: torch.Tensor,
                peak: torch.Tensor, total: torch.Tensor, step: int, dtype=FISHER_DTYPE) -> torch.Tensor:
    """Fisher diagonal of the lm_head, (vocab, hidden) `dtype` (the statistics' dtype): Σ_chunks (∂L_c/∂W)²
    with ∂L_c/∂W = (softmax − onehot)ᵀ·h_c, the same convention as the linears'. A second pass over
    the vocabulary slices, now that the softmax normalizer (peak m, Σexp(z − m)) of every token is
    known. h: (C, T, hidden) final-normed states; targets (C, T), each chunk's last position unused."""
    C, T, H = h.shape
    vocab = head.shape[0]
    flat = h.reshape(C * T, H)
    fisher = torch.empty(head.shape, dtype=dtype)
    log_total = (peak + torch.log(total))[:, None]  # (N, 1): log Σ_v exp(z_v)
    used = ((torch.arange(T) != T - 1).repeat(C)).float()[:, None]  # (N, 1)
    for v0 in range(0, vocab, step):
        weight = head.slice(v0, min(vocab, v0 + step))  # (V_s, H)
        p = stream.backend.linear(flat, weight).sub_(log_total).exp_()  # (N, V_s) softmax of the slice
        local = targets.reshape(-1) - v0
        hit = torch.nonzero((local >= 0) & (local < weight.shape[0])).squeeze(1)
        p[hit, local[hit]] -= 1.0
        p.mul_(used)
        accumulator = torch.zeros(weight.shape)
        for c in range(C):
            g = p[c * T:(c + 1) * T].T @ h[c]  # (V_s, H) ∂L_c/∂W_slice
            accumulator.addcmul_(g, g)
        fisher[v0:v0 + weight.shape[0]] = accumulator.to(dtype)
    return fisher


def embedding_fisher(stream: LayerStream, chunks: torch.Tensor, grad0: torch.Tensor):
    """Fisher diagonal of the embedding's rows, from ∂L_c/∂x_0 (C, T, hidden), the gradient at the
    embedding's output: ∂L_c/∂E[r] = scale · Σ_{t in c: id_t = r} ∂L_c/∂x_0[t], squared and summed over
    chunks. Only rows the text uses have one: returns (rows (U,) int64, fisher (U, hidden) float32,
    occurrences (U,) int64) of the U distinct token ids seen."""
    scale = stream.config.embed_scale or 1.0
    rows, inverse, counts = torch.unique(chunks.reshape(-1), return_inverse=True, return_counts=True)
    inverse = inverse.view(chunks.shape)
    fisher = torch.zeros(len(rows), grad0.shape[-1])
    for c in range(chunks.shape[0]):
        g = torch.zeros_like(fisher).index_add_(0, inverse[c], grad0[c] * scale)  # (U, H)
        fisher.addcmul_(g, g)
    return rows, fisher, counts


def chunk_batches(n_chunks: int) -> list[slice]:
    """The chunk batches of a layer, in chunk order."""
    return [slice(b, min(b + BATCH_CHUNKS, n_chunks)) for b in range(0, n_chunks, BATCH_CHUNKS)]


def add_in_order(total: dict, part: dict) -> None:
    """total[name] += part[name] (out of place: `part` may be read-only), for a fixed summation order."""
    for name, value in part.items():
        total[name] = total[name] + value if name in total else value


def forward_batch(stream: LayerStream, i: int, x: torch.Tensor):
    """Loaded layer i over chunks x (B, T, hidden) → (outputs (B, T, hidden), {linear name: Σ x_j² over
    the batch's tokens (in,)})."""
    moments: dict[str, torch.Tensor] = {}

    def record(name, inputs):
        add_in_order(moments, {name: inputs.detach().pow(2).sum(dim=0)})

    stream.on_linear, stream.recording = record, True
    try:
        with torch.no_grad():
            outputs = torch.stack([stream.block(i, x[c]) for c in range(x.shape[0])])
    finally:
        stream.on_linear, stream.recording = None, False
    return outputs, moments


def backward_batch(stream: LayerStream, i: int, linears: dict, x: torch.Tensor, grad: torch.Tensor):
    """Loaded trainable layer i (`linears`: name → weight): recompute it over chunks x (B, T, hidden) and
    backpropagate ∂L_c/∂outputs grad (B, T, hidden) → ({name: Σ_c (∂L_c/∂W)² (out, in)}, ∂L_c/∂x (B, T,
    hidden); at layer 0 the gradient at the embedding's output, for its Fisher)."""
    fisher = {name: torch.zeros_like(weight) for name, weight in linears.items()}
    grad_in = torch.empty_like(grad)
    for c in range(x.shape[0]):
        chunk = x[c].clone().requires_grad_(True)
        wrt = list(linears.values()) + [chunk]
        grads = torch.autograd.grad(stream.block(i, chunk), wrt, grad[c])
        for accumulator, g in zip(fisher.values(), grads):
            accumulator.addcmul_(g, g)
        grad_in[c] = grads[-1]
        del grads, chunk  # before the next chunk's gradients exist: one layer's gradients resident, not two
    return fisher, grad_in


class LocalBatches:
    """Runs a layer's chunk batches in this process, one after another, yielding their results in
    order (converter/cluster.py's runner has the same two methods and runs them as cluster tasks)."""

    def __init__(self, stream: LayerStream):
        self.stream = stream

    def forward(self, i: int, batches):
        """batches: x (B, T, hidden) → yields forward_batch's (outputs, moments) per batch."""
        self.stream.load_layer(i, trainable=False)
        try:
            for x in batches:
                yield forward_batch(self.stream, i, x)
        finally:
            self.stream.free_layer(i)

    def backward(self, i: int, batches):
        """batches: (x, grad) → yields backward_batch's (fisher, grad_in) per batch."""
        linears = self.stream.load_layer(i, trainable=True)
        try:
            for x, grad in batches:
                yield backward_batch(self.stream, i, linears, x, grad)
        finally:
            self.stream.free_layer(i)


def calibrate(checkpoint, directory, text: str | None = None, tokens: int = DEFAULT_CALIB_TOKENS, progress=None,
              activation_ram_bytes: int = ACTIVATION_RAM_BYTES, fisher_dtype=FISHER_DTYPE,
              runner=None) -> Calibration:
    """Fisher diagonals and input second moments of every decoder linear over `tokens` tokens, written
    to the statistics directory `directory` (replaced if present; Fisher stored as `fisher_dtype`) and
    returned as lazy mappings. `runner` runs the layers' chunk batches (default: LocalBatches, here)."""
    text = default_text() if text is None else text
    chunks = calibration_chunks(checkpoint, text, tokens)  # (C, T)
    directory = Path(directory)
    input_sq: dict[str, torch.Tensor] = {}

    stream = LayerStream(checkpoint)
    runner = runner or LocalBatches(stream)
    batches = chunk_batches(len(chunks))
    n_layers, (C, T) = stream.config.num_hidden_layers, chunks.shape
    acts = ActivationStore((C, T, stream.config.hidden_size), activation_ram_bytes,
                           directory.with_name(directory.name + ".activations"))
    writer = StatsWriter(directory, fisher_dtype)
    bar = progress(total=2 * n_layers + 1, desc="calibrate", unit="step") if progress else None
    step = bar.update if bar else (lambda n=1: None)
    try:
        with torch.no_grad():  # forward, layer by layer
            x = torch.stack([stream.model.embed(chunk.numpy()) for chunk in chunks])  # (C, T, H)
            acts.put(0, x)
            for i in range(n_layers):
                outputs = []
                for y, moments in runner.forward(i, (x[b] for b in batches)):
                    outputs.append(y)
                    add_in_order(input_sq, moments)
                x = torch.cat(outputs)
                acts.put(i + 1, x)
                step()
        del x
        # grad: ∂L_c/∂x_L; lm_fisher: the head's (vocab, hidden) Fisher
        losses, grad, lm_fisher = _head_gradient(stream, acts.get(n_layers), chunks, fisher_dtype)
        acts.drop(n_layers)
        step()
        for i in reversed(range(n_layers)):  # backward, layer by layer
            x_in = acts.get(i)
            fisher, grads_in = {}, []
            for partial, grad_in in runner.backward(i, ((x_in[b], grad[b]) for b in batches)):
                add_in_order(fisher, partial)
                grads_in.append(grad_in)
            missing = [name for name in fisher if name not in input_sq]
            if missing:
                raise ConversionError(f"calibration: the model never applied '{missing[0]}' as a linear")
            writer.write_layer(i, fisher, {name: input_sq.pop(name) for name in fisher})
            del x_in, fisher
            acts.drop(i)
            grad = torch.cat(grads_in)  # at i = 0: the gradient at the embedding's output
            step()
        embedding, lm_head = stored_once(checkpoint)
        writer.write_matrices(embedding, lm_head, lm_fisher, *embedding_fisher(stream, chunks, grad))
        del lm_fisher, grad
        n_tokens = chunks.numel()
        loss = float(losses.sum()) / (n_tokens - C)
        meta = writer.commit(loss, n_tokens)
    except BaseException:
        writer.abort()
        raise
    finally:
        acts.close()
        shutil.rmtree(acts.spill_dir, ignore_errors=True)
        if bar:
            bar.close()
    return _calibration(checkpoint, directory, meta, text)


def _calibration(checkpoint, directory: Path, meta: dict, text: str) -> Calibration:
    """The Calibration of a statistics directory whose meta.json says `meta`."""
    shapes = {t.name: t.shape for t in checkpoint.linears}
    return Calibration(LazyStats(directory, meta, shapes, "fisher"), LazyStats(directory, meta, shapes, "input_sq"),
                       int(meta["tokens"]), hashlib.sha256(text.encode()).hexdigest(), float(meta["loss"]), directory,
                       MatrixFisher(directory, meta, _matrix_shapes(checkpoint)))


def _matrix_shapes(checkpoint) -> dict:
    return {name: checkpoint.tensors[name].shape for name in stored_once(checkpoint)}


def expanded_input_sq(input_sq: LazyStats, name: str) -> torch.Tensor:
    """The `output` objective's importance of linear `name`: its input second moments (in,) broadcast to
    its weight's shape (out, in)."""
    return input_sq[name].expand(input_sq.shapes[name])


def load_or_calibrate(checkpoint, checkpoint_hash: str, text: str | None, tokens: int, cache_dir,
                      progress=None, runner=None) -> Calibration:
    """calibrate(), cached under `cache_dir` keyed by checkpoint, tokenizer, text and token count (cache_dir None:
    a temporary directory that lives as long as the returned Calibration). A damaged cache entry is
    rebuilt with a one-line notice."""
    text = default_text() if text is None else text
    if cache_dir is None:
        keepalive = tempfile.TemporaryDirectory(prefix="mxq-calibration-")
        result = calibrate(checkpoint, Path(keepalive.name) / "stats", text, tokens, progress, runner=runner)
        result.keepalive = keepalive
        return result
    tokenizer = hashlib.sha256(checkpoint.tokenizer_data + json.dumps(checkpoint.tokenizer, sort_keys=True).encode())
    chunking = "/bos-every-chunk" if sequence_start(checkpoint) is not None else ""  # BOS models' chunks changed
    key = hashlib.sha256(f"{checkpoint_hash}/{tokenizer.hexdigest()}/{hashlib.sha256(text.encode()).hexdigest()}/"
                         f"{tokens}/{CHUNK_TOKENS}/{BATCH_CHUNKS}/v4{chunking}".encode()).hexdigest()[:32]
    directory = Path(cache_dir) / key
    meta, problem = open_stats(directory, {t.name: t.shape for t in checkpoint.linears}, _matrix_shapes(checkpoint))
    if meta is not None:
        return _calibration(checkpoint, directory, meta, text)
    if problem:
        print(f"mxq: calibration cache {directory} is damaged ({problem}); rebuilding it", file=sys.stderr)
    return calibrate(checkpoint, directory, text, tokens, progress, runner=runner)

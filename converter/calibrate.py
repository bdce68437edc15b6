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

Resident memory: one layer's weights, gradients and Fisher (float32), two activation/gradient
boundaries, one vocabulary slice, and whatever boundaries fit the RAM budget.
"""
from __future__ import annotations

import hashlib
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
from .calibration_store import FISHER_DTYPE, ActivationStore, CheckpointRows, LazyStats, StatsWriter, open_stats
from .errors import ConversionError
from .torch_backend import TorchBackend

DEFAULT_CALIB_TOKENS = 8192
CHUNK_TOKENS = 256
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
    keepalive: object = None  # the temporary directory holding it when there is no cache


def default_text() -> str:
    return resources.files("mxq.converter").joinpath("data/calibration-botchan.txt").read_text(encoding="utf-8")


def encode(checkpoint, text: str) -> list[int]:
    """Token ids of `text` with the checkpoint's own tokenizer (BOS prepended where it is default)."""
    kind, data = checkpoint.tokenizer["kind"], checkpoint.tokenizer_data
    if kind == "hf-tokenizers":
        from tokenizers import Tokenizer
        ids = Tokenizer.from_str(data.decode("utf-8")).encode(text, add_special_tokens=False).ids
    else:
        import sentencepiece
        ids = sentencepiece.SentencePieceProcessor(model_proto=data).encode(text)
    bos = checkpoint.tokenizer.get("bos_token_id")
    return ([bos] if checkpoint.tokenizer.get("add_bos_token") and bos is not None else []) + list(ids)


def calibration_chunks(checkpoint, text: str, tokens: int) -> torch.Tensor:
    """The first `tokens` tokens of the text (or all, when fewer) in whole chunks: (chunks, CHUNK_TOKENS)."""
    ids = encode(checkpoint, text)
    if len(ids) < 2 * CHUNK_TOKENS:
        raise ConversionError(f"calibration text has {len(ids)} tokens; at least {2 * CHUNK_TOKENS} are needed")
    n = min(tokens, len(ids))
    return torch.tensor(ids[: n - n % CHUNK_TOKENS]).view(-1, CHUNK_TOKENS)


class LayerStream:
    """The runtime Model on TorchBackend whose decoder layers are loaded from the checkpoint one at a
    time. Between loads a layer holds shape-only (meta) matrices; the embedding reads only the rows
    it is asked for. `on_linear(name, x)` sees the input of every linear while `recording`."""

    def __init__(self, checkpoint, on_linear=None):
        self.checkpoint, self.on_linear, self.recording = checkpoint, on_linear, False
        self.config = checkpoint.config
        self.backend = TorchBackend(on_linear=self._observe)
        self.names: dict[int, str] = {}  # id(weight handle) -> checkpoint name, for the loaded layer
        self.model = runtime_model.Model(self.config, self.backend, self._skeleton_tensor)
        self.placeholders = list(self.model.layers)
        c = self.config
        self.cache = self.backend.new_cache(1, c.num_key_value_heads, c.head_dim, CHUNK_TOKENS).layers[0]

    def _tensor(self, name, shape, required, make):
        info = self.checkpoint.tensors.get(name)
        if info is None:
            if required:
                raise ConversionError(f"{self.checkpoint.path}: tensor '{name}' is missing")
            return None
        if tuple(info.shape) != tuple(shape):
            raise ConversionError(f"{self.checkpoint.path}: tensor '{name}' has shape {list(info.shape)}, "
                                  f"the model config implies {list(shape)}")
        return make(info)

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


def _head_gradient(stream: LayerStream, x_last: torch.Tensor, chunks: torch.Tensor):
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
    roles = {info.role: name for name, info in stream.checkpoint.tensors.items()}
    head = CheckpointRows(stream.checkpoint, roles.get("lm_head", roles["embedding"]))  # tied: the embedding
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
    grad = torch.empty_like(x_last)
    for c in range(C):
        x = x_last[c].clone().requires_grad_(True)
        (grad[c],) = torch.autograd.grad(model.final_norm(x), x, dh.view(C, T, H)[c])
    return nll.view(C, T).sum(dim=1, dtype=torch.float64), grad


def calibrate(checkpoint, directory, text: str | None = None, tokens: int = DEFAULT_CALIB_TOKENS, progress=None,
              activation_ram_bytes: int = ACTIVATION_RAM_BYTES, fisher_dtype=FISHER_DTYPE) -> Calibration:
    """Fisher diagonals and input second moments of every decoder linear over `tokens` tokens, written
    to the statistics directory `directory` (replaced if present; Fisher stored as `fisher_dtype`) and
    returned as lazy mappings."""
    text = default_text() if text is None else text
    chunks = calibration_chunks(checkpoint, text, tokens)  # (C, T)
    directory = Path(directory)
    input_sq: dict[str, torch.Tensor] = {}

    def record(name, x):
        moments = x.detach().pow(2).sum(dim=0)
        input_sq[name] = input_sq[name] + moments if name in input_sq else moments

    stream = LayerStream(checkpoint, record)
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
                stream.load_layer(i, trainable=False)
                stream.recording = True
                x = torch.stack([stream.block(i, x[c]) for c in range(C)])
                stream.recording = False
                acts.put(i + 1, x)
                stream.free_layer(i)
                step()
        del x
        losses, grad = _head_gradient(stream, acts.get(n_layers), chunks)  # grad: ∂L_c/∂x_L
        acts.drop(n_layers)
        step()
        for i in reversed(range(n_layers)):  # backward, layer by layer
            linears = stream.load_layer(i, trainable=True)
            fisher = {name: torch.zeros_like(weight) for name, weight in linears.items()}
            x_in = acts.get(i)
            grad_in = torch.empty_like(grad) if i else None
            for c in range(C):
                x = x_in[c].clone().requires_grad_(i > 0)
                wrt = list(linears.values()) + ([x] if i else [])
                grads = torch.autograd.grad(stream.block(i, x), wrt, grad[c])
                for accumulator, g in zip(fisher.values(), grads):
                    accumulator.addcmul_(g, g)
                if i:
                    grad_in[c] = grads[-1]
                del grads, x  # before the next chunk's gradients exist: one layer's gradients resident, not two
            missing = [name for name in linears if name not in input_sq]
            if missing:
                raise ConversionError(f"calibration: the model never applied '{missing[0]}' as a linear")
            writer.write_layer(i, fisher, {name: input_sq.pop(name) for name in linears})
            stream.free_layer(i)
            del x_in, fisher, linears
            acts.drop(i)
            grad = grad_in
            step()
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
                       int(meta["tokens"]), hashlib.sha256(text.encode()).hexdigest(), float(meta["loss"]), directory)


def load_or_calibrate(checkpoint, checkpoint_hash: str, text: str | None, tokens: int, cache_dir,
                      progress=None) -> Calibration:
    """calibrate(), cached under `cache_dir` keyed by checkpoint, text and token count (cache_dir None:
    a temporary directory that lives as long as the returned Calibration). A damaged cache entry is
    rebuilt with a one-line notice."""
    text = default_text() if text is None else text
    if cache_dir is None:
        keepalive = tempfile.TemporaryDirectory(prefix="mxq-calibration-")
        result = calibrate(checkpoint, Path(keepalive.name) / "stats", text, tokens, progress)
        result.keepalive = keepalive
        return result
    key = hashlib.sha256(f"{checkpoint_hash}/{hashlib.sha256(text.encode()).hexdigest()}/{tokens}/"
                         f"{CHUNK_TOKENS}/v2".encode()).hexdigest()[:32]
    directory = Path(cache_dir) / key
    meta, problem = open_stats(directory, {t.name: t.shape for t in checkpoint.linears})
    if meta is not None:
        return _calibration(checkpoint, directory, meta, text)
    if problem:
        print(f"mxq: calibration cache {directory} is damaged ({problem}); rebuilding it", file=sys.stderr)
    return calibrate(checkpoint, directory, text, tokens, progress)

"""Offline rotation of the residual stream (QuaRot / SliceGPT's "computational invariance").

With Q (hidden, hidden) orthogonal, every residual-stream vector x (a row) becomes x' = x·Q. The model
computes the same function when, per layer,

    norm weights g folded away      RMSNorm(x')  = RMSNorm(x)·Q  when its weight is 1 (rms(xQ) = rms(x))
    readers  (q, k, v; gate, up)    W' = W·diag(g)·Q           (out, hidden): they read norm(x)·diag(g)
    writers  (o, down)              W' = Qᵀ·W                  (hidden, in):  their output joins x
                                    b' = b·Q                   (o's bias)
and outside the layers
    embedding                       E' = E·Q                   (the scale √hidden of Gemma commutes)
    head                            H' = H·diag(g_final)·Q     (H = lm_head, or E when tied)

so the decoder linears see rotated weights whose outliers are spread over all columns (easier to
quantize) while the logits stay the same up to float rounding.

Tied embeddings: after the final norm is folded in, H' = E·diag(g)·Q ≠ E' = E·Q, so the rotated model
is untied: it stores the lm_head as a separate (vocab, hidden) tensor, fp16 (2·vocab·hidden bytes;
`--quantize-embeddings` quantizes it like the embedding). Keeping the tie instead would need
diag(g) on the rotated basis, Qᵀ·diag(g)·Q, a dense matrix no norm weight can hold. --bpw counts
decoder linears only, so it is unaffected; --size plans the whole file, lm_head included.

Families whose blocks norm a branch's output before it joins the residual stream (Gemma 3's
post-attention and post-feedforward norms) do not commute with the rotation: refused.

The rotated checkpoint is written as float32 safetensors (one shard per layer, 4 bytes per weight of
temporary disk) into a temporary directory next to no other data, and read back with the ordinary
checkpoint reader, so calibration, measurement and writing all run on the rotated model unchanged.
Random Hadamard (diag(±1)·H/√n, Sylvester H) when hidden is a power of two, else a random orthogonal
matrix (QR of a Gaussian); both from `seed`, recorded in the file's provenance.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import Checkpoint, DerivedCheckpoint, read_checkpoint
from .errors import ConversionError

ROTATION_VERSION = 1  # bump when the rotated tensors change for the same seed (cache keys derive from it)
READERS = {"attn_norm": ("q", "k", "v"), "mlp_norm": ("gate", "up")}  # norm -> the linears that read it
WRITERS = ("o", "down")  # linears whose output joins the residual stream
INSIDE = ("q_bias", "k_bias", "v_bias", "q_norm", "k_norm")  # act inside the heads: unchanged


def rotation_matrix(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """A random orthogonal (n, n) float64 matrix and its kind ("hadamard" or "orthogonal")."""
    generator = torch.Generator().manual_seed(seed)
    if n & (n - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:  # Sylvester: [[H, H], [H, -H]]
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
        return signs[:, None] * h / n ** 0.5, "hadamard"
    gaussian = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))[None, :], "orthogonal"


def check_rotatable(config) -> None:
    """A clear error for a family whose block does not commute with a residual-stream rotation."""
    known = set(READERS) | {key for keys in READERS.values() for key in keys} | set(WRITERS) | set(INSIDE) | {"o_bias"}
    for spec in config.family.layer_tensors:
        if spec.key not in known:
            raise ConversionError(f"--rotate: {config.architecture} models have '{spec.name.format(i='N')}' "
                                  f"({spec.key}), which does not commute with a rotation of the residual stream")


class RotatedCheckpoint:
    """The rotated copy of `checkpoint`, in a temporary directory that lives as long as this object.
    .checkpoint: the rotated Checkpoint; .provenance: what the file records."""

    def __init__(self, checkpoint: Checkpoint, seed: int):
        config = checkpoint.config
        check_rotatable(config)
        self._directory = tempfile.TemporaryDirectory(prefix="mxq-rotated-")
        root = Path(self._directory.name)
        q, kind = rotation_matrix(config.hidden_size, seed)
        source_hash = checkpoint.content_hash()
        _write_rotated(checkpoint, q, root)
        rotated = read_checkpoint(root)
        key = f"{source_hash}/rotate/{kind}/{seed}/v{ROTATION_VERSION}"
        self.checkpoint = DerivedCheckpoint.of(rotated, key)  # hash: the source's, the rotation's kind, seed, version
        self.checkpoint.path = checkpoint.path  # messages name the source
        self.provenance = {"kind": kind, "seed": seed, "version": ROTATION_VERSION, "source_sha256": source_hash,
                           "untied": bool(config.tie_word_embeddings)}
        self.source_sha256 = source_hash


def _write_rotated(checkpoint: Checkpoint, q: torch.Tensor, root: Path) -> None:
    """Write the rotated model as an HF checkpoint folder `root` (config untied, tokenizer files copied)."""
    config, family = checkpoint.config, checkpoint.config.family
    offset = float(family.norm_offset)
    unit_norm = torch.full((config.hidden_size,), 1.0 - offset)  # offset + w = 1

    def load64(name):
        return checkpoint.load(name).to(torch.float64)

    def gain(name):  # the multiplier a norm applies: offset + w
        return load64(name) + offset

    weight_map = {}

    def save(tensors: dict, shard: str):
        save_file({name: t.to(torch.float32).contiguous() for name, t in tensors.items()}, str(root / shard))
        weight_map.update({name: shard for name in tensors})

    specs = {s.key: s for s in family.tensors}
    embed, norm, head = (specs[k].name for k in ("embed_tokens", "norm", "lm_head"))
    head_source = head if head in checkpoint.tensors else embed
    q32 = q.to(torch.float32)
    save({embed: _rows_times(checkpoint.load(embed), q32), norm: unit_norm.clone(),
          head: _rows_times(checkpoint.load(head_source) * gain(norm).to(torch.float32)[None, :], q32)},
         "rotated-outer.safetensors")
    for i in range(config.num_hidden_layers):
        layer = checkpoint.layer_names(i)
        out = {}
        for norm_key, readers in READERS.items():
            g = gain(layer[norm_key])
            out[layer[norm_key]] = unit_norm.clone()  # safetensors refuses shared storage
            for key in readers:
                out[layer[key]] = (load64(layer[key]) * g[None, :]) @ q
        for key in WRITERS:
            out[layer[key]] = q.T @ load64(layer[key])
        if "o_bias" in layer:
            out[layer["o_bias"]] = load64(layer["o_bias"]) @ q
        for key in INSIDE:
            if key in layer:
                out[layer[key]] = load64(layer[key])
        save(out, f"rotated-layer-{i:05d}.safetensors")
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    raw = json.loads((checkpoint.path / "config.json").read_text(encoding="utf-8"))
    raw["tie_word_embeddings"] = False
    (root / "config.json").write_text(json.dumps(raw, indent=1))
    for file in checkpoint.path.iterdir():
        if file.is_file() and not file.name.endswith(".safetensors") and file.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copyfile(file, root / file.name)


def _rows_times(matrix: torch.Tensor, q: torch.Tensor, rows: int = 8192) -> torch.Tensor:
    """matrix (vocab, hidden) float32 · q, in place, a block of rows at a time (vocabularies are large)."""
    for r0 in range(0, matrix.shape[0], rows):
        matrix[r0:r0 + rows] = matrix[r0:r0 + rows] @ q
    return matrix

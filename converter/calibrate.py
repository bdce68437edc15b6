"""Calibration: run the fp32 model over a text and collect, for every decoder linear,
  * the Fisher diagonal  F = Σ_chunks (∂L/∂W)²  (L: summed next-token cross-entropy of a chunk),
    so that Σ F·ΔW² estimates the loss increase a weight perturbation ΔW causes (×½), and
  * the input second moments  m[j] = Σ_tokens x_j²  per input column (the diagonal of XᵀX).

The forward pass is a plain torch re-statement of the Llama family (the same math as
runtime/model.py): embed → N × [RMSNorm, attention with RoPE/GQA, RMSNorm, SwiGLU MLP] → norm → lm_head.
It needs the whole fp32 model in memory (gradients do not stream layer by layer).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConversionError

DEFAULT_CALIB_TOKENS = 8192
CHUNK_TOKENS = 256


@dataclass
class Calibration:
    fisher: dict  # linear name -> float32 tensor shaped like W
    input_sq: dict  # linear name -> float32 tensor (in_features,)
    tokens: int
    text_sha256: str
    loss: float  # mean next-token loss of the fp32 model on the calibration text


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


def _inv_freq(spec) -> torch.Tensor:
    """RoPE inverse frequencies incl. linear and llama3 scaling (as transformers computes them)."""
    head_dim = spec["head_dim"]
    inv = 1.0 / (spec["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    scaling = spec.get("rope_scaling")
    if scaling and scaling["rope_type"] == "linear":
        inv = inv / scaling["factor"]
    elif scaling and scaling["rope_type"] == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old / high) & (wavelen <= old / low)
        inv = torch.where(is_mid, mid, scaled)
    return inv.to(torch.float32)


def _rope(x, cos, sin):  # x (heads, T, head_dim)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def chunk_loss(params: dict, spec: dict, ids: torch.Tensor, record_inputs=None) -> torch.Tensor:
    """Summed next-token cross-entropy of one chunk ids (T,). `record_inputs(name, x)` sees the input
    (T, in) of every decoder linear."""
    T = ids.shape[0]
    n_heads, n_kv, head_dim = spec["num_attention_heads"], spec["num_key_value_heads"], spec["head_dim"]
    eps = spec["rms_norm_eps"]
    angles = torch.arange(T, dtype=torch.float32)[:, None] * _inv_freq(spec)[None]  # (T, head_dim/2)
    cos = torch.cat([angles.cos(), angles.cos()], -1)
    sin = torch.cat([angles.sin(), angles.sin()], -1)

    def linear(name, x):
        if record_inputs is not None:
            record_inputs(name + ".weight", x)
        y = x @ params[name + ".weight"].T
        return y + params[name + ".bias"] if name + ".bias" in params else y

    x = params["model.embed_tokens.weight"][ids]  # (T, H)
    for i in range(spec["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms_norm(x, params[p + "input_layernorm.weight"], eps)
        q = linear(p + "self_attn.q_proj", h).view(T, n_heads, head_dim).transpose(0, 1)  # (n_heads, T, hd)
        k = linear(p + "self_attn.k_proj", h).view(T, n_kv, head_dim).transpose(0, 1)  # (n_kv, T, hd)
        v = linear(p + "self_attn.v_proj", h).view(T, n_kv, head_dim).transpose(0, 1)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        k = k.repeat_interleave(n_heads // n_kv, dim=0)
        v = v.repeat_interleave(n_heads // n_kv, dim=0)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (n_heads, T, hd)
        x = x + linear(p + "self_attn.o_proj", attn.transpose(0, 1).reshape(T, n_heads * head_dim))
        h = _rms_norm(x, params[p + "post_attention_layernorm.weight"], eps)
        gate, up = linear(p + "mlp.gate_proj", h), linear(p + "mlp.up_proj", h)
        x = x + linear(p + "mlp.down_proj", F.silu(gate) * up)
    x = _rms_norm(x, params["model.norm.weight"], eps)
    head = params.get("lm_head.weight", params["model.embed_tokens.weight"])
    logits = x @ head.T  # (T, vocab)
    return F.cross_entropy(logits[:-1], ids[1:], reduction="sum")


def calibrate(checkpoint, text: str | None = None, tokens: int = DEFAULT_CALIB_TOKENS, progress=None) -> Calibration:
    """Fisher diagonals and input second moments of every decoder linear over `tokens` tokens."""
    text = default_text() if text is None else text
    ids = encode(checkpoint, text)
    if len(ids) < 2 * CHUNK_TOKENS:
        raise ConversionError(f"calibration text has {len(ids)} tokens; at least {2 * CHUNK_TOKENS} are needed")
    ids = torch.tensor(ids[: tokens - tokens % CHUNK_TOKENS] if len(ids) >= tokens else
                       ids[: len(ids) - len(ids) % CHUNK_TOKENS])
    chunks = ids.view(-1, CHUNK_TOKENS)
    params = {name: checkpoint.load(name) for name in checkpoint.tensors}
    linears = [t.name for t in checkpoint.linears]
    for name in linears:
        params[name].requires_grad_(True)
    fisher = {name: torch.zeros_like(params[name]) for name in linears}
    input_sq = {name: torch.zeros(params[name].shape[1]) for name in linears}

    def record(name, x):
        input_sq[name] += x.detach().pow(2).sum(0)

    total = 0.0
    bar = progress(total=len(chunks), desc="calibrate", unit="chunk") if progress else None
    for chunk in chunks:
        loss = chunk_loss(params, checkpoint.model, chunk, record)
        grads = torch.autograd.grad(loss, [params[n] for n in linears])
        for name, grad in zip(linears, grads):
            fisher[name] += grad.pow(2)
        total += float(loss.detach())
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    n_tokens = chunks.numel()
    return Calibration(fisher, input_sq, n_tokens, hashlib.sha256(text.encode()).hexdigest(),
                       total / (n_tokens - len(chunks)))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def load_or_calibrate(checkpoint, checkpoint_hash: str, text: str | None, tokens: int, cache_dir,
                      progress=None) -> Calibration:
    """calibrate(), cached on disk as .npy files (no pickle) keyed by checkpoint, text and token count."""
    text = default_text() if text is None else text
    key = hashlib.sha256(f"{checkpoint_hash}/{hashlib.sha256(text.encode()).hexdigest()}/{tokens}/"
                         f"{CHUNK_TOKENS}/v1".encode()).hexdigest()[:32]
    directory = Path(cache_dir) / key if cache_dir is not None else None
    names = [t.name for t in checkpoint.linears]
    if directory is not None and (directory / "meta.txt").exists():
        try:
            loss_text, token_text = (directory / "meta.txt").read_text().split()
            fisher = {n: torch.from_numpy(np.load(directory / f"{_safe(n)}.fisher.npy", allow_pickle=False))
                      for n in names}
            input_sq = {n: torch.from_numpy(np.load(directory / f"{_safe(n)}.input_sq.npy", allow_pickle=False))
                        for n in names}
            shapes_ok = all(fisher[n].shape == checkpoint.tensors[n].shape for n in names)
            if shapes_ok:
                return Calibration(fisher, input_sq, int(token_text), hashlib.sha256(text.encode()).hexdigest(),
                                   float(loss_text))
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt
    result = calibrate(checkpoint, text, tokens, progress)
    if directory is not None:
        partial = directory.with_name(directory.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        for n in names:
            np.save(partial / f"{_safe(n)}.fisher.npy", result.fisher[n].numpy(), allow_pickle=False)
            np.save(partial / f"{_safe(n)}.input_sq.npy", result.input_sq[n].numpy(), allow_pickle=False)
        (partial / "meta.txt").write_text(f"{result.loss!r} {result.tokens}")
        if directory.exists():
            import shutil
            shutil.rmtree(directory)
        partial.rename(directory)
    return result

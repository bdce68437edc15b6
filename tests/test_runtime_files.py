"""TEST-ONLY writer: Hugging Face checkpoint dir → .mxq with fp16 or round-to-nearest affine weights.

Stand-in for mxq.converter while it is being written (tests and tools/bench_decode.py use it);
it knows nothing about budgets or error measurement. `write_test_mxq(hf_dir, out, choose)` where
choose(name, shape, role) returns "fp16", (bits, group_size, n_outliers) (affine) or a vq StorageConfig.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from mxq.format_spec import MxqWriter, StorageConfig, TensorPlan, build_csr, decode_meta, encode_meta, pack_codes
from mxq.format_spec.layout import CODEBOOK_ROLE, shared_codebook_name, shared_codebooks, vq_dims


def hf_model_json(cfg: dict) -> dict:
    """SPEC.md §3.1 `model` object from a config.json (transformers 4 or 5 rope spelling)."""
    rope = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    model_type = cfg["model_type"]
    return {
        "architecture": model_type, "hf_architecture": cfg["architectures"][0],
        **{k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "max_position_embeddings", "rms_norm_eps")},
        "num_key_value_heads": cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        "rope_theta": theta, "rope_scaling": scaling,
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "attention_bias": bool(cfg.get("attention_bias", model_type == "qwen2")),
        "bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id"),
    }


def hf_tokenizer(hf_dir: Path, cfg: dict) -> tuple[dict, bytes]:
    tc_path = hf_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.exists() else {}
    if (hf_dir / "tokenizer.json").exists():
        kind, data = "hf-tokenizers", (hf_dir / "tokenizer.json").read_bytes()
    else:
        kind, data = "sentencepiece", (hf_dir / "tokenizer.model").read_bytes()
    eos = cfg.get("eos_token_id")
    return {"kind": kind, "bos_token_id": cfg.get("bos_token_id"),
            "eos_token_ids": [] if eos is None else (eos if isinstance(eos, list) else [eos]),
            "add_bos_token": bool(tc.get("add_bos_token", False)),
            "chat_template": tc.get("chat_template")}, data


def rtn_affine(w: np.ndarray, bits: int, group_size: int, n_outliers: int = 0, meta_bits: int = 8) -> dict:
    """Min-max round-to-nearest with double-quantized metadata; outliers = largest residuals."""
    out_features, in_features = w.shape
    n_groups = math.ceil(in_features / group_size)
    padded = np.pad(w, ((0, 0), (0, n_groups * group_size - in_features)), mode="edge")
    groups = padded.reshape(out_features, n_groups, group_size)
    lo, hi = groups.min(axis=2), groups.max(axis=2)
    scale = np.maximum((hi - lo) / (2 ** bits - 1), 1e-6)
    scale_codes, scale_meta = encode_meta(scale, meta_bits)
    s = decode_meta(scale_codes, scale_meta)
    s = np.where(s > 0, s, 1e-6).astype(np.float32)
    zero_codes, zero_meta = encode_meta(-lo / s, meta_bits)
    z = decode_meta(zero_codes, zero_meta)
    q = np.clip(np.rint(groups / s[:, :, None] + z[:, :, None]), 0, 2 ** bits - 1)
    q = q.reshape(out_features, -1)
    q[:, in_features:] = 0
    blobs = {"qweight": pack_codes(q.astype(np.int64), bits), "scale_codes": scale_codes, "scale_meta": scale_meta,
             "zero_codes": zero_codes, "zero_meta": zero_meta}
    if n_outliers:
        deq = ((q.reshape(out_features, n_groups, group_size) - z[:, :, None]) * s[:, :, None])
        residual = w - deq.reshape(out_features, -1)[:, :in_features]
        flat = np.argsort(-np.abs(residual), axis=None, kind="stable")[:n_outliers]
        rows, cols = flat // in_features, flat % in_features
        blobs.update(build_csr(w.shape, rows, cols, residual[rows, cols]))
    return blobs


def product_codebook(bits: int, dim: int) -> np.ndarray:
    """fp16 (2^(bits·dim), dim): every combination of 2^bits uniform levels in [-1, 1] per coordinate (point p's
    coordinate i: level (p >> bits·i) mod 2^bits): the same for every tensor of (bits, dim), so also the file's
    shared codebook of a `shared` config (SPEC.md §12.4)."""
    levels = np.linspace(-1.0, 1.0, 1 << bits, dtype=np.float32)
    points = np.arange(1 << (bits * dim))
    return np.stack([levels[(points >> (bits * i)) % (1 << bits)] for i in range(dim)], axis=1).astype(np.float16)


def rtn_vq(w: np.ndarray, config: StorageConfig) -> dict:
    """Round-to-nearest on a product grid: the codebook is every combination of 2^bits uniform levels in [-1, 1]
    per coordinate (point p's coordinate i: level (p >> bits·i) mod 2^bits), each group's scale its largest |w|;
    each vector's index is the nearest point. Outliers = largest residuals."""
    out_features, in_features = w.shape
    bits, dim, group_size = config.bits, config.dim, config.group_size
    n_levels = 1 << bits
    codebook = product_codebook(bits, dim)
    n_groups, n_vectors = math.ceil(in_features / group_size), math.ceil(in_features / dim)
    padded = np.zeros((out_features, n_groups * group_size), np.float32)  # ≥ n_vectors · dim columns
    padded[:, :in_features] = w
    scale_codes, scale_meta = encode_meta(np.abs(padded.reshape(out_features, n_groups, group_size)).max(axis=2),
                                          config.meta_bits)
    s = decode_meta(scale_codes, scale_meta)
    s = np.where(s > 0, s, 1e-6).astype(np.float32)
    unit = padded / np.repeat(s, group_size, axis=1)  # (out, G·g) in about [-1, 1]
    level = np.clip(np.rint((unit + 1) / 2 * (n_levels - 1)), 0, n_levels - 1).astype(np.int64)
    level = level[:, :n_vectors * dim].reshape(out_features, n_vectors, dim)
    index = np.zeros((out_features, vq_dims(w.shape, config)[2]), np.int64)  # the row's padded index slots
    index[:, :n_vectors] = sum(level[:, :, i] << (bits * i) for i in range(dim))
    blobs = {"qweight": pack_codes(index, config.index_bits), "codebook": codebook, "scale_codes": scale_codes,
             "scale_meta": scale_meta}
    if config.outliers:
        deq = codebook.astype(np.float32)[index[:, :n_vectors]].reshape(out_features, -1)[:, :in_features]
        residual = w - deq * np.repeat(s, group_size, axis=1)[:, :in_features]
        flat = np.argsort(-np.abs(residual), axis=None, kind="stable")[:config.outliers]
        rows, cols = flat // in_features, flat % in_features
        blobs.update(build_csr(w.shape, rows, cols, residual[rows, cols]))
    return blobs


def tensor_role(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "lm_head"
    if name.endswith(".bias"):
        return "bias"
    if name.endswith("norm.weight"):
        return "norm"
    return "linear"


def write_test_mxq(hf_dir, out_path, choose=lambda name, shape, role: "fp16") -> Path:
    from safetensors.numpy import load_file

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    cfg = json.loads((hf_dir / "config.json").read_text())
    model = hf_model_json(cfg)
    tokenizer, tokenizer_data = hf_tokenizer(hf_dir, cfg)
    weights = load_file(str(hf_dir / "model.safetensors"))
    names = ["model.embed_tokens.weight"]
    for i in range(model["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight"] + [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [p + f"self_attn.{x}_proj.bias" for x in "qkv" if p + f"self_attn.{x}_proj.bias" in weights]
        names += [p + "post_attention_layernorm.weight"] + [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    names += ["model.norm.weight"] + (["lm_head.weight"] if "lm_head.weight" in weights else [])
    plans = []
    for name in names:
        shape, role = weights[name].shape, tensor_role(name)
        choice = choose(name, shape, role) if len(shape) == 2 else "fp16"
        config = (StorageConfig.fp16() if choice == "fp16" else choice if isinstance(choice, StorageConfig)
                  else StorageConfig.affine(*choice))
        plans.append(TensorPlan(name, shape, config, role))
    pairs = sorted(set().union(*(shared_codebooks(plan.config) for plan in plans)))
    plans += [TensorPlan(shared_codebook_name(b, d), (1 << b * d, d), StorageConfig.fp16(), CODEBOOK_ROLE)
              for b, d in pairs]  # the shared codebooks (the product grids), last
    with MxqWriter(out_path, model=model, tokenizer=tokenizer, tokenizer_data=tokenizer_data, tensors=plans,
                   provenance={"source": {"name": hf_dir.name}, "converter": {"name": "tests/test_runtime_files.py"}},
                   ) as writer:
        for plan in plans:
            if plan.role == CODEBOOK_ROLE:
                b, d = (int(n) for n in plan.name.split(".v")[1].split("d"))
                writer.write(plan.name, {"data": product_codebook(b, d)})
                continue
            w = weights[plan.name].astype(np.float32)
            if plan.config.scheme == "fp16":
                blobs = {"data": w.astype(np.float16)}
            elif plan.config.scheme == "vq":
                blobs = rtn_vq(w, plan.config)
                if plan.config.shared:  # the file's codebook tensor
                    del blobs["codebook"]
            else:
                blobs = rtn_affine(w, plan.config.bits, plan.config.group_size, plan.config.outliers,
                                   plan.config.meta_bits)
            writer.write(plan.name, blobs)
    return out_path


def test_rtn_affine_roundtrip_is_close():
    from mxq.format_spec import dequantize

    rng = np.random.default_rng(0)
    w = rng.standard_normal((7, 100)).astype(np.float32)
    for bits in (3, 4, 8):
        blobs = rtn_affine(w, bits, 32, n_outliers=5)
        deq = dequantize(blobs, w.shape, StorageConfig.affine(bits, 32, 5))
        step = (w.max() - w.min()) / (2 ** bits - 1)
        assert np.abs(deq - w).max() <= step  # within one quantization step (metadata rounding included)


def test_rtn_vq_roundtrip_is_close():
    from mxq.format_spec import dequantize
    from mxq.format_spec.affine import check_blobs, stored_blobs

    rng = np.random.default_rng(0)
    w = rng.standard_normal((7, 100)).astype(np.float32)
    for label in ("v2d2g32", "v3d2g64+o5", "v4d2g128m8", "v2d4g32+o3"):
        config = StorageConfig.parse(label)
        blobs = rtn_vq(w, config)
        check_blobs(stored_blobs(blobs, w.shape, config), w.shape, config)
        deq = dequantize(blobs, w.shape, config)
        half_step = np.abs(w).max() / (2 ** config.bits - 1) * 1.02  # half a level step of the largest scale (+ fp16)
        assert np.abs(deq - w).max() <= half_step

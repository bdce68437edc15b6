"""What `mxq inspect` reports about a file: per-tensor sizes and bits-per-weight totals."""
from __future__ import annotations

from .reader import MxqFile


def bits_per_weight(entries) -> float:
    entries = list(entries)
    numel = sum(entry.numel for entry in entries)
    return 8.0 * sum(entry.nbytes for entry in entries) / numel if numel else 0.0


def summarize(f: MxqFile) -> dict:
    """A JSON-ready description of an open file (the document of `mxq inspect --json`)."""
    entries = list(f.tensors.values())
    linears = [e for e in entries if e.role == "linear"]
    affine = [e for e in entries if e.config.scheme == "affine"]
    lut = [e for e in entries if e.config.scheme == "lut"]
    by_label: dict[str, int] = {}
    for entry in linears:
        by_label[entry.config.label.split("+")[0]] = by_label.get(entry.config.label.split("+")[0], 0) + 1
    tensor_bytes = sum(e.nbytes for e in entries)
    return {
        "file": str(f.path),
        "version": f"{f.version[0]}.{f.version[1]}",
        "file_bytes": f.file_nbytes,
        "header_and_json_bytes": f.data_offset,
        "tokenizer_bytes": f.tokenizer_blob.nbytes,
        "tensor_bytes": tensor_bytes,
        "padding_bytes": f.file_nbytes - f.data_offset - f.tokenizer_blob.nbytes - tensor_bytes,
        "model": f.model,
        "tokenizer": {k: v for k, v in f.tokenizer.items() if k != "blob"},
        "provenance": f.provenance,
        "quantization": f.quantization,
        "totals": {
            "tensors": len(entries),
            "parameters": sum(e.numel for e in entries),
            "linear_parameters": sum(e.numel for e in linears),
            "bpw_linear": round(bits_per_weight(linears), 6),
            "bpw_affine": round(bits_per_weight(affine), 6),
            "bpw_lut": round(bits_per_weight(lut), 6),
            "bpw_all": round(bits_per_weight(entries), 6),
            "linear_configs": dict(sorted(by_label.items())),
        },
        "tensors": [
            {"name": e.name, "shape": list(e.shape), "role": e.role, "scheme": e.config.scheme,
             "config": e.config.to_json(), "label": e.config.label, "bytes": e.nbytes,
             "bpw": round(8.0 * e.nbytes / e.numel, 4)}
            for e in entries
        ],
    }

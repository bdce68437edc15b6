"""What `mxq inspect` reports about a file: per-tensor sizes and bits-per-weight totals."""
from __future__ import annotations

from .layout import StorageConfig
from .reader import MxqFile


def bits_per_weight(entries) -> float:
    entries = list(entries)
    numel = sum(entry.numel for entry in entries)
    return 8.0 * sum(entry.nbytes for entry in entries) / numel if numel else 0.0


def _numel(entries) -> int:
    return sum(entry.numel for entry in entries)


def short_label(config: StorageConfig) -> str:
    """The config label, a `rows` one shortened for a table column: 'rows×4 b3g64…b5g64+o12' (first and
    last block; both blocks when there are two)."""
    if config.scheme != "rows":
        return config.label
    labels = [block.label for _, block in config.blocks]
    inner = ",".join(labels) if len(labels) == 2 else f"{labels[0]}…{labels[-1]}"
    return f"rows×{len(labels)} {inner}"


def summarize(f: MxqFile) -> dict:
    """A JSON-ready description of an open file (the document of `mxq inspect --json`)."""
    entries = list(f.tensors.values())
    linears = [e for e in entries if e.role == "linear"]
    affine = [e for e in entries if e.config.scheme == "affine"]
    lut = [e for e in entries if e.config.scheme == "lut"]
    vq = [e for e in entries if e.config.scheme == "vq"]
    trellis = [e for e in entries if e.config.scheme == "trellis"]
    rows = [e for e in entries if e.config.scheme == "rows"]
    by_label: dict[str, int] = {}  # linears by config without outliers; a rows tensor as rows×k
    by_block: dict[str, int] = {}  # the blocks of rows linears, by config without outliers
    for entry in linears:
        config = entry.config
        key = f"rows×{len(config.blocks)}" if config.scheme == "rows" else config.label.split("+")[0]
        by_label[key] = by_label.get(key, 0) + 1
        for _, block in config.blocks:
            by_block[block.label.split("+")[0]] = by_block.get(block.label.split("+")[0], 0) + 1
    codebooks = list(f.codebooks.values())  # shared vq codebooks, trellis tables (SPEC.md §12.4, §13): linears' bytes
    codebook_bytes = sum(e.nbytes for e in codebooks)
    tensor_bytes = sum(e.nbytes for e in entries) + codebook_bytes
    return {
        "file": str(f.path),
        "version": f"{f.version[0]}.{f.version[1]}",
        "file_bytes": f.file_nbytes,
        "header_and_json_bytes": f.data_offset,
        "tokenizer_bytes": f.tokenizer_blob.nbytes,
        "tokenizer_raw_bytes": f.tokenizer_nbytes,
        "tensor_bytes": tensor_bytes,
        "codebook_bytes": codebook_bytes,
        "padding_bytes": f.file_nbytes - f.data_offset - f.tokenizer_blob.nbytes - tensor_bytes,
        "model": f.model,
        "tokenizer": {k: v for k, v in f.tokenizer.items() if k != "blob"},
        "provenance": f.provenance,
        "quantization": f.quantization,
        "totals": {
            "tensors": len(entries),
            "parameters": sum(e.numel for e in entries),
            "linear_parameters": sum(e.numel for e in linears),
            "bpw_linear": round(bits_per_weight(linears + codebooks) * _numel(linears + codebooks) / _numel(linears)
                                if linears else 0.0, 6),  # shared codebooks counted, their numel not
            "bpw_affine": round(bits_per_weight(affine), 6),
            "bpw_lut": round(bits_per_weight(lut), 6),
            "bpw_vq": round(bits_per_weight(vq), 6),
            "bpw_trellis": round(bits_per_weight(trellis), 6),
            "bpw_rows": round(bits_per_weight(rows), 6),
            "bpw_all": round(bits_per_weight(entries), 6),
            "linear_configs": dict(sorted(by_label.items())),
            "row_block_configs": dict(sorted(by_block.items())),
        },
        "tensors": [
            {"name": e.name, "shape": list(e.shape), "role": e.role, "scheme": e.config.scheme,
             "config": e.config.to_json(), "label": e.config.label, "short_label": short_label(e.config),
             "bytes": e.nbytes,
             "bpw": round(8.0 * e.nbytes / e.numel, 4)}
            for e in entries + codebooks
        ],
    }

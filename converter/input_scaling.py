"""Activation-aware input scaling (AWQ's equivalent transformation), applied as the checkpoint is read.

A linear that reads x multiplies W·x = (W·diag(s))·(x / s) for any positive s (in,). When whatever
produces x can absorb the 1/s, the model computes the same function with W' = W·diag(s) in place of W,
and W' quantizes differently: input channels with large activations get larger weights, so a group's
scale spends its levels where the products are large. Per decoder layer, four producers absorb it:

    readers      producer                      s from the readers' input second moments
    q, k, v      attention norm weight g       g' = (offset + g)/s − offset    (Gemma's norms are offset + g)
    gate, up     MLP norm weight g             the same
    o            v's rows (and v's bias)       v' = diag(1/s)·v: the attention output is linear in v
                                               (one s per kv channel: the query heads sharing a kv head
                                               read the same v channel, so their o columns share it)
    down         up's rows                     up' = diag(1/s)·up: act(gate)·up is linear in up

with s_j = (m_j / mean m)^(α/2) (m_j = Σ x_j² over the calibration tokens; α = --input-scaling),
divided by its geometric mean. α = 0 is the identity; AWQ searches α per layer on output error, here
one α serves all (measured on the fixture, README). The residual stream, the embedding and the head do
not change, so tied embeddings stay tied and no tensor is added.

The calibration statistics follow exactly, without a second calibration (the gradient w.r.t. W'_ij is
the gradient w.r.t. W_ij divided by s_j): a column-scaled W' has Fisher F/s² per column and input
second moments m/s²; a row-scaled W' (v, up) has Fisher F·s² per row and the same input moments.
So measurement, the MILP and the writer run unchanged on ScaledCheckpoint and scaled_calibration.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping

import torch

from .checkpoint import FP16_MAX, Checkpoint
from .errors import ConversionError

SCALING_VERSION = 1  # bump when the scaled tensors change for the same alpha (cache keys derive from it)
READERS = {"attn_norm": ("q", "k", "v"), "mlp_norm": ("gate", "up")}  # norm → the linears reading it
ROW_PRODUCERS = {"o": ("v", "v_bias"), "down": ("up",)}  # linear → the tensors whose rows make its input
MOMENT_FLOOR = 1e-6  # channels whose second moment is below this × the mean count as this (never divide by 0)


@dataclasses.dataclass
class ScaledCheckpoint(Checkpoint):
    """The checkpoint with the scales applied on load: rules[name] = {how: s float64} with how "columns"
    (W·diag(s)), "rows" (diag(1/s)·W, or a bias / s) or "norm" ((offset + g)/s − offset); v and up
    have both "columns" (they read a norm) and "rows" (they make o's and down's input)."""
    rules: dict = dataclasses.field(default_factory=dict)
    norm_offset: float = 0.0
    derived_hash: str = ""

    def content_hash(self, cache_dir=None) -> str:  # derived from the source hash: nothing to remember
        return self.derived_hash

    def load(self, name: str):
        weight = super().load(name)
        if name not in self.rules:
            return weight
        rule, w = self.rules[name], weight  # float32, scaled in place (no copy of an 8B model's largest matrix)
        if "columns" in rule:
            w.mul_(rule["columns"].to(torch.float32)[None, :])
        if "rows" in rule:
            s = rule["rows"].to(torch.float32)
            w.div_(s[:, None] if w.dim() == 2 else s)
        if "norm" in rule:
            w.add_(self.norm_offset).div_(rule["norm"].to(torch.float32)).sub_(self.norm_offset)
        if not bool(torch.isfinite(w).all()) or float(w.abs().max()) > FP16_MAX:
            raise ConversionError(f"--input-scaling: tensor '{name}' leaves the fp16 range once scaled; "
                                  "convert with a smaller --input-scaling (or 0)")
        return w


def channel_scales(moments: torch.Tensor, alpha: float) -> torch.Tensor:
    """s (n,) float64 from input second moments (n,): (m / mean m)^(α/2), geometric mean 1."""
    m = moments.to(torch.float64)
    mean = float(m.mean())
    if not mean > 0:
        return torch.ones_like(m)
    s = (m / mean).clamp_min(MOMENT_FLOOR) ** (alpha / 2)
    return s / torch.exp(torch.log(s).mean())


def scaling_rules(checkpoint: Checkpoint, input_sq: Mapping, alpha: float) -> dict:
    """name → {how: s} for every tensor the scaling changes (see the module doc and ScaledCheckpoint)."""
    config, family = checkpoint.config, checkpoint.config.family
    rules: dict = {}

    def add(name, how, s):
        rules.setdefault(name, {})[how] = s
    for i in range(config.num_hidden_layers):
        layer = {spec.key: spec.for_layer(i) for spec in family.layer_tensors if spec.for_layer(i) in checkpoint.tensors}
        for norm_key, readers in READERS.items():
            present = [layer[key] for key in readers if key in layer]
            if norm_key not in layer or not present:
                continue
            s = channel_scales(input_sq[present[0]], alpha)
            add(layer[norm_key], "norm", s)
            for name in present:
                add(name, "columns", s)
        for reader, producers in ROW_PRODUCERS.items():
            if reader not in layer or producers[0] not in layer:
                continue
            moments = input_sq[layer[reader]]
            if reader == "o":  # (heads·hd,) → one value per kv channel: the mean over the query heads sharing it
                kv, group, hd = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads, \
                    config.head_dim
                s_kv = channel_scales(moments.reshape(kv, group, hd).mean(1).reshape(-1), alpha)  # (kv·hd,)
                s_in = s_kv.reshape(kv, 1, hd).expand(kv, group, hd).reshape(-1)
            else:
                s_kv = s_in = channel_scales(moments, alpha)
            add(layer[reader], "columns", s_in)
            for key in producers:
                if key in layer:
                    add(layer[key], "rows", s_kv)
    return rules


class ScaledStats(Mapping):
    """A calibration statistic (LazyStats: name → tensor) as it is for the scaled weights."""

    def __init__(self, stats: Mapping, rules: dict, kind: str):
        self.stats, self.rules, self.kind = stats, rules, kind
        self.shapes = getattr(stats, "shapes", None)  # calibrate.expanded_input_sq reads it

    def __getitem__(self, name: str) -> torch.Tensor:
        value = self.stats[name]
        rule = self.rules.get(name)
        if rule is None:
            return value
        if "columns" in rule:
            sq = (rule["columns"] ** 2).to(torch.float32)
            value = value / (sq[None, :] if self.kind == "fisher" else sq)
        if "rows" in rule and self.kind == "fisher":  # a row-scaled linear's input is unchanged
            value = value * (rule["rows"] ** 2).to(torch.float32)[:, None]
        return value

    def __iter__(self):
        return iter(self.stats)

    def __len__(self):
        return len(self.stats)


def scaled(checkpoint: Checkpoint, source_hash: str, calibration, alpha: float):
    """(ScaledCheckpoint, Calibration with scaled statistics, provenance) — or the inputs unchanged for α 0."""
    if alpha == 0 or calibration is None:
        return checkpoint, calibration, None
    rules = scaling_rules(checkpoint, calibration.input_sq, alpha)
    key = f"{source_hash}/input-scaling/{alpha!r}/{calibration.directory.name}/v{SCALING_VERSION}"
    fields = {f.name: getattr(checkpoint, f.name) for f in dataclasses.fields(Checkpoint)}
    result = ScaledCheckpoint(**fields, rules=rules, norm_offset=float(checkpoint.config.family.norm_offset),
                              derived_hash=hashlib.sha256(key.encode()).hexdigest())
    stats = dataclasses.replace(calibration, fisher=ScaledStats(calibration.fisher, rules, "fisher"),
                                input_sq=ScaledStats(calibration.input_sq, rules, "input_sq"))
    spread = max((float(s.max() / s.min()) for rule in rules.values() for s in rule.values()), default=1.0)
    provenance = {"alpha": alpha, "version": SCALING_VERSION, "tensors": len(rules),
                  "max_channel_ratio": round(spread, 3) if math.isfinite(spread) else None}
    return result, stats, provenance

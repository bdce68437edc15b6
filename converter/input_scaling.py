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
So measurement, the MILP and the writer run unchanged on what scaled() returns.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from .checkpoint import FP16_MAX, Checkpoint, DerivedCheckpoint
from .errors import ConversionError
from .rotate import READERS  # norm → the linears reading it (the same fold as the rotation's)

SCALING_VERSION = 1  # bump when the scaled tensors change for the same alpha (cache keys derive from it)
MOMENT_FLOOR = 1e-6  # channels whose second moment is below this × the mean count as this (never divide by 0)


@dataclasses.dataclass
class ScaledCheckpoint(DerivedCheckpoint):
    """The checkpoint with the scales applied on load: rules[name] = {how: s float64} with how "columns"
    (W·diag(s)), "rows" (diag(1/s)·W, or a bias / s) or "norm" ((offset + g)/s − offset); v and up
    have both "columns" (they read a norm) and "rows" (they make o's and down's input)."""
    rules: dict = dataclasses.field(default_factory=dict)
    norm_offset: float = 0.0

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
    config = checkpoint.config
    kv, hd = config.num_key_value_heads, config.head_dim
    group = config.num_attention_heads // kv  # query heads per kv head
    rules: dict = {}

    def add(names, how, s):
        for name in names:
            rules.setdefault(name, {})[how] = s

    for i in range(config.num_hidden_layers):
        layer = checkpoint.layer_names(i)
        for norm_key, reader_keys in READERS.items():  # norm weights absorb the readers' scales
            readers = [layer[key] for key in reader_keys if key in layer]
            if norm_key in layer and readers:
                s = channel_scales(input_sq[readers[0]], alpha)
                add([layer[norm_key]], "norm", s)
                add(readers, "columns", s)
        if "o" in layer and "v" in layer:  # v's rows absorb o's: one scale per kv channel (heads·hd → kv·hd)
            s = channel_scales(input_sq[layer["o"]].reshape(kv, group, hd).mean(1).reshape(-1), alpha)
            add([layer["o"]], "columns", s.reshape(kv, 1, hd).expand(kv, group, hd).reshape(-1))
            add([layer[key] for key in ("v", "v_bias") if key in layer], "rows", s)
        if "down" in layer and "up" in layer:  # up's rows absorb down's
            s = channel_scales(input_sq[layer["down"]], alpha)
            add([layer["down"]], "columns", s)
            add([layer["up"]], "rows", s)
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


def scaled(checkpoint: Checkpoint, checkpoint_hash: str, calibration, alpha: float):
    """(checkpoint, its hash, calibration, provenance): the ScaledCheckpoint, its derived hash, the
    calibration with scaled statistics and what the file records — or the inputs and None for α 0 or
    no calibration (a data-free objective has no second moments to scale by)."""
    if alpha == 0 or calibration is None:
        return checkpoint, checkpoint_hash, calibration, None
    rules = scaling_rules(checkpoint, calibration.input_sq, alpha)
    key = f"{checkpoint_hash}/input-scaling/{alpha!r}/{calibration.directory.name}/v{SCALING_VERSION}"
    result = ScaledCheckpoint.of(checkpoint, key, rules=rules, norm_offset=float(checkpoint.config.family.norm_offset))
    stats = dataclasses.replace(calibration, fisher=ScaledStats(calibration.fisher, rules, "fisher"),
                                input_sq=ScaledStats(calibration.input_sq, rules, "input_sq"))
    spread = max((float(s.max() / s.min()) for rule in rules.values() for s in rule.values()), default=1.0)
    provenance = {"alpha": alpha, "version": SCALING_VERSION, "tensors": len(rules),
                  "max_channel_ratio": round(spread, 3) if math.isfinite(spread) else None}
    return result, result.content_hash(), stats, provenance

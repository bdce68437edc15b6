"""Benchmark mxq's runtime against transformers fp32 on the same checkpoint, in one run.

    python tools/bench_decode.py MODEL.mxq HF_DIR [--prompt-tokens 128] [--new-tokens 64] [--json]

For each of: mxq lean (weights packed, dequantized per use), mxq cached (--cache-dequantized) and
transformers fp32 (HF_DIR, the checkpoint the file was converted from), a fresh subprocess loads
the model, prefills the same seeded random prompt, then decodes greedily token by token (no
stopping at EOS) and reports load time, prefill tok/s, decode tok/s and peak RSS (clean per mode
because each is its own process). Ratios are against transformers. Targets (issue #4, SmolLM2):
lean decode >= 0.25x transformers and RSS <= file + KV cache + 300 MiB; cached decode >= 1.0x.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MODES = ("lean", "cached", "transformers")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def prompt_ids(vocab_size: int, n: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(1234).integers(3, vocab_size, size=n).tolist()


def run_mxq(path, cache_dequantized, n_prompt, n_new) -> dict:
    import numpy as np

    import mxq

    t0 = time.perf_counter()
    lm = mxq.load(path, cache_dequantized=cache_dequantized)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(lm.config.vocab_size, n_prompt)
    model, be = lm.model, lm.backend
    cache = model.new_cache(n_prompt + n_new)
    t0 = time.perf_counter()
    logits = be.to_host(model.forward(ids, cache, last_only=True))[-1]
    prefill_s = time.perf_counter() - t0
    tokens = [int(np.argmax(logits))]
    t0 = time.perf_counter()
    for _ in range(n_new - 1):
        logits = be.to_host(model.forward([tokens[-1]], cache))[-1]
        tokens.append(int(np.argmax(logits)))
    decode_s = time.perf_counter() - t0
    kv_mib = cache.nbytes / 2**20
    return {"load_s": load_s, "prefill_tok_s": n_prompt / prefill_s, "decode_tok_s": (n_new - 1) / decode_s,
            "kv_cache_mib": kv_mib, "tokens": tokens, "threads": lm.backend.threads}


def run_transformers(hf_dir, n_prompt, n_new) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt_ids(model.config.vocab_size, n_prompt)])
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        past, tokens = out.past_key_values, [int(out.logits[0, -1].argmax())]
        t0 = time.perf_counter()
        for _ in range(n_new - 1):
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
        decode_s = time.perf_counter() - t0
    return {"load_s": load_s, "prefill_tok_s": n_prompt / prefill_s, "decode_tok_s": (n_new - 1) / decode_s,
            "tokens": tokens, "torch_threads": torch.get_num_threads()}


def worker(args) -> None:
    if args.threads and args.worker == "transformers":
        import torch

        torch.set_num_threads(args.threads)
    if args.worker == "transformers":
        result = run_transformers(args.hf_dir, args.prompt_tokens, args.new_tokens)
    else:
        result = run_mxq(args.file, args.worker == "cached", args.prompt_tokens, args.new_tokens)
    result["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", help=".mxq file")
    ap.add_argument("hf_dir", help="the Hugging Face checkpoint it was converted from")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for every mode (MXQ_THREADS and torch.set_num_threads); default: each library's own")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    results = {}
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, args.file, args.hf_dir, "--worker", mode,
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
        env = dict(os.environ)
        if args.threads:
            cmd += ["--threads", str(args.threads)]
            env["MXQ_THREADS"] = str(args.threads)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    file_mib = os.path.getsize(args.file) / 2**20
    ref = results.get("transformers")
    for mode, r in results.items():
        if ref and mode != "transformers":
            r["decode_ratio"] = r["decode_tok_s"] / ref["decode_tok_s"]
            r["prefill_ratio"] = r["prefill_tok_s"] / ref["prefill_tok_s"]
            r["same_greedy_tokens"] = r["tokens"] == ref["tokens"]
        if mode == "lean":
            r["rss_budget_mib"] = file_mib + r["kv_cache_mib"] + 300
    if args.json:
        print(json.dumps({"file": args.file, "file_mib": file_mib, "hf_dir": args.hf_dir,
                          "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "results": results},
                         indent=1))
        return
    print(f"{args.file}: {file_mib:.1f} MiB; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens; "
          f"{os.cpu_count()} CPUs; threads: {args.threads or 'library defaults'}; load average "
          f"{os.getloadavg()[0]:.1f} (other processes skew every number)")
    print(f"{'mode':<13} {'load s':>7} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak RSS MiB':>13}"
          f" {'decode x':>9} {'prefill x':>10}")
    for mode, r in results.items():
        ratios = (f" {r['decode_ratio']:>9.2f} {r['prefill_ratio']:>10.2f}" if "decode_ratio" in r else "")
        print(f"{mode:<13} {r['load_s']:>7.2f} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f}"
              f" {r['peak_rss_mib']:>13.1f}{ratios}")
    if "lean" in results:
        lean = results["lean"]
        print(f"lean RSS budget (file + KV cache + 300 MiB): {lean['rss_budget_mib']:.1f} MiB -> "
              f"{'within' if lean['peak_rss_mib'] <= lean['rss_budget_mib'] else 'OVER'}")
    for mode, r in results.items():
        if "same_greedy_tokens" in r:
            print(f"{mode}: greedy tokens {'match' if r['same_greedy_tokens'] else 'differ from'} transformers' "
                  "(expected to match only for an all-fp16 file)")


if __name__ == "__main__":
    main()

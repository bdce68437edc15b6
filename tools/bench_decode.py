"""Benchmark mxq's CPU runtime against its memory roofline, transformers fp32 and (optionally)
llama.cpp, in one run.

    python tools/bench_decode.py MODEL.mxq HF_DIR [--prompt-tokens 128] [--new-tokens 64] [--threads N] [--rounds R]
        [--modes lean,lean-a8,lean-a16,lean-unfused,lean-tiles,lean-jit,lean-1t,lean-numpy,cached,transformers] [--compare-gguf FILE.gguf LLAMA_BENCH]
        [--baseline OTHER.mxq] [--json]

1. Read bandwidth: the best of a multi-threaded float32 GEMV over a 512 MiB matrix (far larger
   than the caches) and of a read-only reduction over it (Numba kernels, `--threads` threads).
2. Roofline decode tok/s for the file = bandwidth ÷ bytes a decode step must read: every matrix
   used as a linear layer (a tied embedding counts once, as the lm_head) plus the 1-D tensors.
3. For each of: mxq lean (weights packed; compiled kernels for decode), mxq cached
   (--cache-dequantized) and transformers fp32 (HF_DIR, the checkpoint the file came from), a fresh
   subprocess loads the model, prefills the same seeded random prompt, then decodes greedily token by
   token (no stopping at EOS): load time, prefill tok/s, decode tok/s, % of the roofline, peak RSS.
   lean uses the default kernels (built ahead of time, cpu_aot.py), lean-jit Numba's JIT kernels
   (MXQ_KERNELS=jit: parallel, +~120 MiB); lean-numpy is the lean mode without the compiled kernels
   (MXQ_KERNELS=numpy): the NumPy path;
   lean-1t the lean mode on one thread (MXQ_THREADS=1): the thread scaling, measured in the same run;
   lean-a8 and lean-a16 the lean mode with 8-bit or ~16-bit activations (MXQ_ACTIVATIONS=8 or 16,
   cpu_weights.activation_low_part; lean: this CPU's default, cpu_weights.DEFAULT_ACTIVATIONS);
   lean-tiles the lean mode with kernel stacks taking whole prefill pieces on every CPU (the largest of
   cpu_weights.STACK_MAX_TOKENS; the default takes them only where the tiles beat dequantize + sgemm);
   lean-unfused the lean mode with decode's layers run op by op (a compiled call per op, Model.block) instead
   of as one compiled call (cpu_layers.py).
   "cpu ms/tok" is the process's CPU time per decoded token (all threads): about the wall time per
   token when only one thread works at a time, up to threads × it when they all work at once.
4. --kernel-memory: where the compiled kernels' resident memory goes, in fresh processes: RSS
   (anonymous + file-backed pages) after NumPy and after the ahead-of-time kernels load (no Numba);
   for the JIT also after `import llvmlite.binding` (LLVM's shared library), after `import numba`,
   and after cpu_jit loads every kernel from Numba's cache.
5. --breakdown: one more lean run (a fresh subprocess, after the rounds) in which every compiled kernel call of
   decode is timed (the backend's run_team / run_op / run_kernel wrapped): ms per token in each kernel (all
   decoder layers are one call, decode_layers, unless lean-unfused's setting is on), and the rest of a decode
   step — Python, NumPy glue, sampling — as what remains of its wall time.
6. --baseline OTHER.mxq adds a "baseline" row: the lean mode on another file of the same checkpoint (e.g. the
   same budget with `--configs all`), in the same rounds, interleaved, and the ratio of lean's decode to its.
7. --compare-gguf adds llama.cpp: `LLAMA_BENCH -m FILE -p <prompt> -n 0` for prefill and
   `-p 0 -n <new> -d <prompt>` for decode after the same context as mxq's (`-t <threads> -o json`).
Ratios are against transformers, measured in the same run (the machine may be shared: compare
ratios, not absolute numbers). Lean RSS budget: 1.25 × file + KV cache + 64 MiB.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MODES = ("lean", "lean-a8", "lean-a16", "lean-unfused", "lean-tiles", "lean-jit", "lean-1t", "lean-numpy", "cached", "transformers")
ACTIVATION_MODES = {"lean-a8": "8", "lean-a16": "16"}  # mode → $MXQ_ACTIVATIONS
# lean: the default kernels (ahead-of-time built); lean-jit: Numba's JIT kernels (MXQ_KERNELS=jit, parallel);
# lean-numpy: lean without the compiled kernels
BANDWIDTH_MIB = 512  # the probe's matrix: far larger than any cache


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def prompt_ids(vocab_size: int, n: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(1234).integers(3, vocab_size, size=n).tolist()


def time_kernels(be) -> dict:
    """Wrap the backend's kernel runners so every compiled kernel call adds its seconds to the returned dict
    (kernel name → seconds; clear it to start over)."""
    spent = {}

    def timed(run):
        def runner(kernel, *args, **options):
            t0 = time.perf_counter()
            try:
                return run(kernel, *args, **options)
            finally:
                name = getattr(kernel, "__name__", str(kernel))
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        return runner

    for name in ("run_team", "run_op", "run_kernel"):
        setattr(be, name, timed(getattr(be, name)))
    return spent


def run_mxq(path, cache_dequantized, n_prompt, n_new, breakdown=False, whole_pieces=False, fused=True) -> dict:
    import numpy as np

    import mxq
    from mxq.runtime.backends.cpu_weights import STACK_MAX_TOKENS

    t0 = time.perf_counter()
    lm = mxq.load(path, cache_dequantized=cache_dequantized)
    load_s = time.perf_counter() - t0
    if whole_pieces and lm.backend.kernels is not None:
        lm.backend.stack_max_tokens = max(STACK_MAX_TOKENS.values())
    lm.backend.fuse_layers = fused
    spent = time_kernels(lm.backend) if breakdown else None
    ids = prompt_ids(lm.config.vocab_size, n_prompt)
    model, be = lm.model, lm.backend
    cache = model.new_cache(n_prompt + n_new)
    t0 = time.perf_counter()
    logits = be.to_host(model.forward(ids, cache, last_only=True))[-1]
    prefill_s = time.perf_counter() - t0
    tokens = [int(np.argmax(logits))]
    if spent is not None:
        spent.clear()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(n_new - 1):
        logits = be.to_host(model.forward([tokens[-1]], cache))[-1]
        tokens.append(int(np.argmax(logits)))
    decode_s, decode_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    kv_mib = cache.nbytes / 2**20
    extra = {}
    if spent is not None:
        per_token = {name: 1e3 * seconds / (n_new - 1) for name, seconds in sorted(spent.items(), key=lambda i: -i[1])}
        extra["kernel_ms_per_token"] = per_token
        extra["rest_ms_per_token"] = 1e3 * decode_s / (n_new - 1) - sum(per_token.values())
    return {**extra, "load_s": load_s, "prefill_tok_s": n_prompt / prefill_s, "decode_tok_s": (n_new - 1) / decode_s,
            "decode_cpu_ms_per_token": 1e3 * decode_cpu_s / (n_new - 1), "kv_cache_mib": kv_mib, "tokens": tokens,
            "threads": lm.backend.threads}


def rss_parts_mib() -> dict:
    """This process's resident memory now: total, anonymous and file-backed pages (Linux)."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) / 1024.0
    return {"rss": fields["VmRSS"], "anon": fields["RssAnon"], "file": fields["RssFile"]}


def kernel_memory(kind: str) -> dict:
    """RSS after each step of loading the compiled kernels of `kind` (aot or jit; a fresh process)."""
    import numpy  # noqa: F401

    stages = {"python + numpy": rss_parts_mib()}
    if kind == "jit":
        import llvmlite.binding  # noqa: F401

        stages["import llvmlite.binding"] = rss_parts_mib()
        import numba  # noqa: F401

        stages["import numba"] = rss_parts_mib()
    from mxq.runtime.backends import cpu_jit

    os.environ["MXQ_KERNELS"] = kind
    loaded = cpu_jit.kernels()
    if loaded is None or loaded.kind != kind:
        sys.exit(f"the {kind} kernels did not load")
    stages[f"{kind} kernels loaded"] = rss_parts_mib()
    return {"stages": stages, "numba_imported": "numba" in sys.modules}


def measure_bandwidth(threads) -> dict:
    """GB/s of the best of 5 runs of a float32 GEMV and of a read-only sum over BANDWIDTH_MIB."""
    import numba
    import numpy as np
    from numba import njit, prange

    @njit(parallel=True, fastmath=True)
    def gemv(w, x, y):
        for r in prange(w.shape[0]):
            acc = np.float32(0.0)
            for c in range(w.shape[1]):
                acc += w[r, c] * x[c]
            y[r] = acc

    @njit(parallel=True, fastmath=True)
    def total(a):
        acc = np.float32(0.0)
        for i in prange(a.size):
            acc += a[i]
        return acc

    if threads:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    w = np.ones((BANDWIDTH_MIB * 2**20 // 4 // 4096, 4096), np.float32)
    x, y = np.ones(4096, np.float32), np.empty(w.shape[0], np.float32)
    result = {"threads": numba.get_num_threads()}
    for name, run in (("gemv_gb_s", lambda: gemv(w, x, y)), ("sum_gb_s", lambda: total(w.reshape(-1)))):
        run()
        best = min(_timed(run) for _ in range(5))
        result[name] = w.nbytes / best / 1e9
    result["gb_s"] = max(result["gemv_gb_s"], result["sum_gb_s"])
    return result


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_bytes(path) -> int:
    """Bytes one decode step reads from the file: every tensor but an embedding that is only gathered
    from (a tied embedding is read in full as the lm_head)."""
    from mxq.format_spec import MxqFile

    with MxqFile.open(path) as f:
        tied = "lm_head.weight" not in f.tensors
        return sum(ref.nbytes for name, entry in f.tensors.items() for ref in entry.blobs.values()
                   if name != "model.embed_tokens.weight" or tied)


def run_llama_bench(gguf, llama_bench, n_prompt, n_new, threads) -> dict:
    """llama.cpp's prefill of n_prompt tokens, and its decode of n_new tokens after n_prompt of context
    (`-d`, as mxq's decode here follows its prompt; a llama-bench without -d decodes from an empty context)."""
    def rate(*args, required=True):
        """llama-bench's tok/s for one test (args: -p/-n/-d), or None when it failed and need not succeed."""
        cmd = [llama_bench, "-m", gguf, *args, "-o", "json"] + (["-t", str(threads)] if threads else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode and required:
            sys.exit(f"llama-bench failed:\n{done.stderr[-2000:]}")
        return None if done.returncode else json.loads(done.stdout)[0]["avg_ts"]

    prefill = rate("-p", str(n_prompt), "-n", "0")
    depth, decode = n_prompt, rate("-p", "0", "-n", str(n_new), "-d", str(n_prompt), required=False)
    if decode is None:  # an older llama-bench: no -d
        depth, decode = 0, rate("-p", "0", "-n", str(n_new))
    return {"prefill_tok_s": prefill, "decode_tok_s": decode, "decode_depth": depth,
            "file_mib": os.path.getsize(gguf) / 2**20}


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
    elif args.worker == "bandwidth":
        result = measure_bandwidth(args.threads)
    elif args.worker.startswith("kernel-memory-"):
        result = kernel_memory(args.worker.removeprefix("kernel-memory-"))
    else:
        result = run_mxq(args.file, args.worker == "cached", args.prompt_tokens, args.new_tokens,
                         breakdown=args.worker == "lean-breakdown", whole_pieces=args.worker == "lean-tiles",
                         fused=args.worker != "lean-unfused")
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
    ap.add_argument("--compare-gguf", nargs=2, metavar=("GGUF", "LLAMA_BENCH"),
                    help="also run llama.cpp's llama-bench binary on a GGUF file")
    ap.add_argument("--kernel-memory", action="store_true",
                    help="also print where the compiled kernels' resident memory goes (a fresh process)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the modes this many times, interleaved (every other round in reverse order), and "
                         "report each mode's median-decode round: a noisy machine's drift hits every mode alike")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time every compiled kernel call of a lean decode (one more run): where a step goes")
    ap.add_argument("--baseline", metavar="OTHER.mxq",
                    help="also run the lean mode on another file in the same rounds: the 'baseline' row and ratio")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    ap.add_argument("--worker", choices=MODES + ("baseline", "bandwidth", "kernel-memory-aot", "kernel-memory-jit",
                                                 "lean-breakdown"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    runs = {}  # mode → [result of each round]
    memory_modes = ["kernel-memory-aot", "kernel-memory-jit"] if args.kernel_memory else []
    modes = list(dict.fromkeys(args.modes.split(","))) + (["baseline"] if args.baseline else [])
    order = ["bandwidth"] + memory_modes
    for i in range(max(1, args.rounds)):
        order += modes if i % 2 == 0 else modes[::-1]
    order += ["lean-breakdown"] if args.breakdown else []
    for mode in order:
        path = args.baseline if mode == "baseline" else args.file
        cmd = [sys.executable, __file__, path, args.hf_dir, "--worker", mode,
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
        env = dict(os.environ)
        if mode == "lean-numpy":
            env["MXQ_KERNELS"] = "numpy"
        if mode == "lean-jit":
            env["MXQ_KERNELS"] = "jit"
        if args.threads:
            cmd += ["--threads", str(args.threads)]
            env["MXQ_THREADS"] = str(args.threads)
        if mode == "lean-1t":
            env["MXQ_THREADS"] = "1"
        if mode in ACTIVATION_MODES:
            env["MXQ_ACTIVATIONS"] = ACTIVATION_MODES[mode]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
        runs.setdefault(mode, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = {}
    for mode in ["bandwidth"] + modes + memory_modes:
        rounds = sorted(runs[mode], key=lambda r: r.get("decode_tok_s", 0.0))
        results[mode] = rounds[(len(rounds) - 1) // 2]  # the median round (the lower one of an even count)
        if len(rounds) > 1:
            results[mode]["decode_tok_s_rounds"] = [r["decode_tok_s"] for r in runs[mode]]
    bandwidth = results.pop("bandwidth")
    breakdown = runs["lean-breakdown"][0] if args.breakdown else None
    memory = {kind: results.pop(f"kernel-memory-{kind}") for kind in ("aot", "jit")} if args.kernel_memory else None
    if args.compare_gguf:
        results["llama.cpp"] = run_llama_bench(*args.compare_gguf, args.prompt_tokens, args.new_tokens, args.threads)
    file_mib = os.path.getsize(args.file) / 2**20
    step_bytes = decode_bytes(args.file)
    roofline = bandwidth["gb_s"] * 1e9 / step_bytes  # tok/s if a decode step only streamed its bytes once
    ref = results.get("transformers")
    for mode, r in results.items():
        if mode in MODES and mode != "transformers":  # mxq's modes (the baseline file has its own roofline)
            r["roofline_pct"] = 100 * r["decode_tok_s"] / roofline
        if mode == "llama.cpp":  # against the roofline of its own file
            r["roofline_pct"] = 100 * r["decode_tok_s"] * r["file_mib"] * 2**20 / (bandwidth["gb_s"] * 1e9)
        if ref and mode != "transformers":
            r["decode_ratio"] = r["decode_tok_s"] / ref["decode_tok_s"]
            r["prefill_ratio"] = r["prefill_tok_s"] / ref["prefill_tok_s"]
            if "tokens" in r:  # (llama-bench's row has no tokens: its prompt is not this one)
                r["same_greedy_tokens"] = r["tokens"] == ref["tokens"]
        if mode == "lean":
            r["rss_budget_mib"] = 1.25 * file_mib + r["kv_cache_mib"] + 64
    if args.json:
        print(json.dumps({"file": args.file, "file_mib": file_mib, "hf_dir": args.hf_dir, "bandwidth": bandwidth,
                          "decode_bytes": step_bytes, "roofline_tok_s": roofline, "prompt_tokens": args.prompt_tokens,
                          "new_tokens": args.new_tokens, "results": results, "kernel_memory": memory,
                          "breakdown": breakdown}, indent=1))
        return
    print(f"{args.file}: {file_mib:.1f} MiB; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens; "
          f"{os.cpu_count()} CPUs; threads: {args.threads or 'library defaults'}; load average "
          f"{os.getloadavg()[0]:.1f} (other processes skew every number)")
    print(f"read bandwidth ({bandwidth['threads']} threads, {BANDWIDTH_MIB} MiB): float32 GEMV "
          f"{bandwidth['gemv_gb_s']:.1f} GB/s, read-only sum {bandwidth['sum_gb_s']:.1f} GB/s -> "
          f"{bandwidth['gb_s']:.1f} GB/s")
    print(f"decode step reads {step_bytes / 2**20:.1f} MiB -> roofline {roofline:.1f} tok/s")
    print(f"{'mode':<13} {'load s':>7} {'prefill tok/s':>14} {'decode tok/s':>13} {'cpu ms/tok':>11} {'% roofline':>11}"
          f" {'peak RSS MiB':>13} {'decode x':>9} {'prefill x':>10}")
    for mode, r in results.items():
        ratios = (f" {r['decode_ratio']:>9.2f} {r['prefill_ratio']:>10.2f}" if "decode_ratio" in r else "")
        pct = f"{r['roofline_pct']:.1f}%" if "roofline_pct" in r else "-"
        load = f"{r['load_s']:.2f}" if "load_s" in r else "-"
        rss = f"{r['peak_rss_mib']:.1f}" if "peak_rss_mib" in r else "-"
        cpu = f"{r['decode_cpu_ms_per_token']:.1f}" if "decode_cpu_ms_per_token" in r else "-"
        print(f"{mode:<13} {load:>7} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f} {cpu:>11} {pct:>11}"
              f" {rss:>13}{ratios}")
    if "llama.cpp" in results:
        depth = results["llama.cpp"]["decode_depth"]
        print(f"llama.cpp's % roofline is against its own file's size at the same bandwidth; it decoded after "
              f"{depth} tokens of context" + (" (its llama-bench has no -d)" if depth != args.prompt_tokens else ""))
    if args.rounds > 1:
        print(f"{args.rounds} rounds, interleaved; each row is its mode's median round. Decode tok/s per round:")
        for mode, r in results.items():
            if "decode_tok_s_rounds" in r:
                print(f"  {mode:<13} " + " ".join(f"{v:.1f}" for v in r["decode_tok_s_rounds"]))
    if "lean" in results and "baseline" in results:
        print(f"lean decodes {results['lean']['decode_tok_s'] / results['baseline']['decode_tok_s']:.2f}x as fast as the "
              f"baseline {args.baseline} (both median rounds)")
    if "lean" in results and "lean-1t" in results:
        lean, one = results["lean"], results["lean-1t"]
        print(f"thread scaling: lean on {lean['threads']} threads decodes {lean['decode_tok_s'] / one['decode_tok_s']:.2f}x"
              f" as fast as on 1 ({lean['decode_cpu_ms_per_token'] * lean['decode_tok_s'] / 1e3:.2f} threads busy on"
              " average while decoding)")
    if "lean" in results:
        lean = results["lean"]
        print(f"lean RSS budget (1.25 x file + KV cache + 64 MiB): {lean['rss_budget_mib']:.1f} MiB -> "
              f"{'within' if lean['peak_rss_mib'] <= lean['rss_budget_mib'] else 'OVER'}")
    if breakdown:
        step = 1e3 / breakdown["decode_tok_s"]
        print(f"a lean decode step, every kernel call timed ({breakdown['decode_tok_s']:.1f} tok/s in that run, "
              f"{step:.2f} ms per token):")
        for name, ms in breakdown["kernel_ms_per_token"].items():
            print(f"  {name:<22} {ms:6.3f} ms  {100 * ms / step:5.1f}%")
        rest = breakdown["rest_ms_per_token"]
        print(f"  {'the rest (Python, glue)':<22} {rest:6.3f} ms  {100 * rest / step:5.1f}%")
    if memory:
        print("compiled kernels' resident memory (MiB: total = anonymous + file-backed pages; step = growth):")
        for kind, report in memory.items():
            previous = None
            for stage, m in report["stages"].items():
                step = f"  (+{m['rss'] - previous:.1f})" if previous is not None else ""
                print(f"  {kind}: {stage:<26} {m['rss']:7.1f} = {m['anon']:6.1f} + {m['file']:6.1f}{step}")
                previous = m["rss"]
            print(f"  {kind}: numba imported: {report['numba_imported']}")
    for mode, r in results.items():
        if "same_greedy_tokens" in r:
            print(f"{mode}: greedy tokens {'match' if r['same_greedy_tokens'] else 'differ from'} transformers' "
                  "(expected to match only for an all-fp16 file)")


if __name__ == "__main__":
    main()

"""Benchmark `mxq serve` against the runtime called directly, in one run.

    python tools/bench_serve.py MODEL.mxq [--requests 20] [--clients 4] [--max-tokens 32] [--cache-dequantized]

Three measurements of the same greedy request (--prompt, --max-tokens):
  direct      mxq.load(MODEL).generate(...) in this process, --requests times
  served      `mxq serve` in a subprocess, the openai client streaming --requests times in sequence
  served raw HTTP  the same streaming request over http.client (no client library): the server's share
              (direct, served and raw requests alternate, so the machine's noise hits them alike)
  concurrent  then the same server, --clients threads sending --requests non-streaming requests in total
For each: requests/s, and (direct, served) median and p90 time to first token (the first text piece
or the first non-empty streamed chunk). Ratios are against direct; the served text must equal the
direct text (checked). The server runs one generation at a time, so concurrency adds queueing, not
throughput: its requests/s should stay close to the sequential one.
"""
from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time,"


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(name, seconds, ttfts, n) -> dict:
    out = {"mode": name, "requests": n, "seconds": seconds, "requests_per_s": n / seconds}
    if ttfts:
        out.update(ttft_median_ms=1000 * statistics.median(ttfts), ttft_p90_ms=1000 * percentile(ttfts, 0.9))
    return out


def direct_once(model, args) -> tuple[float, str]:
    """(seconds to the first text piece, text) of one request to the runtime itself."""
    t0, first, pieces = time.perf_counter(), None, []
    for piece in model.generate(args.prompt, max_new_tokens=args.max_tokens, temperature=0.0):
        first = first or time.perf_counter() - t0
        pieces.append(piece)
    return first, "".join(pieces)


def served_once(client, args) -> tuple[float, str]:
    """(seconds to the first non-empty streamed chunk, text) of one streaming request to the server."""
    t0, first, pieces = time.perf_counter(), None, []
    for chunk in client.completions.create(model="m", prompt=args.prompt, max_tokens=args.max_tokens,
                                           temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter() - t0
            pieces.append(chunk.choices[0].text)
    return first, "".join(pieces)


def raw_once(port, args) -> tuple[float, str]:
    """The same streaming request over plain http.client: the server's share of the openai client's time."""
    body = json.dumps({"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0, first, pieces = time.perf_counter(), None, []
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    for line in response:
        if line.startswith(b"data: {"):
            text = json.loads(line[6:])["choices"][0]["text"]
            if text:
                first = first or time.perf_counter() - t0
                pieces.append(text)
    conn.close()
    return first, "".join(pieces)


def start_server(path, args):
    command = [sys.executable, "-m", "mxq.cli", "serve", str(path), "--port", "0", "--log-level", "warning",
               "--queue-size", str(max(args.requests, args.clients))]
    if args.cache_dequantized:
        command.append("--cache-dequantized")
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    line = process.stderr.readline()
    found = re.search(r"http://\S+:(\d+)/v1", line)
    if not found:
        process.kill()
        sys.exit(f"bench_serve: the server did not start: {line}{process.stderr.read()}")
    return process, int(found.group(1))


def run_interleaved(model, client, port, args) -> tuple[list, str]:
    """direct, served and raw-HTTP requests alternate, so machine noise hits them alike."""
    modes = {"direct": (direct_once, model), "served": (served_once, client), "served raw HTTP": (raw_once, port)}
    for once, target in modes.values():  # warm-up: caches, connection
        once(target, args)
    seconds, ttfts, texts = dict.fromkeys(modes, 0.0), {mode: [] for mode in modes}, {}
    for _ in range(args.requests):
        for mode, (once, target) in modes.items():
            t0 = time.perf_counter()
            first, texts[mode] = once(target, args)
            seconds[mode] += time.perf_counter() - t0
            ttfts[mode].append(first)
    for mode, text in texts.items():
        if text != texts["direct"]:
            sys.exit(f"bench_serve: {mode} text {text!r} != direct text {texts['direct']!r}")
    return [summary(mode, seconds[mode], ttfts[mode], args.requests) for mode in modes], texts["direct"]


def run_concurrent(client, args, expected) -> dict:
    def once(_):
        reply = client.completions.create(model="m", prompt=args.prompt, max_tokens=args.max_tokens, temperature=0)
        assert reply.choices[0].text == expected, "concurrent requests changed the greedy text"

    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(once, range(args.requests)))
    result = summary(f"concurrent x{args.clients}", time.perf_counter() - start, [], args.requests)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--cache-dequantized", action="store_true")
    parser.add_argument("--json", action="store_true", help="Print one JSON document.")
    args = parser.parse_args()
    import openai

    import mxq

    process, port = start_server(args.model, args)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                               timeout=600)
        with mxq.load(args.model, cache_dequantized=args.cache_dequantized) as model:
            rows, expected = run_interleaved(model, client, port, args)
            tokens = model.last_stats.new_tokens
        rows.append(run_concurrent(client, args, expected))
    finally:
        process.terminate()
        process.wait(timeout=30)
    direct = rows[0]
    for row in rows:
        row["requests_per_s_vs_direct"] = row["requests_per_s"] / direct["requests_per_s"]
        if "ttft_median_ms" in row:
            row["ttft_median_vs_direct"] = row["ttft_median_ms"] / direct["ttft_median_ms"]
    if args.json:
        print(json.dumps({"model": str(args.model), "prompt": args.prompt, "max_tokens": args.max_tokens,
                          "completion_tokens": tokens, "rows": rows}, indent=1))
        return
    print(f"{args.model.name}: {args.requests} greedy requests of {tokens} tokens "
          f"(--max-tokens {args.max_tokens}){', cache-dequantized' if args.cache_dequantized else ''}")
    print(f"{'mode':<18} {'req/s':>8} {'vs direct':>10} {'TTFT med ms':>12} {'p90 ms':>8} {'vs direct':>10}")
    for row in rows:
        ttft = (f"{row['ttft_median_ms']:>12.1f} {row['ttft_p90_ms']:>8.1f} {row['ttft_median_vs_direct']:>9.2f}x"
                if "ttft_median_ms" in row else f"{'-':>12} {'-':>8} {'-':>10}")
        print(f"{row['mode']:<18} {row['requests_per_s']:>8.2f} {row['requests_per_s_vs_direct']:>9.2f}x {ttft}")


if __name__ == "__main__":
    main()

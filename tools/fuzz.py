"""Fuzz the .mxq reader and runtime with hostile files; report crashes, hangs and peak memory.

    python tools/fuzz.py --metadata 10000 --bytes 10000 --rows 2000 [--seed 0] [--fixture tiny-qwen2]

A crash is any exception other than the typed ones bad input must raise (MxqFormatError, ModelError
and the format's ValueError subclasses MetadataError/JsonError/OutputPathError, OSError).
Each case: write a mutated copy of a small real model (every other decoder matrix stored as `rows`:
an fp16 block, a vq block (its own codebook, or every other time the file's shared one) and an affine block
with outliers, in a random row order; its tensor entries packed, as
mxq writes them, or with a blob table, the 1.0–1.4 form, half the cases each), open it, verify it, load
it (config, tokenizer, weights), run a 4-token forward and, if it has one, its chat template.
  - metadata mutations: one JSON value (any depth) replaced by a hostile one (wrong type, huge or
    negative number, NaN/Infinity/1e999 as text, duplicated key, deep nesting, a hostile chat
    template, …) or deleted; the header checksum is fixed so the mutation reaches the validators;
  - byte mutations: flips, overwrites, insertions, deletions and truncations anywhere in the file,
    half of them with the JSON checksum re-sealed;
  - rows mutations: a `rows` tensor's row_order given a duplicate, an out-of-range row or a swap (a
    valid order), its crc32 re-sealed, loaded without the checksum pass (`verify=False`) so that the
    runtime's own check is what must catch it.
Hangs: a case running longer than --timeout seconds (SIGALRM). Memory: the peak resident memory
of each case above the resident memory before it (Linux: VmHWM, reset through clear_refs); the
report gives the constant C such that growth <= 4 x file size + C held in every case.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import struct
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter
from pathlib import Path

HOSTILE_VALUES = [None, True, False, 0, -1, 1, 3, 2**31, 2**53 + 1, 2**63, 2**64, 10**400, -10**400, 0.5, -0.0,
                  1e308, 5e-324, "", "x", "llama", "linear", "fp16", "affine", "vq", "\u0000", "\ud7ff" * 3, [], {},
                  [0], [1, 2], {"a": 1}, [[[[]]]], "a" * 100_000, list(range(2000))]
TEMPLATES = ["{{ 'a' * 1000000000 }}", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
             "{% endfor %}", "{{ messages.__class__ }}", "{% for %}", "{{ raise_exception('no') }}",
             "{{ (range(100000)|list)|join('x' * 4000000) }}", "{{ 1/0 }}", "{{ 'x'|center(10**10) }}",
             "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "{{ bos_token }}{{ messages[0].content }}"]
TEXT_VALUES = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" + "0" * 5000, "[" * 200 + "]" * 200,
               "\"\\ud800\"", "\"\\udfff\\ud800\""]
EXPECTED = ("MxqFormatError", "ModelError", "MetadataError", "JsonError", "OutputPathError")


class Hang(BaseException):  # BaseException: no `except Exception` in the code under test swallows it
    pass


# -- building the seed file and mutants --------------------------------------------------------------
def seed_files(fixture: str, folder: Path) -> list:
    """The model as mxq writes it (packed tensor entries) and with a blob table (the 1.0–1.4 form)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import fixtures
    from test_runtime_files import write_test_mxq

    choose = lambda name, shape, role: (4, 32, 2) if role == "linear" else "fp16"  # noqa: E731
    affine = write_test_mxq(fixtures.ensure(fixture), folder / "affine.mxq", choose)
    return [with_row_blocks(affine, folder / "seed.mxq"), with_row_blocks(affine, folder / "seed-table.mxq",
                                                                         blob_table=True)]


def with_row_blocks(path: Path, out: Path, every: int = 2, blob_table: bool = False) -> Path:
    """A copy of `path` whose every `every`-th decoder matrix is stored as `rows` (SPEC.md §8): its rows in
    a random order, the first third as an fp16 block, the second as v3d2g32 with 2 outliers (§12; every other
    matrix v3d4g32s, the file's shared codebook, §12.4), the rest as b4g32 with 2 outliers (RTN); blob_table:
    tensor entries in the 1.0–1.4 form (a blob object each) instead of packed (§4.1)."""
    import numpy as np
    from test_runtime_files import product_codebook, rtn_affine, rtn_vq

    from mxq.format_spec import MxqFile, MxqWriter, StorageConfig, TensorPlan, dequantize, join_blocks
    from mxq.format_spec.layout import CODEBOOK_ROLE, shared_codebook_name

    rng = np.random.default_rng(0)
    with MxqFile.open(path) as f:
        linears = [name for name, entry in f.tensors.items() if entry.role == "linear"][::every]
        plans, blobs = [], {}
        for name, entry in f.tensors.items():
            config, tensor_blobs = entry.config, f.blobs(name)
            if name in linears:
                out_features = entry.shape[0]
                order, k = rng.permutation(out_features), max(1, out_features // 3)
                stored = dequantize(tensor_blobs, entry.shape, config)[order]  # (out, in) in stored order
                vq = StorageConfig.vq(3, 4, 32, 2, shared=True) if linears.index(name) % 2 else \
                    StorageConfig.vq(3, 2, 32, 2)
                config = StorageConfig.rows([(k, StorageConfig.fp16()), (k, vq),
                                             (out_features - 2 * k, StorageConfig.affine(4, 32, 2))])
                vq_blobs = rtn_vq(stored[k:2 * k], vq)
                if vq.shared:
                    del vq_blobs["codebook"]  # the file's codebook.v3d4 (product_codebook, rtn_vq's)
                tensor_blobs = join_blocks(order, [{"data": stored[:k].astype(np.float16)}, vq_blobs,
                                                   rtn_affine(stored[2 * k:], 4, 32, 2)])
            plans.append(TensorPlan(name, entry.shape, config, entry.role))
            blobs[name] = tensor_blobs
        if len(linears) > 1:
            book = TensorPlan(shared_codebook_name(3, 4), (4096, 4), StorageConfig.fp16(), CODEBOOK_ROLE)
            plans.append(book)
            blobs[book.name] = {"data": product_codebook(3, 4)}
        tokenizer = {key: value for key, value in f.tokenizer.items() if key != "blob"}
        with MxqWriter(out, model=f.model, tokenizer=tokenizer, tokenizer_data=f.tokenizer_data(), tensors=plans,
                       quantization=f.quantization, provenance=f.provenance, blob_table=blob_table) as writer:
            for plan in plans:
                writer.write(plan.name, blobs[plan.name])
    return out


def split(image: bytes):
    _, major, minor, _, json_nbytes, data_offset = struct.unpack_from("<8sHHIQQ", image)
    return major, minor, image[32: 32 + json_nbytes], data_offset


def seal(image: bytes, raw: bytes, room: int) -> bytes:
    """Header + new JSON `raw` + the old data region moved `room` bytes later (offsets in `raw`
    must already account for it). The JSON may not outgrow the room; then it is cut (still a case)."""
    major, minor, old_raw, data_offset = split(image)
    new_offset = data_offset + room
    raw = raw[: new_offset - 32]
    header = b"\x89MXQ\r\n\x1a\n" + struct.pack("<HHIQQ", major, minor, zlib.crc32(raw), len(raw), new_offset)
    return header + raw + b"\0" * (new_offset - 32 - len(raw)) + image[data_offset:]


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value[:8]):  # a few items of long lists
            yield from _paths(item, prefix + (i,))


def mutate_metadata(image: bytes, rng: random.Random, exclude=()):
    """One JSON-level mutation (never inside the top-level keys `exclude`); returns (mutated
    image, description)."""
    room = 1 << 20
    _, _, raw, _ = split(image)
    document = json.loads(raw)
    placed = [document["tokenizer"]["blob"]] + [b for t in document["tensors"] for b in t.get("blobs", {}).values()]
    for item in placed + [t for t in document["tensors"] if "offset" in t]:  # blobs, packed tensor entries
        item["offset"] += room
    paths = [p for p in _paths(document) if p and p[0] not in exclude]
    weights = [5 if p[0] in ("model", "tokenizer") else 1 for p in paths]
    path = rng.choices(paths, weights)[0]
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    kind = rng.random()
    marker = "\"__FUZZ__\""
    if kind < 0.12 and isinstance(parent, dict):
        del parent[path[-1]]
        what = "delete"
        text = json.dumps(document, separators=(",", ":"))
    elif kind < 0.30:
        parent[path[-1]] = "__FUZZ__"
        value = rng.choice(TEXT_VALUES)
        text = json.dumps(document, separators=(",", ":")).replace(marker, value, 1)
        what = f"text {value[:20]}"
    elif kind < 0.38 and isinstance(parent, dict):
        text = json.dumps(document, separators=(",", ":"))
        key = json.dumps(path[-1])
        position = text.find(key + ":")
        text = text[:position] + key + ":0," + text[position:] if position >= 0 else text
        what = "duplicate key"
    else:
        if path[-1] == "chat_template" or (rng.random() < 0.1 and path[0] == "tokenizer"):
            path = ("tokenizer", "chat_template")
            parent = document["tokenizer"]
            value = rng.choice(TEMPLATES)
        else:
            value = rng.choice(HOSTILE_VALUES)
        parent[path[-1]] = value
        what = f"value {str(value)[:20]!r}"
        text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    return seal(image, text.encode("utf-8", "surrogatepass"), room), f"{'.'.join(map(str, path))}: {what}"


def mutate_bytes(image: bytes, rng: random.Random):
    data = bytearray(image)
    _, _, raw, data_offset = split(image)
    region = rng.choice(["header", "json", "data", "anywhere"])
    low, high = {"header": (0, 32), "json": (32, 32 + len(raw)), "data": (data_offset, len(data)),
                 "anywhere": (0, len(data))}[region]
    position = rng.randrange(low, max(high, low + 1))
    kind = rng.choice(["flip", "overwrite", "insert", "delete", "truncate", "int"])
    if kind == "flip":
        data[position] ^= 1 << rng.randrange(8)
    elif kind == "overwrite":
        data[position: position + 8] = bytes(rng.randrange(256) for _ in range(8))
    elif kind == "insert":
        data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    elif kind == "delete":
        del data[position: position + rng.randrange(1, 64)]
    elif kind == "truncate":
        del data[position:]
    else:  # a plausible-looking integer
        data[position: position + 8] = struct.pack("<Q", rng.choice([0, 1, 2**31, 2**32 - 1, 2**63, len(data)]))
    if region == "json" and rng.random() < 0.5 and len(data) >= 32:  # re-seal: reach the JSON validators
        _, _, _, _, json_nbytes, _ = struct.unpack_from("<8sHHIQQ", data)
        if 32 + json_nbytes <= len(data):
            struct.pack_into("<I", data, 12, zlib.crc32(bytes(data[32: 32 + json_nbytes])))
    return bytes(data), f"{region} {kind} @{position}"


def mutate_rows(image: bytes, rng: random.Random):
    """A `rows` tensor's row_order made a non-permutation (a duplicate, an out-of-range row) or another
    permutation (a swap: still a valid file), with its crc32 and the JSON checksum re-sealed."""
    data = bytearray(image)
    _, _, raw, _ = split(image)
    document = json.loads(raw)
    entry = rng.choice([t for t in document["tensors"] if t["scheme"] == "rows"])
    blob = entry["blobs"]["row_order"]
    size = 2 if blob["dtype"] == "uint16" else 4
    n = blob["shape"][0]
    i, j = rng.randrange(n), rng.randrange(n)
    at = lambda k: blob["offset"] + size * k  # noqa: E731
    kind = rng.choice(["duplicate", "out of range", "swap"])
    if kind == "duplicate":
        data[at(i): at(i) + size] = data[at(j): at(j) + size]
    elif kind == "out of range":
        data[at(i): at(i) + size] = rng.choice([n, n + 1, 2 ** (8 * size) - 1]).to_bytes(size, "little")
    else:
        data[at(i): at(i) + size], data[at(j): at(j) + size] = data[at(j): at(j) + size], data[at(i): at(i) + size]
    old_crc = blob["crc32"]
    new_crc = f"{zlib.crc32(bytes(data[blob['offset']: blob['offset'] + blob['nbytes']])):08x}"
    position = raw.find(f'"crc32":"{old_crc}"'.encode(), raw.find(f'"name":{json.dumps(entry["name"])}'.encode()))
    data[32 + position: 32 + position + len(old_crc) + 10] = f'"crc32":"{new_crc}"'.encode()
    struct.pack_into("<I", data, 12, zlib.crc32(bytes(data[32: 32 + len(raw)])))
    return bytes(data), f"{entry['name']} row_order {kind} @{i}"


# -- running one case --------------------------------------------------------------------------------
def exercise(path: Path, verify: bool = True) -> str:
    """Everything a user would do with the file; returns 'ok', 'damaged' or raises. verify=False skips
    the checksum pass (as `--no-verify` does): the runtime's own checks must hold."""
    import numpy as np

    from mxq.format_spec import MxqFile
    from mxq.runtime import load

    with MxqFile.open(path) as f:
        if verify and f.verify():
            return "damaged"
    with load(path, verify=verify) as model:
        ids = model.tokenizer.encode("Hello world")[:4] or [0]
        model.logits(np.asarray(ids))
        if model.tokenizer.chat_template is not None:
            model.tokenizer.encode_chat("hi")
    return "ok"


def _rss_now() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_case(image: bytes, folder: Path, timeout: float, verify: bool = True) -> tuple[str, float, int]:
    """(outcome, seconds, peak memory growth in bytes) where outcome is ok / damaged / rejected:Type
    / crash:Type: message / hang."""
    path = folder / "case.mxq"
    path.write_bytes(image)
    before = _rss_now()
    measured = _peak_reset()
    start = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        outcome = exercise(path, verify)
    except Hang:
        outcome = "hang"
    except Exception as error:  # noqa: BLE001 - classifying is the point
        name = type(error).__name__
        if name in EXPECTED or isinstance(error, OSError):
            outcome = f"rejected:{name}"
        else:
            frame = traceback.extract_tb(error.__traceback__)[-1]
            outcome = (f"crash:{name}: {' '.join(str(error).split())[:120]} "
                       f"[{Path(frame.filename).name}:{frame.lineno}]")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    seconds = time.perf_counter() - start
    growth = max(_peak() - before, 0) if measured else 0
    return outcome, seconds, growth


def fuzz(n_metadata: int, n_bytes: int, seed: int = 0, fixture: str = "tiny-qwen2", timeout: float = 30.0,
         budget_seconds: float | None = None, log=print, exclude=(), n_rows: int = 0) -> dict:
    def alarm(signum, frame):
        raise Hang()

    previous = signal.signal(signal.SIGALRM, alarm)
    rng = random.Random(seed)
    started = time.perf_counter()
    outcomes, crashes, hangs = Counter(), [], []
    worst = {"growth": 0, "file": 0, "excess": -math.inf, "case": ""}  # excess: growth - 4 x file size
    slowest = (0.0, "")
    try:
        with tempfile.TemporaryDirectory(prefix="mxq-fuzz-") as tmp:
            folder = Path(tmp)
            seeds = seed_files(fixture, folder)
            images = [seed.read_bytes() for seed in seeds]  # packed, blob table
            exercise(seeds[0])  # warm-up, untimed: imports and compiled kernels are not a case's cost
            plan = ([("metadata", mutate_metadata)] * n_metadata + [("bytes", mutate_bytes)] * n_bytes +
                    [("rows", mutate_rows)] * n_rows)
            rng.shuffle(plan)
            done = Counter()
            for i, (level, mutate) in enumerate(plan):
                if budget_seconds is not None and time.perf_counter() - started > budget_seconds:
                    break
                form = rng.randrange(2) if level != "rows" else 1  # rows: the table form locates row_order
                image = images[form]
                mutant, what = mutate(image, rng, exclude) if level == "metadata" else mutate(image, rng)
                what = f"{what} ({'table' if form else 'packed'})"
                outcome, seconds, growth = run_case(mutant, folder, timeout, verify=level != "rows")
                done[level] += 1
                outcomes[f"{level} {outcome.split(':')[0]}"] += 1
                if outcome.startswith("crash"):
                    crashes.append(f"{level} {what} -> {outcome}")
                elif outcome == "hang":
                    hangs.append(f"{level} {what}")
                if growth - 4 * len(mutant) > worst["excess"]:
                    worst = {"growth": growth, "file": len(mutant), "excess": growth - 4 * len(mutant),
                             "case": f"{level} {what}"}
                worst["max_growth"] = max(worst.get("max_growth", 0), growth)
                if seconds > slowest[0]:
                    slowest = (seconds, f"{level} {what} -> {outcome[:80]}")
                if log and (i + 1) % 500 == 0:
                    log(f"{i + 1} cases, {len(crashes)} crashes, {len(hangs)} hangs, "
                        f"{time.perf_counter() - started:.0f} s")
    finally:
        signal.signal(signal.SIGALRM, previous)
    return {"cases": dict(done), "outcomes": dict(sorted(outcomes.items())), "crashes": crashes, "hangs": hangs,
            "peak_memory": worst, "slowest_case": {"seconds": round(slowest[0], 2), "case": slowest[1]},
            "seconds": round(time.perf_counter() - started, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metadata", type=int, default=10_000, help="metadata-level mutations")
    parser.add_argument("--bytes", type=int, default=10_000, help="byte-level mutations")
    parser.add_argument("--rows", type=int, default=2_000, help="row_order mutations of rows tensors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fixture", default="tiny-qwen2", help="tools/fixtures.py name of the seed model")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds after which a case is a hang")
    parser.add_argument("--exclude", nargs="*", default=[], help="top-level JSON keys not to mutate (e.g. model)")
    parser.add_argument("--json", dest="json_path", help="also write the report here")
    args = parser.parse_args()
    report = fuzz(args.metadata, args.bytes, args.seed, args.fixture, args.timeout,
                  log=lambda m: print(m, file=sys.stderr, flush=True), exclude=tuple(args.exclude), n_rows=args.rows)
    distinct = Counter(c.split(" -> ")[1] for c in report["crashes"])
    print(json.dumps({**report, "crashes": report["crashes"][:50], "distinct_crashes": dict(distinct.most_common())},
                     indent=1))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=1))
    memory = report["peak_memory"]
    print(f"\n{sum(report['cases'].values())} cases ({report['cases']}), {len(report['crashes'])} crashes, "
          f"{len(report['hangs'])} hangs; peak memory growth <= 4 x file size + {max(memory['excess'], 0) / 2**20:.1f}"
          f" MiB in every case (largest growth {memory.get('max_growth', 0) / 2**20:.1f} MiB, files of "
          f"{memory['file'] / 2**20:.2f} MiB in the worst case); slowest case "
          f"{report['slowest_case']['seconds']} s; {report['seconds']} s in all", file=sys.stderr)
    sys.exit(1 if report["crashes"] or report["hangs"] else 0)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark of `ropekit serve`'s continuous batching: aggregate decode tokens/s with 1, 8 and 32
concurrent sequences against the same model decoding one sequence at a time with
`ropekit generate`, all in one run (the ratios are what to read; the machine may be shared).

  bench/bench_serve.py [--cli build/release/tools/ropekit] [--threads 2] [--tokens 200]
                       [--repeats 3] [--hidden-size 128 --layers 4 ...]

The model is initialised (one training step, seconds) with the default tiny-LLaMA shape unless
told otherwise. Single sequence: `ropekit generate --stats` prints new tokens / seconds of one
prefill + decode. Batched: C requests with max_tokens = --tokens
(sampling, distinct seeds, no stop strings) sent together to the server; aggregate rate = all
generated tokens / wall time from sending to the last response. Medians of --repeats, the repeats
interleaved across the configurations.
"""

import argparse
import concurrent.futures
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
import urllib.request


def train(cli, out, args):
    corpus = os.path.join(out, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("the quick brown fox jumps over the lazy dog. " * 400)
    model = os.path.join(out, "model")
    subprocess.run([cli, "train", "--corpus", corpus, "--out", model, "--steps", "1",
                    "--hidden-size", str(args.hidden_size), "--layers", str(args.layers),
                    "--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
                    "--intermediate-size", str(args.intermediate_size), "--seq-len", "64",
                    "--batch-size", "2", "--warmup", "1", "--eval-interval", "0", "--quiet"],
                   check=True, capture_output=True)
    return model


def generate_rate(cli, model, args, r):
    p = subprocess.run([cli, "generate", "--model", model, "--prompt", "the quick ",
                        "--max-new-tokens", str(args.tokens), "--temperature", "0.8",
                        "--seed", str(r), "--threads", str(args.threads), "--stats"],
                       check=True, capture_output=True)
    return float(re.search(rb"\(([\d.]+) tokens/s\)", p.stderr).group(1))


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as res:
        return json.loads(res.read())


def batched_rate(url, concurrency, args, r):
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        bodies = [{"prompt": "the quick ", "max_tokens": args.tokens, "temperature": 0.8,
                   "seed": 1000 * r + i} for i in range(concurrency)]
        t0 = time.monotonic()
        outs = list(pool.map(lambda b: post(url + "/v1/completions", b), bodies))
        wall = time.monotonic() - t0
        return sum(o["usage"]["completion_tokens"] for o in outs) / wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cli", default="build/release/tools/ropekit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate-size", type=int, default=352)
    args = ap.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "unknown CPU")
    with tempfile.TemporaryDirectory() as tmp:
        model = train(args.cli, tmp, args)
        proc = subprocess.Popen([args.cli, "serve", "--model", model, "--port", "0",
                                 "--threads", str(args.threads), "--max-batch", "32",
                                 "--ctx-size", str(args.tokens + 16)],
                                stdout=subprocess.PIPE, text=True)
        try:
            url = re.search(r"(http://127\.0\.0\.1:\d+)", proc.stdout.readline()).group(1)
            print(f"CPU: {cpu}; {os.cpu_count()} logical CPUs visible; --threads "
                  f"{args.threads}; d={args.hidden_size} L={args.layers} "
                  f"F={args.intermediate_size}; {args.tokens} new tokens per sequence; "
                  f"medians of {args.repeats}")
            # Repeats interleaved (generate, then 1, 8 and 32 concurrent, then again), so that a
            # change in the load of a shared machine touches every configuration alike.
            levels = (1, 8, 32)
            single, waves = [], {c: [] for c in levels}
            for r in range(args.repeats):
                single.append(generate_rate(args.cli, model, args, r))
                for c in levels:
                    waves[c].append(batched_rate(url, c, args, r))
            base = statistics.median(single)
            print(f"{'sequences':>10} {'tokens/s':>10} {'vs ropekit generate':>20}")
            print(f"{'generate':>10} {base:10.0f} {1.0:19.2f}x")
            for c in levels:
                rate = statistics.median(waves[c])
                print(f"{c:>10} {rate:10.0f} {rate / base:19.2f}x")
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()

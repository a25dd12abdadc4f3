#!/usr/bin/python3
"""Data-parallel `ropekit train` throughput: tokens/s for 1, 2 and 4 ranks (mpirun), the fraction
of a step spent communicating, how much of the gradient reduction the bucketed overlap hides, and
a paper model of scaling to 8 and 64 machines.

Every configuration trains the same model on the same global batch (--grad-accum = A micro-batches
per step, split over the ranks), so every run computes the same weights. Each configuration runs
--repeats times; medians are reported. The machine's cores bound what is measured: ranks beyond
the core count are oversubscribed (and said so).

Usage: bench/bench_mpi_train.py [--cli build/release/tools/ropekit] [--steps 12] [--repeats 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile

MODEL = ["--hidden-size", "128", "--layers", "4", "--heads", "4", "--kv-heads", "2",
         "--intermediate-size", "352", "--batch-size", "4", "--seq-len", "128",
         "--eval-interval", "0", "--quiet"]


def corpus(path):
    words = ["the ", "quick ", "brown ", "fox ", "jumps ", "over ", "lazy ", "dogs. "]
    state = 1
    out = []
    for _ in range(60000):
        state = (state * 1664525 + 1013904223) % 2**32
        out.append(words[(state >> 16) % 8])
    with open(path, "w") as f:
        f.write("".join(out))


def run(cli, ranks, threads, accum, steps, tmp, extra=()):
    stats = os.path.join(tmp, "stats.json")
    out = os.path.join(tmp, f"ckpt_{ranks}_{threads}_{len(extra)}")
    args = [cli, "train", "--corpus", os.path.join(tmp, "corpus.txt"), "--out", out,
            "--steps", str(steps), "--grad-accum", str(accum), "--threads", str(threads),
            "--dist-stats", stats, *MODEL, *extra]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    if ranks > 0:
        cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(ranks)]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        args = cmd + args
    subprocess.run(args, check=True, capture_output=True, text=True, env=env, timeout=1800)
    with open(stats) as f:
        s = json.load(f)
    subprocess.run(["rm", "-rf", out], check=True)
    step_s = max(s["step_s"])  # the slowest rank sets the pace
    # Communication proper: posting buckets, the reduction still running after the last rank's
    # backward ended, the all-gathers. Waiting for a slower rank (imbalance) is reported apart.
    after = s["reduce_after_last_backward_s"]
    comm = [p + w + a for p, w, a in zip(s["reduce_post_s"], after, s["allgather_s"])]
    return {
        "tok_s": steps * accum * 4 * 128 / step_s,
        "step_ms": 1e3 * step_s / steps,
        "compute_ms": 1e3 * statistics.mean(s["compute_s"]) / steps,
        "comm_fraction": statistics.mean(c / t for c, t in zip(comm, s["step_s"])),
        "reduce_exposed_ms": 1e3 * statistics.mean(
            p + w for p, w in zip(s["reduce_post_s"], after)) / steps,
        "imbalance_ms": 1e3 * statistics.mean(
            w - x for w, x in zip(s["reduce_wait_s"], after)) / steps,
        "allgather_ms": 1e3 * statistics.mean(s["allgather_s"]) / steps,
        "opt_floats": s["optimizer_floats"],
        "opt_floats_unsharded": s["optimizer_floats_unsharded"][0],
        "grad_floats_sent_per_step": statistics.mean(s["grad_floats_sent"]) / steps,
    }


def median_run(repeats, *args, **kwargs):
    runs = [run(*args, **kwargs) for _ in range(repeats)]
    out = dict(runs[0])
    for key in ("tok_s", "step_ms", "compute_ms", "comm_fraction", "reduce_exposed_ms",
                "imbalance_ms", "allgather_ms"):
        out[key] = statistics.median(r[key] for r in runs)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cli", default="build/release/tools/ropekit")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--accum", type=int, default=4, help="micro-batches per step (global batch)")
    ap.add_argument("--bandwidth-gbps", type=float, default=25.0,
                    help="network bandwidth per machine for the paper model (Gbit/s)")
    ap.add_argument("--latency-us", type=float, default=5.0,
                    help="per-message latency for the paper model (microseconds)")
    a = ap.parse_args()
    cores = os.cpu_count()
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    print(f"CPU: {cpu}, {cores} cores; model d=128 L=4 F=352, batch 4 x 128 tokens, "
          f"{a.accum} micro-batches per step, {a.steps} steps, median of {a.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        corpus(os.path.join(tmp, "corpus.txt"))
        results = {}
        configs = [("1 process x 1 thread", 0, 1, ()), ("1 process x 2 threads", 0, 2, ()),
                   ("2 ranks x 1 thread", 2, 1, ()),
                   ("2 ranks x 1 thread, no overlap", 2, 1, ("--no-overlap",)),
                   ("4 ranks x 1 thread", 4, 1, ())]
        for name, ranks, threads, extra in configs:
            r = median_run(a.repeats, a.cli, ranks, threads, a.accum, a.steps, tmp, extra)
            results[name] = r
            over = " (oversubscribed: more ranks than cores)" if ranks * threads > cores else ""
            print(f"{name:32s} {r['tok_s']:9.0f} tok/s  step {r['step_ms']:7.1f} ms  compute "
                  f"{r['compute_ms']:7.1f} ms  comm {100 * r['comm_fraction']:5.1f}% of step  "
                  f"reduce exposed {r['reduce_exposed_ms']:6.2f} ms  all-gather "
                  f"{r['allgather_ms']:6.2f} ms  waiting for a slower rank "
                  f"{r['imbalance_ms']:6.2f} ms{over}")
    base = results["1 process x 2 threads"]["tok_s"]
    two = results["2 ranks x 1 thread"]
    print(f"2 ranks x 1 thread / 1 process x 2 threads: {two['tok_s'] / base:.3f}")
    no = results["2 ranks x 1 thread, no overlap"]["reduce_exposed_ms"]
    hidden = 1.0 - two["reduce_exposed_ms"] / no if no > 0 else 0.0
    print(f"gradient reduction exposed after the last backward: {no:.2f} ms without overlap, "
          f"{two['reduce_exposed_ms']:.2f} ms with it: {100 * hidden:.0f}% hidden")
    for name in ("2 ranks x 1 thread", "4 ranks x 1 thread"):
        r = results[name]
        print(f"{name}: AdamW moments per rank {max(r['opt_floats']) * 4 / 2**20:.3f} MiB "
              f"(one process {r['opt_floats_unsharded'] * 4 / 2**20:.3f} MiB)")
    # Paper model (weak scaling, one micro-batch per machine per step): each of N machines
    # computes one micro-batch (the measured single-thread compute per micro-batch) and sends and
    # receives (N-1)/N of the gradient (reduce-scatter) and of the parameters (all-gather).
    one = results["1 process x 1 thread"]
    t_micro = one["compute_ms"] / 1e3 / a.accum
    grad_bytes = 4 * one["opt_floats_unsharded"] / 2
    bw = a.bandwidth_gbps * 1e9 / 8
    print(f"paper model: {1e3 * t_micro:.1f} ms compute per micro-batch on one core, "
          f"{grad_bytes / 2**20:.2f} MiB of gradients per step, {a.bandwidth_gbps:g} Gbit/s "
          f"per machine, {a.latency_us:g} us per message")
    for n in (8, 64):
        comm = 2 * grad_bytes * (n - 1) / n / bw + 2 * (n - 1) * a.latency_us * 1e-6
        step = t_micro + comm  # no overlap assumed: a bound from below on the efficiency
        print(f"  {n:3d} machines: step {1e3 * step:.2f} ms (communication {1e3 * comm:.2f} ms), "
              f"{n * 4 * 128 / step:.0f} tok/s, efficiency {t_micro / step * 100:.0f}%")


if __name__ == "__main__":
    main()

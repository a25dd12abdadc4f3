#!/usr/bin/env python3
"""ropekit.apply_rope vs the PyTorch eager formula on LLaMA-7B-like shapes.

    PYTHONPATH=build/release/python /usr/bin/python3 bench/bench_python_rope.py [--threads N]

Eager baseline (what transformers' apply_rotary_pos_emb runs, with the cos/sin gathered for the
positions beforehand and outside the timed region, as a model does once per forward for all
layers):  y = q * cos + rotate_half(q) * sin,  q [T, H, D] token-major.
ropekit: apply_rope(q, positions, config) out of place, allocating the output like eager does
("out"), out of place into a reused buffer (out=buf, "buf"), and in place ("in"). At 4096 tokens
a fresh 64 MiB output costs ~16k first-touch page faults per call, which dominates "out". Both use the same thread count (torch.set_num_threads(n), num_threads=n). Times
are medians over repeats, in milliseconds; "x eager" = eager time / ropekit time. "eager buf"
is the same formula with preallocated outputs (torch.mul/cat/neg with out=, in-place mul_/add_):
the allocation-free baseline, compared with ropekit's "buf" in the last ratio column.
"""

import argparse
import os
import statistics
import sys
import time

import torch

try:
    import ropekit
except ImportError:
    sys.exit("cannot import ropekit: set PYTHONPATH=<build dir>/python")


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def median_ms(fn, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 4096])
    args = ap.parse_args()

    n = args.threads
    torch.set_num_threads(n)
    heads, head_dim = 32, 128
    config = ropekit.RopeConfig(head_dim=head_dim, base=10000.0, max_position_embeddings=4096)
    print(f"# CPU: {cpu_model()}")
    print(f"threads={n} simd={ropekit.simd_target()} torch={torch.__version__} "
          f"H={heads} D={head_dim} repeats={args.repeats}")
    header = (f"{'T':>5} {'dtype':>8} {'eager':>8} {'eager buf':>9} {'out':>7} {'buf':>7} "
              f"{'in':>7} {'x eager out':>11} {'x eager in':>10} {'x eager buf/buf':>15}")
    print(header)
    print("-" * len(header))
    for tokens in args.tokens:
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(0)
            q = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype)
            positions = torch.arange(tokens, dtype=torch.int64)
            cos32, sin32 = config.cos_sin(positions.numpy())
            cos = torch.from_numpy(cos32).repeat(1, 2)[:, None, :].to(dtype).clone()  # [T, 1, D]
            sin = torch.from_numpy(sin32).repeat(1, 2)[:, None, :].to(dtype).clone()

            def eager():
                return q * cos + rotate_half(q) * sin

            def rk_out():
                return ropekit.apply_rope(q, positions, config, num_threads=n)

            half = head_dim // 2
            t1, t2 = torch.empty_like(q), torch.empty_like(q)
            neg_half = torch.empty_like(q[..., half:])

            def eager_buf():
                torch.mul(q, cos, out=t1)
                torch.neg(q[..., half:], out=neg_half)
                torch.cat((neg_half, q[..., :half]), dim=-1, out=t2)
                t2.mul_(sin)
                return t1.add_(t2)

            work = q.clone()
            buf = torch.empty_like(q)

            def rk_buf():
                return ropekit.apply_rope(q, positions, config, num_threads=n, out=buf)

            def rk_in():
                return ropekit.apply_rope(work, positions, config, inplace=True, num_threads=n)

            # Same result up to the eager path's extra roundings (cos/sin and three ops in dtype).
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            for result in (eager(), eager_buf()):
                diff = (result.float() - rk_out().float()).abs().max().item()
                assert diff <= tol * q.float().abs().max().item(), diff

            t_eager = median_ms(eager, args.repeats)
            t_eager_buf = median_ms(eager_buf, args.repeats)
            t_out = median_ms(rk_out, args.repeats)
            t_buf = median_ms(rk_buf, args.repeats)
            t_in = median_ms(rk_in, args.repeats)
            name = str(dtype).replace("torch.", "")
            print(f"{tokens:>5} {name:>8} {t_eager:>8.2f} {t_eager_buf:>9.2f} {t_out:>7.2f} "
                  f"{t_buf:>7.2f} {t_in:>7.2f} {t_eager / t_out:>11.1f} {t_eager / t_in:>10.1f} "
                  f"{t_eager_buf / t_buf:>15.1f}")


if __name__ == "__main__":
    main()

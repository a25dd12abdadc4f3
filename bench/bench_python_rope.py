#!/usr/bin/env python3
"""ropekit.apply_rope vs the PyTorch eager formula on LLaMA-7B-like shapes.

    PYTHONPATH=build/release/python /usr/bin/python3 bench/bench_python_rope.py [--threads N]

Eager baseline (what transformers' apply_rotary_pos_emb runs, with the cos/sin gathered for the
positions beforehand and outside the timed region, as a model does once per forward for all
layers):  y = q * cos + rotate_half(q) * sin,  q [T, H, D] token-major.
ropekit: apply_rope(q, positions, config) out of place (allocates the output like eager does)
and in place. Both use the same thread count (torch.set_num_threads(n), num_threads=n). Times
are medians over repeats, in milliseconds; "x eager" = eager time / ropekit time.
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
    print(f"threads={n} simd={ropekit.simd_target()} torch={torch.__version__} "
          f"H={heads} D={head_dim} repeats={args.repeats}")
    header = (f"{'T':>5} {'dtype':>8} {'eager ms':>9} {'rk out ms':>9} {'rk in ms':>9} "
              f"{'x eager (out)':>13} {'x eager (in)':>12} {'GB/s (in)':>9}")
    print(header)
    print("-" * len(header))
    for tokens in args.tokens:
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(0)
            q = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype)
            positions = torch.arange(tokens, dtype=torch.int64)
            cos32, sin32 = config.cos_sin(positions.numpy())
            cos = torch.from_numpy(cos32).repeat(1, 2)[:, None, :].to(dtype)  # [T, 1, D]
            sin = torch.from_numpy(sin32).repeat(1, 2)[:, None, :].to(dtype)

            def eager():
                return q * cos + rotate_half(q) * sin

            def rk_out():
                return ropekit.apply_rope(q, positions, config, num_threads=n)

            work = q.clone()

            def rk_in():
                return ropekit.apply_rope(work, positions, config, inplace=True, num_threads=n)

            # Same result up to the eager path's extra roundings (cos/sin and three ops in dtype).
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            diff = (eager().float() - rk_out().float()).abs().max().item()
            assert diff <= tol * q.float().abs().max().item(), diff

            t_eager = median_ms(eager, args.repeats)
            t_out = median_ms(rk_out, args.repeats)
            t_in = median_ms(rk_in, args.repeats)
            gbs = 2 * q.numel() * q.element_size() / (t_in * 1e-3) / 1e9
            name = str(dtype).replace("torch.", "")
            print(f"{tokens:>5} {name:>8} {t_eager:>9.3f} {t_out:>9.3f} {t_in:>9.3f} "
                  f"{t_eager / t_out:>13.1f} {t_eager / t_in:>12.1f} {gbs:>9.1f}")


if __name__ == "__main__":
    main()

"""The same model as bench/bench_model.cc in PyTorch (float32, eager, CPU), for comparison.

d = 128, 4 layers, 4 query / 2 KV heads, head_dim 32, SwiGLU 352, tied embeddings, RoPE
(half-split), batch 16 x 128, AdamW. Measures training tokens/s (forward + backward + AdamW step)
and KV-cache greedy decode tokens/s after a 128-token prefill, with torch.set_num_threads(N).
Prints one JSON line.

--size large: d = 256, 8 layers, 8 query / 4 KV heads, head_dim 32, SwiGLU 704, batch 4 x 512.
Training tokens/s is the median over --repeats timed runs of --steps steps each.

Usage: /usr/bin/python3 bench/bench_model_torch.py [--threads N] [--steps S] [--decode TOKENS]
       [--size default|large] [--repeats R]
"""

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

V, D_MODEL, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN = 256, 128, 4, 4, 2, 32, 352
BATCH, SEQ = 16, 128
# --size large: the shape where attention's share grows (same as bench_model --size large).
LARGE = dict(D_MODEL=256, LAYERS=8, HEADS=8, KV_HEADS=4, HEAD_DIM=32, FFN=704, BATCH=4, SEQ=512)


class Model(torch.nn.Module):

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Parameter(torch.randn(V, D_MODEL) * 0.02)
        self.layers = torch.nn.ModuleList()
        for _ in range(LAYERS):
            layer = torch.nn.Module()
            layer.n1 = torch.nn.Parameter(torch.ones(D_MODEL))
            layer.q = torch.nn.Linear(D_MODEL, HEADS * HEAD_DIM, bias=False)
            layer.k = torch.nn.Linear(D_MODEL, KV_HEADS * HEAD_DIM, bias=False)
            layer.v = torch.nn.Linear(D_MODEL, KV_HEADS * HEAD_DIM, bias=False)
            layer.o = torch.nn.Linear(HEADS * HEAD_DIM, D_MODEL, bias=False)
            layer.n2 = torch.nn.Parameter(torch.ones(D_MODEL))
            layer.g = torch.nn.Linear(D_MODEL, FFN, bias=False)
            layer.u = torch.nn.Linear(D_MODEL, FFN, bias=False)
            layer.d = torch.nn.Linear(FFN, D_MODEL, bias=False)
            self.layers.append(layer)
        self.norm = torch.nn.Parameter(torch.ones(D_MODEL))
        inv = 10000.0**(-torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
        ang = torch.arange(4096).float()[:, None] * inv[None, :]
        self.register_buffer("cos", torch.cos(ang))
        self.register_buffer("sin", torch.sin(ang))
        self.register_buffer("mask", torch.full((SEQ, SEQ), float("-inf")).triu(1))

    @staticmethod
    def rms(x, w):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w

    def rope(self, x, pos):  # x: [B, H, T, D]
        c, s = self.cos[pos][None, None], self.sin[pos][None, None]
        a, b = x[..., :HEAD_DIM // 2], x[..., HEAD_DIM // 2:]
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1)

    def forward(self, ids, cache=None, start=0):
        B, T = ids.shape
        pos = torch.arange(start, start + T)
        x = self.embed[ids]
        for i, L in enumerate(self.layers):
            h = self.rms(x, L.n1)
            q = L.q(h).view(B, T, HEADS, HEAD_DIM).transpose(1, 2)
            k = L.k(h).view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2)
            v = L.v(h).view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2)
            q, k = self.rope(q, pos), self.rope(k, pos)
            if cache is not None:
                if i in cache:
                    k = torch.cat([cache[i][0], k], dim=2)
                    v = torch.cat([cache[i][1], v], dim=2)
                cache[i] = (k, v)
            k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
            v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
            s = (q @ k.transpose(-1, -2)) / math.sqrt(HEAD_DIM)
            if T > 1:
                s = s + self.mask[:T, :T]
            a = torch.softmax(s, dim=-1) @ v
            x = x + L.o(a.transpose(1, 2).reshape(B, T, HEADS * HEAD_DIM))
            h = self.rms(x, L.n2)
            x = x + L.d(F.silu(L.g(h)) * L.u(h))
        return self.rms(x, self.norm) @ self.embed.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--decode", type=int, default=256)
    ap.add_argument("--size", choices=["default", "large"], default="default")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.size == "large":
        globals().update(LARGE)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Model()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    data = torch.randint(0, V, (BATCH, SEQ + 1))

    def step():
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(2):
        step()
    runs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        runs.append(time.perf_counter() - t0)
    train_s = statistics.median(runs)
    with torch.no_grad():
        prompt = data[:1, :SEQ]
        cache = {}
        t1 = time.perf_counter()
        logits = model(prompt, cache, 0)
        prefill_s = time.perf_counter() - t1
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
        for i in range(args.decode):
            logits = model(nxt, cache, SEQ + i)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
        decode_s = time.perf_counter() - t2
    print(json.dumps({
        "impl": "torch " + torch.__version__, "threads": args.threads, "size": args.size,
        "params": sum(p.numel() for p in model.parameters()),
        "train_tokens_per_s": round(args.steps * BATCH * SEQ / train_s, 1),
        "train_step_ms": round(1e3 * train_s / args.steps, 2),
        "prefill_tokens_per_s": round(SEQ / prefill_s, 1),
        "decode_tokens_per_s": round(args.decode / decode_s, 1)
    }))


if __name__ == "__main__":
    main()

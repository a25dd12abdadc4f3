"""Load test of `ropekit serve`: 64 concurrent streaming chat and completion requests (bounded in
count and time) against a server that decodes up to 32 at once. Every request completes, every
output equals the same request's solo output, the server's memory does not grow from one wave
to the next, and the test prints p50 / p99 time to first token and the aggregate tokens/s."""

import statistics
import time

import pytest

from serve_harness import Server, run_threads, stream_text, tempdir, tiny_checkpoint

REQUESTS = 64
TIME_LIMIT_S = 120


@pytest.fixture(scope="module")
def model():
    with tempdir() as tmp:
        yield tiny_checkpoint(tmp)


def body(i):
    chat = i % 2 == 0
    b = {"model": "tiny", "max_tokens": 32 + (i % 4) * 8, "temperature": 0.7 + 0.005 * i,
         "seed": 500 + i, "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        b["messages"] = [{"role": "user", "content": ("the fox", "lazy dogs", "hi")[i % 3]}]
    else:
        b["prompt"] = ("the quick ", "over ", "brown fox ")[i % 3]
    return b


def run(server, b):
    chat = "messages" in b
    path = "/v1/chat/completions" if chat else "/v1/completions"
    t0 = time.monotonic()
    first = []
    status, frames, done = server.stream(path, b, on_first=lambda: first.append(time.monotonic()))
    assert status == 200 and done, frames
    usage = frames[-1]["usage"]
    return {"text": stream_text(frames, chat).get(0, ""), "ttft": first[0] - t0,
            "tokens": usage["completion_tokens"], "seconds": time.monotonic() - t0}


def test_64_concurrent_streams(model):
    with Server(model, "--max-batch", "32", "--max-queue", "64", "--threads", "2") as server:
        bodies = [body(i) for i in range(REQUESTS)]
        solo = [run(server, b)["text"] for b in bodies]
        rss = []
        t_start = time.monotonic()
        for wave in range(2):
            t0 = time.monotonic()
            results = run_threads(lambda b: run(server, b), [(b,) for b in bodies])
            wall = time.monotonic() - t0
            assert [r["text"] for r in results] == solo
            rss.append(server.rss_kib())
            ttft = sorted(r["ttft"] for r in results)
            tokens = sum(r["tokens"] for r in results)
            p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
            print(f"\nwave {wave}: {REQUESTS} streams, {tokens} tokens in {wall:.2f} s = "
                  f"{tokens / wall:.0f} tokens/s aggregate; time to first token p50 "
                  f"{statistics.median(ttft) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms; "
                  f"server RSS {rss[-1] / 1024:.1f} MiB")
        assert time.monotonic() - t_start < TIME_LIMIT_S
        # Slots and buffers are allocated once: a second wave adds (almost) nothing.
        assert rss[1] - rss[0] < 16 * 1024, rss
    assert server.proc.returncode == 0

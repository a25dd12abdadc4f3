"""`ropekit serve --kv-cache-tokens`: the sequences share one paged KV cache pool. With a pool too
small for all the concurrent requests at once, every request still completes with its solo output
(same seed), at most as many run as the pool can hold, and the pool is empty afterwards; a request
that can never fit the pool gets a 400 naming max_tokens; a client that disconnects returns its
pages at once."""

import http.client
import json
import threading
import time

import pytest

from serve_harness import HOST, Server, run_threads, tempdir, tiny_checkpoint

PAGE = 16
POOL_TOKENS = 96  # 6 pages
PROMPTS = ["the quick ", "over the l", "brown fox ", "lazy dogs."]  # 10 bytes each


@pytest.fixture(scope="module")
def model():
    with tempdir() as tmp:
        yield tiny_checkpoint(tmp)


def body(i):
    # 10 prompt + 30 completion tokens reserve 40 tokens = 3 pages: two fit the pool at once.
    return {"model": "tiny", "prompt": PROMPTS[i % 4], "max_tokens": 30, "temperature": 0.8,
            "seed": 700 + i}


def kv(server):
    status, _, health = server.request("GET", "/health")
    assert status == 200
    return health["kv_cache"]


def wait_for_empty_pool(server, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pool = kv(server)
        if pool["pages_reserved"] == 0 and pool["pages_used"] == 0:
            return pool
        time.sleep(0.05)
    raise AssertionError(f"the KV pool did not empty: {kv(server)}")


def test_requests_beyond_the_pool_wait_and_match_their_solo_outputs(model):
    args = ("--kv-cache-tokens", str(POOL_TOKENS), "--kv-page-size", str(PAGE), "--max-batch", "8",
            "--threads", "2")
    with Server(model, *args) as server:
        pool = kv(server)
        assert pool["pages"] == POOL_TOKENS // PAGE and pool["page_size"] == PAGE
        # k and v of 2 layers x 96 tokens x (2 kv heads x 8 dims) floats.
        assert pool["bytes"] == 2 * 2 * POOL_TOKENS * 16 * 4
        solo = []
        for i in range(8):
            status, _, out = server.post("/v1/completions", body(i))
            assert status == 200, out
            solo.append(out["choices"][0]["text"])
        assert len(set(solo)) > 1

        peak = {"running": 0, "reserved": 0}
        done = threading.Event()

        def watch():
            while not done.is_set():
                _, _, h = server.request("GET", "/health")
                peak["running"] = max(peak["running"], h["running"])
                peak["reserved"] = max(peak["reserved"], h["kv_cache"]["pages_reserved"])
                time.sleep(0.002)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            results = run_threads(lambda b: server.post("/v1/completions", b),
                                  [(body(i),) for i in range(8)])
        finally:
            done.set()
            watcher.join()
        assert [r[0] for r in results] == [200] * 8, results
        assert [r[2]["choices"][0]["text"] for r in results] == solo
        # The pool, not --max-batch, bounds the running sequences: 3 pages each out of 6.
        assert peak["running"] <= 2 and peak["reserved"] <= POOL_TOKENS // PAGE, peak
        wait_for_empty_pool(server)

        # 10 + 100 tokens need 7 pages: never admitted, refused up front.
        status, _, err = server.post("/v1/completions", {"model": "tiny", "prompt": PROMPTS[0],
                                                         "max_tokens": 100})
        assert status == 400, err
        assert err["error"]["param"] == "max_tokens"
        assert "96 tokens" in err["error"]["message"] and "--kv-cache-tokens" in \
            err["error"]["message"]
        assert err["error"]["type"] == "invalid_request_error"


def test_a_disconnected_stream_returns_its_pages_at_once(model):
    # With a context shift a sequence reserves the whole context (128 tokens = 8 pages) and can
    # generate far longer than the test waits.
    args = ("--kv-cache-tokens", "128", "--kv-page-size", str(PAGE), "--threads", "1",
            "--context-shift", "--max-tokens", "1000000")
    with Server(model, *args) as server:
        conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
        b = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 1000000, "stream": True,
             "temperature": 0.8, "seed": 3}
        conn.request("POST", "/v1/completions", body=json.dumps(b),
                     headers={"Content-Type": "application/json"})
        res = conn.getresponse()
        assert res.status == 200
        assert res.read1(65536)  # the first frame: the sequence holds its pages now
        assert kv(server)["pages_reserved"] == 8
        conn.close()
        wait_for_empty_pool(server)
        # The pool is whole again: another sequence is admitted and finishes.
        status, _, out = server.post("/v1/completions", dict(b, stream=False, max_tokens=20))
        assert status == 200, out
        wait_for_empty_pool(server)


def test_a_pool_smaller_than_one_context_is_refused_with_context_shift(model):
    # With a context shift every sequence reserves its whole context (128 tokens here).
    with pytest.raises(RuntimeError, match="--kv-cache-tokens 64 must hold at least one context"):
        Server(model, "--kv-cache-tokens", "64", "--context-shift")

"""Black-box tests of `ropekit serve` over HTTP on a loopback port: every endpoint and error
status, SSE framing, stop strings, n > 1, echo and logprobs, API keys, a full queue (503), time
limits, client disconnects, fuzzed JSON bodies, and the continuous-batching guarantee: each
request's output with a given seed is the same alone or beside 31 concurrent others."""

import json
import os
import random
import subprocess
import threading
import time

import pytest

from serve_harness import CLI, Server, run_threads, stream_text, tempdir, tiny_checkpoint


@pytest.fixture(scope="module")
def model():
    with tempdir() as tmp:
        yield tiny_checkpoint(tmp)


@pytest.fixture(scope="module")
def server(model):
    with Server(model, "--max-batch", "32", "--max-queue", "64", "--max-body-bytes",
                "65536", "--threads", "2") as s:
        yield s


def complete(server, **body):
    status, _, out = server.post("/v1/completions", {"model": "tiny", **body})
    assert status == 200, out
    return out


def assert_error(status, out, want_status, param=None, code=None):
    assert status == want_status, out
    err = out["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err


def test_health_models_and_page(server):
    status, _, out = server.request("GET", "/health")
    assert status == 200 and out["status"] == "ok"
    status, _, out = server.request("GET", "/v1/models")
    assert status == 200 and out["object"] == "list"
    assert [m["id"] for m in out["data"]] == ["tiny"] and out["data"][0]["object"] == "model"
    status, hdrs, page = server.request("GET", "/")
    assert status == 200 and hdrs["content-type"].startswith("text/html")
    # Self-contained: no external resources.
    assert "http://" not in page and "https://" not in page and "<script src" not in page


def test_greedy_completion_matches_ropekit_generate(server, model):
    out = complete(server, prompt="the quick ", max_tokens=24, temperature=0)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert isinstance(out["created"], int) and out["model"] == "tiny"
    (choice,) = out["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 10, "completion_tokens": 24, "total_tokens": 34}
    # `ropekit generate` decodes one sequence with BLAS products: same model, other code path.
    ref = subprocess.run([CLI, "generate", "--model", model, "--prompt", "the quick ",
                          "--max-new-tokens", "24", "--temperature", "0"], check=True,
                         capture_output=True).stdout
    assert choice["text"].encode() == ref[len(b"the quick "):-1]


def test_seeds_lists_and_n(server):
    a = complete(server, prompt="fox ", max_tokens=20, temperature=1.0, seed=7)
    b = complete(server, prompt="fox ", max_tokens=20, temperature=1.0, seed=7)
    c = complete(server, prompt="fox ", max_tokens=20, temperature=1.0, seed=8)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["choices"][0]["text"] != c["choices"][0]["text"]
    # Two prompts, n = 2: choice index = prompt * n + j, and choice j of a prompt equals choice
    # j of that prompt requested alone.
    many = complete(server, prompt=["fox ", "lazy "], n=2, max_tokens=12, temperature=1.0,
                    seed=3)
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    for p, prompt in enumerate(["fox ", "lazy "]):
        alone = complete(server, prompt=prompt, n=2, max_tokens=12, temperature=1.0, seed=3)
        assert [c["text"] for c in alone["choices"]] == \
            [many["choices"][p * 2 + j]["text"] for j in range(2)]
    assert many["usage"]["prompt_tokens"] == 2 * (4 + 5)
    # Token-id prompts equal their text.
    ids = complete(server, prompt=list(b"fox "), max_tokens=20, temperature=1.0, seed=7)
    assert ids["choices"][0]["text"] == a["choices"][0]["text"]


def test_stop_echo_and_logprobs(server):
    full = complete(server, prompt="over ", max_tokens=30, temperature=0)["choices"][0]["text"]
    stop = full[6:8]
    first = full.find(stop)
    out = complete(server, prompt="over ", max_tokens=30, temperature=0, stop=[stop, "\x01"])
    assert out["choices"][0]["text"] == full[:first]
    assert out["choices"][0]["finish_reason"] == "stop"
    echo = complete(server, prompt="over ", max_tokens=5, temperature=0, echo=True)
    assert echo["choices"][0]["text"] == "over " + full[:5]
    lp = complete(server, prompt="over ", max_tokens=5, temperature=0, logprobs=2)
    lps = lp["choices"][0]["logprobs"]
    assert "".join(lps["tokens"]) == full[:5] and lps["text_offset"] == [0, 1, 2, 3, 4]
    for tok, value, top in zip(lps["tokens"], lps["token_logprobs"], lps["top_logprobs"]):
        assert value <= 0 and len(top) == 2
        assert max(top.values()) == value and top[tok] == value  # greedy takes the argmax
    both = complete(server, prompt="over ", max_tokens=2, temperature=0, echo=True, logprobs=0)
    assert both["choices"][0]["logprobs"]["tokens"][:5] == list("over ")
    assert both["choices"][0]["logprobs"]["token_logprobs"][0] is None


def test_streaming_matches_non_streaming(server):
    ref = complete(server, prompt="dogs. ", max_tokens=20, temperature=0.9, seed=11, n=2)
    status, frames, done = server.stream("/v1/completions", {
        "model": "tiny", "prompt": "dogs. ", "max_tokens": 20, "temperature": 0.9, "seed": 11,
        "n": 2, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and done
    assert {f["id"] for f in frames} == {frames[0]["id"]}
    assert all(f["object"] == "text_completion" for f in frames)
    texts = stream_text(frames, chat=False)
    assert [texts[i] for i in range(2)] == [c["text"] for c in ref["choices"]]
    for i in range(2):  # one chunk per character, however the tokens were collected
        pieces = [c["text"] for f in frames for c in f["choices"] if c["index"] == i and c["text"]]
        assert pieces == list(texts[i])
    assert frames[-1]["choices"] == [] and frames[-1]["usage"] == ref["usage"]
    finals = [c for f in frames[:-1] for c in f["choices"] if c["finish_reason"]]
    assert sorted(c["index"] for c in finals) == [0, 1]


def test_chat_template_stream_and_usage(server):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    status, _, out = server.post("/v1/chat/completions", {
        "model": "tiny", "messages": messages, "max_tokens": 16, "temperature": 0})
    assert status == 200, out
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant" and "\nUser:" not in msg["content"]
    rendered = "System: be brief\nUser: hi\nAssistant:"  # the documented template
    assert out["usage"]["prompt_tokens"] == len(rendered.encode())
    assert out["usage"]["completion_tokens"] >= len(msg["content"].encode())
    timings = out["timings"]  # extension: server-side prefill time and decode rate
    assert timings["predicted_n"] == out["usage"]["completion_tokens"] - 1
    assert timings["prompt_ms"] >= 0 and timings["predicted_per_second"] >= 0
    status, frames, done = server.stream("/v1/chat/completions", {
        "model": "tiny", "messages": messages, "max_completion_tokens": 16, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and done
    assert frames[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(f["object"] == "chat.completion.chunk" for f in frames)
    assert stream_text(frames, chat=True)[0] == msg["content"]
    assert frames[-2]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]
    assert frames[-1]["choices"] == [] and frames[-1]["usage"] == out["usage"]
    # Chat logprobs.
    status, _, lp = server.post("/v1/chat/completions", {
        "model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0,
        "logprobs": True, "top_logprobs": 3})
    content = lp["choices"][0]["logprobs"]["content"]
    assert len(content) == len(lp["choices"][0]["message"]["content"].encode())
    assert all(len(c["top_logprobs"]) == 3 and c["logprob"] <= 0 for c in content)


def test_tokenize_detokenize(server):
    status, _, out = server.post("/tokenize", {"content": "héllo"})
    assert status == 200 and out["tokens"] == list("héllo".encode())
    status, _, out = server.post("/tokenize", {"content": "ab", "with_pieces": True})
    assert out["tokens"] == [{"id": 97, "piece": "a"}, {"id": 98, "piece": "b"}]
    status, _, out = server.post("/detokenize", {"tokens": list("héllo".encode())})
    assert status == 200 and out["content"] == "héllo"
    assert_error(*server.post("/detokenize", {"tokens": [256]})[::2], 400, "tokens")


def test_errors(server):
    post = server.post
    assert_error(*server.request("POST", "/v1/completions", raw="{not json")[::2], 400)
    assert_error(*server.request("POST", "/v1/completions", raw="[1, 2]")[::2], 400)
    cases = [({"prompt": "x", "temperature": "hot"}, "temperature"),
             ({"prompt": "x", "temperature": 3}, "temperature"),
             ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
             ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
             ({"prompt": "x", "n": 0}, "n"),
             ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
             ({"prompt": "x", "stream": "yes"}, "stream"),
             ({"prompt": "x", "seed": "1"}, "seed"),
             ({"prompt": "x", "logprobs": 6}, "logprobs"),
             ({"prompt": 5}, "prompt"),
             ({"prompt": [300]}, "prompt"),
             ({"prompt": ""}, "prompt"),
             ({}, "prompt")]
    for body, param in cases:
        assert_error(*post("/v1/completions", {"model": "tiny", **body})[::2], 400, param)
    for body in [{}, {"messages": []}, {"messages": [{"role": "robot", "content": "x"}]},
                 {"messages": [{"role": "user", "content": 5}]},
                 {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}]:
        assert_error(*post("/v1/chat/completions", body)[::2], 400, "messages")
    assert_error(*post("/v1/completions", {"model": "gpt-4", "prompt": "x"})[::2], 404,
                 "model", "model_not_found")
    assert_error(*server.request("GET", "/v1/nothing")[::2], 404)
    assert_error(*server.request("POST", "/v1/completions", raw="x" * 70000)[::2], 413)
    status, _, out = post("/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "x" * 200}]})
    assert_error(status, out, 400, code="context_length_exceeded")
    assert "maximum context length" in out["error"]["message"]
    # The server is still healthy.
    assert complete(server, prompt="the ", max_tokens=3)["choices"][0]["text"] is not None


def test_fuzzed_bodies_never_crash_or_stall(server):
    rng = random.Random(5)
    valid = {"model": "tiny", "prompt": "the ", "max_tokens": 4, "temperature": 0.5,
             "top_p": 0.9, "top_k": 5, "seed": 1, "stop": ["x"], "n": 1, "stream": False,
             "logprobs": 1, "echo": False,
             "messages": [{"role": "user", "content": "hi"}]}
    weird = [None, True, -1, 0, 2**70, -2**70, 1e308, -0.5, "", "x" * 50, [], [1, "a"], {},
             {"a": [None]}, [[]], "\u0000\ud7ff", 3.5]
    deadline = time.monotonic() + 25
    count = 0
    for i in range(400):
        if time.monotonic() > deadline:
            break
        body = dict(valid)
        for key in rng.sample(sorted(valid), rng.randint(1, 4)):
            if rng.random() < 0.2:
                body.pop(key)
            else:
                body[key] = rng.choice(weird)
        raw = json.dumps(body)
        r = rng.random()
        if r < 0.1:
            raw = raw[:rng.randint(0, len(raw))]  # truncated
        elif r < 0.15:
            raw = "[" * rng.randint(1, 20000)  # deep nesting
        elif r < 0.2:
            raw = bytes(rng.randrange(256) for _ in range(64)).decode("latin-1")
        path = rng.choice(["/v1/completions", "/v1/chat/completions", "/tokenize",
                           "/detokenize"])
        status, hdrs, out = server.request("POST", path, raw=raw.encode("utf-8", "replace"))
        count += 1
        assert status in (200, 400, 404, 413), (status, raw[:200], out)
        if status != 200:
            assert set(out["error"]) == {"message", "type", "param", "code"}
        elif isinstance(out, str):  # a stream
            assert out.rstrip().endswith("data: [DONE]"), out[-200:]
    assert count >= 100
    assert complete(server, prompt="the ", max_tokens=3)["usage"]["completion_tokens"] == 3


def test_32_concurrent_requests_equal_their_solo_outputs(server):
    prompts = [("the quick ", "lazy dogs. ", "fox ", "over the ")[i % 4] for i in range(32)]
    bodies = [{"model": "tiny", "prompt": p, "max_tokens": 24 + (i % 5) * 4,
               "temperature": 0.8 + 0.01 * i, "top_k": 0 if i % 3 else 40,
               "top_p": 1.0 if i % 2 else 0.95, "seed": 1000 + i, "stop": "\x00"}
              for i, p in enumerate(prompts)]
    solo = [complete(server, **b)["choices"][0] for b in bodies]
    before = server.request("GET", "/health")[2]["steps"]
    barrier = threading.Barrier(len(bodies))

    def together_one(b):
        barrier.wait()
        return complete(server, **b)["choices"][0]

    together = run_threads(together_one, [(b,) for b in bodies])
    after = server.request("GET", "/health")[2]["steps"]
    assert [c["text"] for c in together] == [c["text"] for c in solo]
    assert [c["finish_reason"] for c in together] == [c["finish_reason"] for c in solo]
    # Some of them really ran batched: fewer decode steps than decoded tokens (how many share a
    # step depends on timing; BatchDecode tests in C++ pin the arithmetic for any batch).
    tokens = sum(len(c["text"].encode()) for c in solo)
    assert after - before < tokens, (after - before, tokens)


def test_api_key(model):
    with Server(model, "--api-key", "s3cret") as s:
        body = {"model": "tiny", "prompt": "a", "max_tokens": 1}
        assert_error(*s.post("/v1/completions", body)[::2], 401, code="invalid_api_key")
        assert_error(*s.post("/v1/completions", body,
                             headers={"Authorization": "Bearer nope"})[::2], 401)
        assert_error(*s.request("GET", "/v1/models")[::2], 401)
        assert s.post("/v1/completions", body,
                      headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert s.request("GET", "/health")[0] == 200


def test_full_queue_time_limit_and_disconnect(model):
    # One slot, no queue, a long context: a long generation holds the slot for seconds.
    with Server(model, "--max-batch", "1", "--max-queue", "0", "--ctx-size", "20000",
                "--timeout", "4") as s:
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps({
            "model": "tiny", "prompt": "the ", "max_tokens": 19990, "stream": True}),
            headers={"Content-Type": "application/json"})
        res = conn.getresponse()
        assert res.status == 200 and res.read1(100)
        status, hdrs, out = s.post("/v1/completions", {"model": "tiny", "prompt": "a"})
        assert_error(status, out, 503)
        assert hdrs["retry-after"] == "1"
        # Disconnect: the slot frees long before the generation would have ended.
        conn.close()
        t0 = time.monotonic()
        while s.request("GET", "/health")[2]["running"] != 0:
            assert time.monotonic() - t0 < 3.5, "the disconnected request kept its slot"
            time.sleep(0.05)
        # The time limit ends a generation with finish_reason "length".
        t0 = time.monotonic()
        status, _, out = s.post("/v1/completions", {"model": "tiny", "prompt": "the ",
                                                     "max_tokens": 19990}, timeout=60)
        assert status == 200 and out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] < 19990
        assert time.monotonic() - t0 < 15
    assert s.proc.returncode == 0


def test_context_shift_matches_ropekit_generate(model):
    # A 24-token context, 60 new tokens after a 10-token prompt: several shifts per sequence.
    with Server(model, "--ctx-size", "24", "--context-shift", "--n-keep", "2", "--max-tokens",
                "100", "--threads", "2") as s:
        out = complete(s, prompt="the quick ", max_tokens=60, temperature=0)
        (choice,) = out["choices"]
        assert choice["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 60
        ref = subprocess.run([CLI, "generate", "--model", model, "--prompt", "the quick ",
                              "--max-new-tokens", "60", "--temperature", "0", "--context-shift",
                              "--context", "24", "--n-keep", "2"], check=True,
                             capture_output=True).stdout
        assert choice["text"].encode() == ref[len(b"the quick "):-1]
        # Shifted sequences are still the same alone or batched.
        bodies = [{"prompt": p, "max_tokens": 50, "temperature": 0.9, "seed": 7 + i}
                  for i, p in enumerate(["the ", "fox jumps ", "lazy ", "over the quick "])]
        solo = [complete(s, **b)["choices"][0]["text"] for b in bodies]
        barrier = threading.Barrier(len(bodies))

        def together_one(b):
            barrier.wait()
            return complete(s, **b)["choices"][0]["text"]

        assert run_threads(together_one, [(b,) for b in bodies]) == solo
        # The prompt may fill the context, not more.
        assert complete(s, prompt="x" * 24, max_tokens=5)["usage"]["completion_tokens"] == 5
        status, _, out = s.post("/v1/completions", {"prompt": "x" * 25})
        assert_error(status, out, 400, code="context_length_exceeded")
    with Server(model, "--ctx-size", "24") as s:  # without the shift: one token must be left
        status, _, out = s.post("/v1/completions", {"prompt": "x" * 24})
        assert_error(status, out, 400, code="context_length_exceeded")
        out = complete(s, prompt="the quick ", max_tokens=60, temperature=0)
        assert out["usage"]["completion_tokens"] == 15  # the last token needs no cache row
        assert out["choices"][0]["finish_reason"] == "length"
    for bad, what in ((["--n-keep", "23"], "--n-keep 23"),
                      (["--n-keep", "4", "--n-discard", "20"], "--n-discard 20")):
        r = subprocess.run([CLI, "serve", "--model", model, "--port", "0", "--ctx-size", "24",
                            "--context-shift", *bad], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and what in r.stderr, r.stderr


def test_non_streaming_client_disconnect_cancels(model):
    import socket
    with Server(model, "--max-batch", "1", "--max-queue", "4", "--ctx-size", "20000") as s:
        body = json.dumps({"model": "tiny", "prompt": "the ", "max_tokens": 19990}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: " + str(len(body)).encode() +
                     b"\r\n\r\n" + body)
        t0 = time.monotonic()
        while s.request("GET", "/health")[2]["running"] != 1:
            assert time.monotonic() - t0 < 10, "the request never started"
            time.sleep(0.02)
        steps = s.request("GET", "/health")[2]["steps"]
        sock.close()  # gone without reading a byte
        t0 = time.monotonic()
        while s.request("GET", "/health")[2]["running"] != 0:
            assert time.monotonic() - t0 < 3, "the disconnected request kept generating"
            time.sleep(0.02)
        # It stopped long before its 19990 tokens, and the server still answers.
        assert s.request("GET", "/health")[2]["steps"] - steps < 19990
        assert complete(s, prompt="a", max_tokens=2)["usage"]["completion_tokens"] == 2
    assert s.proc.returncode == 0


def test_adapter_is_served_as_its_merged_model(model):
    # A LoRA adapter trained a few steps on the tiny model; `serve --adapter` folds it into the
    # weights as `ropekit merge` does, so its greedy output equals `generate` on the merged
    # checkpoint token for token (the same float32 weights), and differs from the base's.
    with tempdir() as tmp:
        corpus = os.path.join(tmp, "c.txt")
        with open(corpus, "w") as f:
            f.write("the lazy dogs jump over the quick brown fox. " * 200)
        adapter, merged = os.path.join(tmp, "a"), os.path.join(tmp, "m")
        shape = ["--batch-size", "4", "--seq-len", "32", "--eval-interval", "0", "--quiet"]
        subprocess.run([CLI, "train", "--corpus", corpus, "--init", model, "--out", adapter,
                        "--steps", "20", "--lr", "0.05", "--warmup", "1", "--lora-rank", "4",
                        "--lora-targets", "q_proj,v_proj,down_proj", *shape], check=True,
                       capture_output=True)
        subprocess.run([CLI, "merge", "--model", model, "--adapter", adapter, "--out", merged],
                       check=True, capture_output=True)

        def generate(m):
            return subprocess.run([CLI, "generate", "--model", m, "--prompt", "the ",
                                   "--max-new-tokens", "40", "--temperature", "0"], check=True,
                                  capture_output=True).stdout[len(b"the "):-1]

        with Server(model, "--adapter", adapter) as s:
            out = complete(s, prompt="the ", max_tokens=40, temperature=0)
        text = out["choices"][0]["text"].encode()
        assert text == generate(merged)
        assert text != generate(model)
        r = subprocess.run([CLI, "serve", "--model", model, "--port", "0", "--adapter",
                            os.path.join(tmp, "missing")], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode != 0 and "missing" in r.stderr, r.stderr

"""Shared helpers of the `ropekit serve` tests: a tiny trained checkpoint, a server process on a
free loopback port (127.0.0.1 only), and small HTTP / Server-Sent Events clients (stdlib)."""

import http.client
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time

CLI = os.environ.get("ROPEKIT_CLI")
if not CLI:
    raise RuntimeError("ROPEKIT_CLI is not set: point it at the built `ropekit` binary")

HOST = "127.0.0.1"
WORDS = ["the ", "quick ", "brown ", "fox ", "jumps ", "over ", "lazy ", "dogs. ", "User: hi\n",
         "Assistant: hello\n"]


def tiny_checkpoint(directory, steps=40, context=128):
    """Trains a tiny byte-level LLaMA for a few steps (seconds) and returns its directory."""
    corpus = os.path.join(directory, "corpus.txt")
    rng_state = 12345
    parts = []
    for _ in range(4000):
        rng_state = (rng_state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        parts.append(WORDS[(rng_state >> 33) % len(WORDS)])
    with open(corpus, "w") as f:
        f.write("".join(parts))
    out = os.path.join(directory, "tiny")
    subprocess.run([CLI, "train", "--corpus", corpus, "--out", out, "--steps", str(steps),
                    "--hidden-size", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
                    "--intermediate-size", "64", "--batch-size", "4", "--seq-len", "32",
                    "--max-position-embeddings", str(context), "--warmup", "4", "--lr", "0.01",
                    "--eval-interval", "0", "--quiet"], check=True, capture_output=True)
    return out


class Server:
    """`ropekit serve --port 0` as a context manager; .port is the bound port."""

    def __init__(self, model, *args):
        self.proc = subprocess.Popen([CLI, "serve", "--model", model, "--host", HOST, "--port",
                                      "0", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()!r}")
        self.port = int(m.group(1))
        self.url = f"http://{HOST}:{self.port}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def request(self, method, path, body=None, headers=None, timeout=60, raw=None):
        """Returns (status, headers dict (lower-case), parsed JSON or text)."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        conn.request(method, path, body=data, headers=h)
        res = conn.getresponse()
        text = res.read().decode("utf-8")
        hdrs = {k.lower(): v for k, v in res.getheaders()}
        conn.close()
        if "application/json" in hdrs.get("content-type", ""):
            return res.status, hdrs, json.loads(text)
        return res.status, hdrs, text

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)

    def stream(self, path, body, headers=None, timeout=120, on_first=None):
        """POSTs a streaming request; returns (status, list of parsed data frames, saw [DONE])."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        conn.request("POST", path, body=json.dumps(body), headers=h)
        res = conn.getresponse()
        if res.status != 200:
            return res.status, json.loads(res.read()), False
        assert res.getheader("Content-Type").startswith("text/event-stream")
        frames, done, buf = [], False, b""
        while True:
            chunk = res.read1(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                frame, buf = buf.split(b"\n\n", 1)
                for line in frame.decode("utf-8").split("\n"):
                    if line.startswith(":"):
                        continue
                    assert line.startswith("data: "), line
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        done = True
                    else:
                        if not frames and on_first:
                            on_first()
                        frames.append(json.loads(data))
        conn.close()
        return res.status, frames, done


def stream_text(frames, chat):
    """Concatenated text per choice index of a stream's frames."""
    out = {}
    for f in frames:
        for c in f.get("choices", []):
            piece = c["delta"].get("content", "") if chat else c["text"]
            out[c["index"]] = out.get(c["index"], "") + (piece or "")
    return out


def run_threads(fn, args_list):
    """Runs fn(*args) on one thread each; returns the results in order (re-raises errors)."""
    results = [None] * len(args_list)
    errors = []

    def worker(i, args):
        try:
            results[i] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def tempdir():
    return tempfile.TemporaryDirectory()


def now():
    return time.monotonic()

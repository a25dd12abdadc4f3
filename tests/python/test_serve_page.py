"""The chat page of `ropekit serve` (GET /) in headless Chromium: the page's test hook types a
prompt and sends it; the reply streams in over several chunks, the page shows tokens/s, the
console stays clean, and a screenshot of the page is a real, non-trivial image."""

import html
import os
import re
import shutil
import struct
import subprocess
import tempfile

import pytest

from serve_harness import Server, tempdir, tiny_checkpoint

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None,
                                reason="chromium is not installed (scripts/setup.sh installs it)")


def chromium(profile, *args):
    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         # Virtual time runs the page until its fetches (the streamed reply) have finished.
         "--virtual-time-budget=30000", *args],
        capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def server():
    with tempdir() as tmp:
        with Server(tiny_checkpoint(tmp), "--api-key", "k") as s:
            yield s


def dump_finished_page(url, attempts=3):
    """Chromium's --dump-dom of the page once its reply has finished (<title>done</title>).

    Virtual time can run out before the streamed reply arrives when the machine is heavily
    loaded (the server's real time does not advance with the page's virtual clock), so an
    unfinished page is loaded again, up to `attempts` times in all."""
    for _ in range(attempts):
        with tempfile.TemporaryDirectory() as tmp:
            p = chromium(os.path.join(tmp, "p"), "--dump-dom", url)
        if p.returncode != 0 or "<title>done</title>" in p.stdout:
            break
    return p


def test_page_streams_a_reply_without_console_errors(server):
    # Greedy decoding: a sampled reply can end after its first token (an end-of-turn sample),
    # which would say nothing about streaming.
    url = f"{server.url}/?prompt=the%20quick%20fox&autosend=1&key=k&temperature=0&max_tokens=32"
    p = dump_finished_page(url)
    assert p.returncode == 0, p.stderr[-2000:]
    for bad in ("Uncaught", "CONSOLE"):
        assert bad not in p.stderr, p.stderr[-3000:]
    dom = p.stdout
    assert "<title>done</title>" in dom, dom[-3000:]
    assert '<div class="user">You: the quick fox</div>' in dom
    m = re.search(r'<div class="assistant reply" id="reply-1" data-chunks="(\d+)">(.*?)</div>',
                  dom, re.S)
    assert m, dom[-3000:]
    assert int(m.group(1)) > 1, "the reply arrived in one piece, not streamed"
    # Every chunk carries at least one byte of text (greedy text may be whitespace only).
    assert len(html.unescape(m.group(2))) >= int(m.group(1))
    status = re.search(r'<div id="status">(.*?)</div>', dom, re.S).group(1)
    assert re.fullmatch(r"\d+ tokens, [\d.]+ tokens/s, first token after \d+ ms", status), \
        status


def test_page_without_the_key_shows_the_401(server):
    # The page's key field is empty: the server refuses, and the page says so (no crash).
    with tempfile.TemporaryDirectory() as tmp:
        p = chromium(os.path.join(tmp, "p"), "--dump-dom",
                     f"{server.url}/?prompt=hi&autosend=1")
    assert p.returncode == 0
    assert "error: 401" in p.stdout


def test_screenshot_is_non_trivial(server):
    with tempfile.TemporaryDirectory() as tmp:
        shot = os.path.join(tmp, "page.png")
        p = chromium(os.path.join(tmp, "p"), f"--screenshot={shot}", "--window-size=1000,700",
                     f"{server.url}/?prompt=lazy%20dogs&autosend=1&key=k")
        assert p.returncode == 0, p.stderr[-2000:]
        with open(shot, "rb") as f:
            png = f.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # IHDR
    assert (width, height) == (1000, 700)
    assert len(png) > 15_000, len(png)

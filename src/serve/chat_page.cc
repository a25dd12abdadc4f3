// The chat page (chat_page.h). Test hook: /?prompt=TEXT&autosend=1[&key=KEY] types TEXT into
// the input (and KEY into the API key field) and sends it once the page has loaded; when the reply
// is complete the page sets document.title to "done" (or "error: ...") and fills #status.
#include "src/serve/chat_page.h"

namespace ropekit::serve {

const std::string& ChatPageHtml() {
  static const std::string html = R"HTML(<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ropekit chat</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
  header { background: #27364f; color: #fff; padding: 12px 20px; font-size: 18px; }
  main { max-width: 820px; margin: 16px auto; padding: 0 16px; }
  #log { background: #fff; border: 1px solid #d5d9e0; border-radius: 8px; min-height: 320px;
         padding: 12px; white-space: pre-wrap; overflow-wrap: anywhere; }
  .user { color: #27364f; font-weight: 600; margin-top: 10px; }
  .assistant { color: #1d2330; margin: 4px 0 10px 0; font-family: ui-monospace, monospace; }
  form { display: flex; gap: 8px; margin-top: 12px; }
  textarea { flex: 1; height: 56px; font: inherit; padding: 8px; border-radius: 6px;
             border: 1px solid #b8bfcc; }
  button { padding: 0 20px; font: inherit; border: 0; border-radius: 6px; background: #3567c7;
           color: #fff; cursor: pointer; }
  button:disabled { background: #9aa6bd; }
  #controls { display: flex; gap: 14px; margin-top: 8px; font-size: 14px; color: #4a5366; }
  #controls input { width: 70px; }
  #status { margin-top: 8px; font-size: 14px; color: #4a5366; }
</style>
</head>
<body>
<header>ropekit chat</header>
<main>
  <div id="log" aria-live="polite"></div>
  <form id="form">
    <textarea id="prompt" placeholder="Type a message"></textarea>
    <button id="send" type="submit">Send</button>
  </form>
  <div id="controls">
    <label>max tokens <input id="max_tokens" type="number" value="64" min="1"></label>
    <label>temperature <input id="temperature" type="number" value="0.8" step="0.1" min="0"
      max="2"></label>
    <label>API key <input id="key" type="text" autocomplete="off" spellcheck="false"
      style="width:140px; -webkit-text-security: disc"></label>
  </div>
  <div id="status">ready</div>
</main>
<script>
"use strict";
const log = document.getElementById("log");
const statusEl = document.getElementById("status");
const history = [];
// The model id from /v1/models (undefined when the list needs a key not yet typed in: the
// server then uses its only model).
const modelReady = fetch("/v1/models").then(r => r.ok ? r.json() : null)
    .then(j => j && j.data && j.data.length ? j.data[0].id : undefined).catch(() => undefined);

function authHeaders() {
  const key = document.getElementById("key").value;
  const h = {"Content-Type": "application/json"};
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function add(cls, text) {
  const div = document.createElement("div");
  div.className = cls;
  div.textContent = text;
  log.appendChild(div);
  return div;
}

async function send(text) {
  const button = document.getElementById("send");
  button.disabled = true;
  history.push({role: "user", content: text});
  add("user", "You: " + text);
  const out = add("assistant", "");
  out.id = "reply-" + history.length;
  out.classList.add("reply");
  const model = await modelReady;
  const body = {
    model, messages: history, stream: true, stream_options: {include_usage: true},
    max_tokens: Number(document.getElementById("max_tokens").value),
    temperature: Number(document.getElementById("temperature").value),
  };
  const t0 = performance.now();
  let first = 0, tokens = 0, reply = "", serverRate = 0;
  try {
    const res = await fetch("/v1/chat/completions",
                            {method: "POST", headers: authHeaders(), body: JSON.stringify(body)});
    if (!res.ok) {
      const err = await res.json().catch(() => ({error: {message: res.statusText}}));
      throw new Error(res.status + " " + err.error.message);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of frame.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) tokens = chunk.usage.completion_tokens;
          if (chunk.timings) serverRate = chunk.timings.predicted_per_second;
          const delta = chunk.choices.length ? chunk.choices[0].delta : null;
          if (delta && delta.content) {
            if (!first) first = performance.now();
            reply += delta.content;
            out.textContent = reply;
            out.dataset.chunks = String(Number(out.dataset.chunks || 0) + 1);
            const secs = (performance.now() - first) / 1000;
            statusEl.textContent = "streaming: " + reply.length + " bytes" +
                (secs > 0 ? ", " + (reply.length / secs).toFixed(1) + " tokens/s" : "");
          }
        }
      }
    }
    history.push({role: "assistant", content: reply});
    // The server's decode rate for this reply; the browser's clock as a fallback.
    const secs = (performance.now() - (first || t0)) / 1000;
    const rate = serverRate > 0 ? serverRate.toFixed(1)
                                : tokens && secs > 0 ? (tokens / secs).toFixed(1) : "n/a";
    statusEl.textContent = tokens + " tokens, " + rate + " tokens/s, first token after " +
        ((first || performance.now()) - t0).toFixed(0) + " ms";
    document.title = "done";
  } catch (e) {
    statusEl.textContent = "error: " + e.message;
    document.title = "error: " + e.message;
  } finally {
    button.disabled = false;
  }
}

document.getElementById("form").addEventListener("submit", ev => {
  ev.preventDefault();
  const box = document.getElementById("prompt");
  const text = box.value.trim();
  if (!text) return;
  box.value = "";
  send(text);
});

const params = new URLSearchParams(location.search);
if (params.get("key") !== null) document.getElementById("key").value = params.get("key");
for (const field of ["max_tokens", "temperature"]) {
  if (params.get(field) !== null) document.getElementById(field).value = params.get(field);
}
if (params.get("prompt") !== null && params.get("autosend") === "1") {
  const box = document.getElementById("prompt");
  box.value = params.get("prompt");
  box.dispatchEvent(new Event("input"));
  document.getElementById("form").requestSubmit();
}
</script>
</body>
</html>
)HTML";
  return html;
}

}  // namespace ropekit::serve

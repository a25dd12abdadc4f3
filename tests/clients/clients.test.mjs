// ropekit serve with the real JavaScript clients: the official `openai` package and LangChain.js
// (`@langchain/openai` ChatOpenAI and OpenAI with configuration.baseURL pointing at a server on
// a free loopback port). Needs ROPEKIT_CLI (the built `ropekit` binary); trains a tiny model.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

import OpenAI from "openai";
import { ChatOpenAI, OpenAI as LangChainOpenAI } from "@langchain/openai";
import { ChatPromptTemplate } from "@langchain/core/prompts";
import { StringOutputParser } from "@langchain/core/output_parsers";

const CLI = process.env.ROPEKIT_CLI;
const KEY = "test-key";
let dir, server, baseURL;

before(async () => {
  assert.ok(CLI, "ROPEKIT_CLI must point at the built ropekit binary");
  dir = mkdtempSync(join(tmpdir(), "ropekit-clients-"));
  const words = ["the ", "quick ", "brown ", "fox ", "jumps ", "over ", "lazy ", "dogs. ",
                 "User: hi\n", "Assistant: hello\n"];
  let text = "", state = 7;
  for (let i = 0; i < 4000; ++i) {
    state = (state * 1103515245 + 12345) % 2147483648;
    text += words[state % words.length];
  }
  writeFileSync(join(dir, "corpus.txt"), text);
  const model = join(dir, "tiny");
  const train = spawnSync(CLI, ["train", "--corpus", join(dir, "corpus.txt"), "--out", model,
    "--steps", "40", "--hidden-size", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
    "--intermediate-size", "64", "--batch-size", "4", "--seq-len", "32",
    "--max-position-embeddings", "256", "--warmup", "4", "--lr", "0.01", "--eval-interval",
    "0", "--quiet"]);
  assert.equal(train.status, 0, String(train.stderr));
  server = spawn(CLI, ["serve", "--model", model, "--host", "127.0.0.1", "--port", "0",
                       "--api-key", KEY, "--threads", "2"], { stdio: ["ignore", "pipe", "inherit"] });
  const line = await new Promise((resolve, reject) => {
    createInterface({ input: server.stdout }).once("line", resolve);
    server.once("exit", (code) => reject(new Error(`server exited with ${code}`)));
  });
  const m = /listening on (http:\/\/127\.0\.0\.1:\d+)/.exec(line);
  assert.ok(m, line);
  baseURL = `${m[1]}/v1`;
});

after(async () => {
  if (server && server.exitCode === null) {
    const exited = new Promise((resolve) => server.once("exit", resolve));
    server.kill("SIGTERM");
    assert.equal(await exited, 0);
  }
  if (dir) rmSync(dir, { recursive: true, force: true });
});

const client = () => new OpenAI({ apiKey: KEY, baseURL, maxRetries: 0 });
const chat = (opts = {}) =>
  new ChatOpenAI({ model: "tiny", apiKey: KEY, configuration: { baseURL }, temperature: 0,
                   maxTokens: 24, maxRetries: 0, ...opts });

test("openai: models, completions, chat, stream with usage, n and seed, stop", async () => {
  const openai = client();
  const models = await openai.models.list();
  assert.deepEqual(models.data.map((m) => m.id), ["tiny"]);

  const done = await openai.completions.create({ model: "tiny", prompt: "the quick ",
                                                 max_tokens: 20, temperature: 0 });
  assert.equal(done.choices[0].finish_reason, "length");
  assert.equal(done.usage.completion_tokens, 20);

  const messages = [{ role: "user", content: "hi" }];
  const reply = await openai.chat.completions.create({ model: "tiny", messages, max_tokens: 24,
                                                       temperature: 0 });
  assert.equal(reply.choices[0].message.role, "assistant");
  const stream = await openai.chat.completions.create({
    model: "tiny", messages, max_tokens: 24, temperature: 0, stream: true,
    stream_options: { include_usage: true } });
  let streamed = "", usage = null;
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    if (chunk.choices.length) streamed += chunk.choices[0].delta.content ?? "";
  }
  assert.equal(streamed, reply.choices[0].message.content);
  assert.deepEqual(usage, reply.usage);

  const two = await openai.chat.completions.create({ model: "tiny", messages, max_tokens: 12,
                                                     temperature: 1, seed: 5, n: 2 });
  assert.deepEqual(two.choices.map((c) => c.index), [0, 1]);
  const again = await openai.chat.completions.create({ model: "tiny", messages, max_tokens: 12,
                                                       temperature: 1, seed: 5, n: 2 });
  assert.deepEqual(again.choices.map((c) => c.message.content),
                   two.choices.map((c) => c.message.content));

  const text = done.choices[0].text;
  const stop = text.slice(5, 7);
  const stopped = await openai.completions.create({ model: "tiny", prompt: "the quick ",
                                                    max_tokens: 20, temperature: 0, stop: [stop] });
  assert.equal(stopped.choices[0].text, text.slice(0, text.indexOf(stop)));
  assert.equal(stopped.choices[0].finish_reason, "stop");
});

test("openai: a wrong key is an AuthenticationError", async () => {
  const bad = new OpenAI({ apiKey: "wrong", baseURL, maxRetries: 0 });
  await assert.rejects(bad.chat.completions.create({ model: "tiny",
                                                     messages: [{ role: "user", content: "x" }] }),
                       (e) => e instanceof OpenAI.AuthenticationError && e.status === 401);
});

test("langchain ChatOpenAI: invoke, stream, batch, stop", async () => {
  const model = chat();
  const direct = await client().chat.completions.create({
    model: "tiny", messages: [{ role: "user", content: "hi" }], max_tokens: 24, temperature: 0 });
  const msg = await model.invoke("hi");
  assert.equal(msg.content, direct.choices[0].message.content);
  assert.equal(msg.response_metadata.finish_reason, direct.choices[0].finish_reason);

  let streamed = "";
  let chunks = 0;
  for await (const chunk of await model.stream("hi")) {
    streamed += chunk.content;
    chunks += 1;
  }
  assert.equal(streamed, msg.content);
  assert.ok(chunks > 1, "streamed in several chunks");

  const prompts = ["hi", "the fox", "lazy dogs"];
  const batch = await model.batch(prompts);
  assert.equal(batch.length, 3);
  for (let i = 0; i < 3; ++i) assert.equal(batch[i].content, (await model.invoke(prompts[i])).content);

  const full = msg.content;
  if (full.length > 4) {
    const stop = full.slice(2, 4);
    const cut = await model.invoke("hi", { stop: [stop] });
    assert.equal(cut.content, full.slice(0, full.indexOf(stop)));
  }
});

test("langchain chain: prompt template -> ChatOpenAI -> StringOutputParser", async () => {
  const prompt = ChatPromptTemplate.fromMessages([
    ["system", "You talk about {topic}."],
    ["user", "{question}"],
  ]);
  const chain = prompt.pipe(chat()).pipe(new StringOutputParser());
  const out = await chain.invoke({ topic: "foxes", question: "what jumps?" });
  assert.equal(typeof out, "string");
  const direct = await client().chat.completions.create({
    model: "tiny", max_tokens: 24, temperature: 0,
    messages: [{ role: "system", content: "You talk about foxes." },
               { role: "user", content: "what jumps?" }] });
  assert.equal(out, direct.choices[0].message.content);
});

test("langchain OpenAI (completions): invoke and n > 1", async () => {
  const llm = new LangChainOpenAI({ model: "tiny", apiKey: KEY, configuration: { baseURL },
                                    temperature: 0, maxTokens: 16, maxRetries: 0 });
  const text = await llm.invoke("the quick ");
  const direct = await client().completions.create({ model: "tiny", prompt: "the quick ",
                                                     max_tokens: 16, temperature: 0 });
  assert.equal(text, direct.choices[0].text);
  const sampled = new LangChainOpenAI({ model: "tiny", apiKey: KEY, configuration: { baseURL },
                                        temperature: 1, maxTokens: 8, n: 2, maxRetries: 0 });
  const result = await sampled.generate(["fox ", "dogs. "]);
  assert.equal(result.generations.length, 2);
  for (const g of result.generations) assert.equal(g.length, 2);
});

test("langchain: a wrong key fails with the client's authentication error", async () => {
  const bad = chat({ apiKey: "wrong" });
  await assert.rejects(bad.invoke("hi"), (e) => e.status === 401 || /401/.test(String(e)));
});

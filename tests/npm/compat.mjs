// The `openai` npm package against a cacheroute gateway, for tests/test_compat_npm.py.
//
//   node compat.mjs BASE_URL MODEL
//
// Runs a chat completion, a streamed chat completion with
// stream_options.include_usage, embeddings, models.list / models.retrieve and one
// request the gateway refuses, then prints what the client parsed as one JSON
// object on stdout; the Python test asserts on it (content, usage, the real
// Llama-3 token counts, the error the client raised). Exits 1 on anything the
// client threw where nothing should have failed.
import { readFileSync } from "node:fs";
import OpenAI from "openai";

const [baseURL, model] = process.argv.slice(2);
if (!baseURL || !model) {
  console.error("usage: node compat.mjs BASE_URL MODEL");
  process.exit(2);
}

// The same conversations the Python side counts tokens for.
const CHAT = [
  { role: "system", content: "You are terse." },
  { role: "user", content: "  Name three uses of a KV cache.  " },
];
const STREAMED = [{ role: "user", content: "Qu'est-ce qu'un cache ? 日本語, emoji 🚀." }];

const client = new OpenAI({ baseURL, apiKey: "x", maxRetries: 0, timeout: 30_000 });

// The version the lockfile installed, as the client reports itself in its User-Agent.
const installed = JSON.parse(readFileSync(new URL("./node_modules/openai/package.json", import.meta.url)));
const out = { version: installed.version };

const chat = await client.chat.completions.create({ model, messages: CHAT, max_tokens: 8 });
out.chat = {
  content: chat.choices[0].message.content,
  finish_reason: chat.choices[0].finish_reason,
  usage: chat.usage,
};

const stream = await client.chat.completions.create({
  model,
  messages: STREAMED,
  max_tokens: 6,
  stream: true,
  stream_options: { include_usage: true },
});
let text = "";
let chunks = 0;
let usage = null;
let usageChunks = 0;
for await (const chunk of stream) {
  chunks += 1;
  text += chunk.choices[0]?.delta?.content ?? "";
  if (chunk.usage) {
    usage = chunk.usage;
    usageChunks += 1;
  }
}
out.stream = { content: text, chunks, usage, usage_chunks: usageChunks };

const emb = await client.embeddings.create({ model, input: ["a knowledge block", "another one"] });
out.embeddings = {
  count: emb.data.length,
  dims: emb.data.map((d) => d.embedding.length),
  indexes: emb.data.map((d) => d.index),
  usage: emb.usage,
};

const models = [];
for await (const m of client.models.list()) models.push(m.id);
const card = await client.models.retrieve(model);
out.models = { ids: models, retrieved: { id: card.id, owned_by: card.owned_by, created: card.created } };

try {
  await client.chat.completions.create({ model, messages: CHAT, max_tokens: -1 });
  out.refused = null;
} catch (e) {
  if (!(e instanceof OpenAI.APIError)) throw e;
  out.refused = { class: e.constructor.name, status: e.status, message: e.message };
}

console.log(JSON.stringify(out));

"""The clients people point at an OpenAI endpoint, through a gateway in front of
two sims: the `openai` package (sync, async, streaming with usage and with
continuous usage, echo with prompt logprobs) and LangChain's ChatOpenAI. Every request succeeds and the
input length each reports is the real Llama-3 token count, computed here with
the `tokenizers` package from conf/tokenizers/llama3/tokenizer.json."""

from __future__ import annotations

import asyncio

import openai
import pytest

from crtest import MODEL, client
from llama3 import TOKENIZER, chat_tokens, prompt_ids, prompt_tokens

# Varied chats: whitespace the template trims, multi-turn, unicode, code, long.
CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three uses of a KV cache."}],
    [{"role": "user", "content": "   padded on both sides   \n"}],
    [{"role": "user", "content": "Qu'est-ce qu'un cache ? 日本語のテキスト, emoji 🚀."}],
    [{"role": "user", "content": "def f(x):\n    return x ** 2\n\nExplain."},
     {"role": "assistant", "content": "It squares x."}, {"role": "user", "content": "And f(3)?"}],
    [{"role": "user", "content": "Summarise: " + "the quick brown fox jumps over the lazy dog. " * 60}],
]


@pytest.fixture
def fleet(sim, gateway):
    a, b = sim(), sim()
    g = gateway(upstreams=[a.url, b.url])
    return g


def test_openai_sync_chat_and_completions_report_real_token_counts(fleet):
    oa = openai.OpenAI(base_url=fleet.v1, api_key="x", max_retries=0, timeout=30)
    for messages in CHATS:
        r = oa.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
        assert r.choices[0].message.content
        assert r.usage.prompt_tokens == chat_tokens(messages), messages
        assert r.usage.completion_tokens == 8
    for prompt in ("Once upon a time", "  spaces stay in completions  ", "数字 12345 and more"):
        r = oa.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
        assert r.usage.prompt_tokens == prompt_tokens(prompt), prompt
    # The gateway's /tokenize (passed through to a sim) agrees with the tokenizers package.
    with client() as c:
        t = c.post(fleet.url + "/tokenize", json={"model": MODEL, "messages": CHATS[4]}).json()
    assert t["count"] == chat_tokens(CHATS[4])
    models = oa.models.list().data
    assert [m.id for m in models] == [MODEL]
    card = oa.models.retrieve(MODEL)
    assert card.owned_by == "vllm" and card.created > 0
    emb = oa.embeddings.create(model=MODEL, input=["a", "b"])
    assert len(emb.data) == 2 and emb.data[0].embedding
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=MODEL, messages=CHATS[0], max_tokens=-1)
    assert "max_tokens: expected a non-negative integer, got -1" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="no-such-model", messages=CHATS[0])
    oa.close()


def test_openai_async_concurrent_requests_all_succeed(fleet):
    async def run():
        oa = openai.AsyncOpenAI(base_url=fleet.v1, api_key="x", max_retries=0, timeout=60)
        try:
            jobs = [oa.chat.completions.create(model=MODEL, messages=CHATS[i % len(CHATS)], max_tokens=4)
                    for i in range(48)]
            return await asyncio.gather(*jobs)
        finally:
            await oa.close()
    results = asyncio.run(run())
    assert len(results) == 48
    for i, r in enumerate(results):
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == chat_tokens(CHATS[i % len(CHATS)])


@pytest.mark.parametrize("continuous", [False, True])
def test_openai_streaming_with_usage(fleet, continuous):
    oa = openai.OpenAI(base_url=fleet.v1, api_key="x", max_retries=0, timeout=30)
    options = {"include_usage": True, **({"continuous_usage_stats": True} if continuous else {})}
    stream = oa.chat.completions.create(model=MODEL, messages=CHATS[1], max_tokens=6, stream=True,
                                        stream_options=options)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    final = chunks[-1]
    assert final.choices == [] and final.usage.prompt_tokens == chat_tokens(CHATS[1])
    assert final.usage.completion_tokens == 6
    per_chunk = [c.usage for c in chunks[:-1]]
    if continuous:
        assert all(u is not None and u.prompt_tokens == final.usage.prompt_tokens for u in per_chunk)
        produced = [u.completion_tokens for c, u in zip(chunks, per_chunk) if c.choices and c.choices[0].delta.content]
        assert produced == list(range(1, 7))
    else:
        assert all(u is None for u in per_chunk)
    oa.close()


def test_openai_echo_with_logprobs_returns_the_prompts_too(fleet):
    """vLLM's echo with logprobs on /v1/completions: one entry per prompt token (the
    first with a null logprob), then the generated ones; offsets run over the
    tokens' texts from 0; the raw `prompt_logprobs` beside them. Chat gets
    `prompt_logprobs` as vLLM's extra parameter."""
    oa = openai.OpenAI(base_url=fleet.v1, api_key="x", max_retries=0, timeout=30)
    prompt = "Caches keep façades fast: 日本語 too."
    ids = prompt_ids(prompt)
    real = [TOKENIZER.decode([i], skip_special_tokens=False) for i in ids]
    r = oa.completions.create(model=MODEL, prompt=prompt, max_tokens=5, echo=True, logprobs=2)
    ch = r.choices[0]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 5
    lp = ch.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == len(lp.top_logprobs) == len(ids) + 5
    assert lp.tokens[:len(ids)] == real, "the prompt's tokens, as the real tokenizer has them"
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x < 0 for x in lp.token_logprobs[1:])
    assert ch.text.startswith(prompt) and ch.text == prompt + "".join(lp.tokens[len(ids):])
    offsets = [0]
    for t in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp.text_offset == offsets
    for tok, lprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[tok] == lprob and 1 <= len(top) <= 3, "itself and up to logprobs + 1 in all"
    raw = ch.model_extra["prompt_logprobs"]
    assert raw[0] is None and len(raw) == len(ids)
    for pos, step in enumerate(raw[1:], start=1):
        own = step[str(ids[pos])]
        assert own["decoded_token"] == real[pos] and own["logprob"] == lp.token_logprobs[pos] and own["rank"] >= 1
    # Streamed: the first chunk carries the prompt's tokens and the first generated one.
    chunks = list(oa.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, logprobs=0,
                                        stream=True))
    first = chunks[0].choices[0]
    assert first.text.startswith(prompt)
    assert first.logprobs.tokens[:len(ids)] == real and len(first.logprobs.tokens) == len(ids) + 1
    assert chunks[1].choices[0].logprobs.text_offset == [len(first.text)]
    # Chat: vLLM's `prompt_logprobs` (top-level), one entry per prompt token.
    c = oa.chat.completions.create(model=MODEL, messages=CHATS[1], max_tokens=2, extra_body={"prompt_logprobs": 1})
    plp = c.model_extra["prompt_logprobs"]
    assert len(plp) == c.usage.prompt_tokens == chat_tokens(CHATS[1]) and plp[0] is None
    assert all(1 <= len(step) <= 2 for step in plp[1:])
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model=MODEL, prompt=prompt, max_tokens=2, stream=True,
                              extra_body={"prompt_logprobs": 1})
    assert "`prompt_logprobs` are not available when `stream=True`." in str(e.value)
    oa.close()


def test_langchain_chat_openai(fleet):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=fleet.v1, api_key="x", max_tokens=8, max_retries=0, timeout=30)
    messages = [("system", "You are terse."), ("human", "Name three uses of a KV cache.")]
    as_dicts = [{"role": "system" if r == "system" else "user", "content": c} for r, c in messages]
    reply = llm.invoke(messages)
    assert reply.content
    assert reply.usage_metadata["input_tokens"] == chat_tokens(as_dicts)
    assert reply.usage_metadata["output_tokens"] == 8
    replies = llm.batch([[("human", m[0]["content"])] for m in CHATS[:3]])
    for r, m in zip(replies, CHATS[:3]):
        assert r.usage_metadata["input_tokens"] == chat_tokens([{"role": "user", "content": m[0]["content"]}])
    streamed = ChatOpenAI(model=MODEL, base_url=fleet.v1, api_key="x", max_tokens=5, max_retries=0, timeout=30,
                          stream_usage=True)
    total = None
    for piece in streamed.stream(messages):
        total = piece if total is None else total + piece
    assert total is not None and total.content
    assert total.usage_metadata["input_tokens"] == chat_tokens(as_dicts)

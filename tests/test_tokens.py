"""Exact Llama-3 token counts: the sim counts a Llama-3 model's prompt as the real
engine does (Meta's tokenizer, the chat template's `trim`), and GPU profiles are
chosen by short name.

Expected counts are built from literal Meta-Llama-3 ids (verified against HF
tokenizers, Meta's tiktoken reference and llama3-tokenizer-js; see
kdn/tests/data/llama3_expected_ids.json), not from the code under test.
"""

from __future__ import annotations

from crtest import MODEL, client

BOS, START, END, EOT, NL2 = 128000, 128006, 128007, 128009, 271
ROLE = {"user": [882], "assistant": [78191]}
CONTENT = {
    "The quick brown fox jumps over the lazy dog.":
        [791, 4062, 14198, 39935, 35308, 927, 279, 16053, 5679, 13],
    "Hello, world! How are you today?": [9906, 11, 1917, 0, 2650, 527, 499, 3432, 30],
    "Hello world!": [9906, 1917, 0],
}


def llama3_chat_ids(messages: list[tuple[str, str]]) -> list[int]:
    """Meta's Llama-3 template: BOS, then per message the header, "\\n\\n", the trimmed
    content and <|eot_id|>, then the assistant header (generation prompt)."""
    ids = [BOS]
    for role, content in messages:
        ids += [START, *ROLE[role], END, NL2, *CONTENT[content.strip()], EOT]
    return ids + [START, *ROLE["assistant"], END, NL2]


MESSAGES = [
    ("user", "  The quick brown fox jumps over the lazy dog.\n"),
    ("assistant", "Hello, world! How are you today?"),
    ("user", "\tHello world!  \n\n"),
]


def prompt_tokens(url: str, path: str, body: dict) -> int:
    with client() as c:
        r = c.post(url + path, json=body)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens"]


def chat(model: str) -> dict:
    return {"model": model, "max_tokens": 1,
            "messages": [{"role": r, "content": t} for r, t in MESSAGES]}


def test_sim_counts_a_llama3_chat_exactly(sim):
    want = llama3_chat_ids(MESSAGES)
    assert len(want) == 42
    s = sim()  # MODEL is llama3-8b: the embedded tokenizer by default
    assert prompt_tokens(s.url, "/v1/chat/completions", chat(MODEL)) == len(want)
    # raw completions: BOS + ids; without special tokens, the ids alone
    text = "Hello, world! How are you today?"
    body = {"model": MODEL, "prompt": text, "max_tokens": 1}
    assert prompt_tokens(s.url, "/v1/completions", body) == 1 + len(CONTENT[text])
    body["add_special_tokens"] = False
    assert prompt_tokens(s.url, "/v1/completions", body) == len(CONTENT[text])


def test_the_approximation_stays_for_other_models_and_on_request(sim):
    want = len(llama3_chat_ids(MESSAGES))
    other = prompt_tokens(sim(model="mistral-7b").url, "/v1/chat/completions", chat("mistral-7b"))
    asked = prompt_tokens(sim(extra=["--tokenizer", "approx"]).url, "/v1/chat/completions", chat(MODEL))
    # the approximation cuts words into pieces of at most 4 characters: more tokens, and
    # the same count in every process
    assert other == asked > want


def test_profiles_by_short_name(sim, gateway):
    s = sim(zero_latency=False, time_scale=1000.0, extra=["--profile", "rtx5090x8-llama3-70b"])
    gw = gateway(config={"proxy": {"profile": "h100x8-llama3-70b-tp8"},
                         "pools": [{"name": "p", "models": [MODEL], "instances": [{"url": s.url}]}]})
    assert prompt_tokens(gw.url, "/v1/chat/completions", chat(MODEL)) == len(llama3_chat_ids(MESSAGES))

"""The real Llama-3 token counts the compatibility tests compare against: the
`tokenizers` package on the repo's copy of Meta's tokenizer
(conf/tokenizers/llama3/tokenizer.json), with Llama-3's chat template written
out here (content trimmed, generation prompt added), as vLLM counts them."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "conf/tokenizers/llama3"
TOKENIZER = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))


def chat_tokens(messages: list[dict]) -> int:
    """Prompt tokens of a chat: the rendered template encoded without adding
    special tokens (the template has BOS), as vLLM does for chat."""
    text = "<|begin_of_text|>"
    for m in messages:
        text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
    text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
    return len(TOKENIZER.encode(text, add_special_tokens=False).ids)


def prompt_tokens(prompt: str) -> int:
    """Prompt tokens of a completion: BOS added, as vLLM does by default."""
    return len(TOKENIZER.encode(prompt, add_special_tokens=True).ids)


def prompt_ids(prompt: str) -> list[int]:
    return TOKENIZER.encode(prompt, add_special_tokens=True).ids

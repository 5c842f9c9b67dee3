"""The repository stands alone: nothing points a reader at documents outside it (the
developers' shared research notes and design), and every local link in the Markdown
files leads to a file that is there.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUTSIDE = re.compile(r"\.\./shared|shared/(research|DESIGN|STYLE|calibration|bench|tokenizers)"
                     r"|research(/| §| notes? §)|cacheroute\.md §")
SKIP = ("conf/tokenizers/", "benches/results/", "tests/test_repo_stands_alone.py")
TEXT = (".rs", ".md", ".py", ".toml", ".sh", ".yaml", ".yml", ".json", ".js", ".html", ".lua", ".in")


def tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    return [f for f in out.stdout.splitlines() if f.endswith(TEXT) and not f.startswith(SKIP)]


def test_no_pointer_to_documents_outside_the_repository():
    hits = []
    for f in tracked():
        try:
            text = (REPO / f).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{f}:{n}: {line.strip()[:120]}")
    assert not hits, "pointers to documents a user of the repository does not have:\n" + "\n".join(hits)


def test_local_markdown_links_resolve():
    link = re.compile(r"\]\(([^)\s]+)\)")
    broken = []
    for f in tracked():
        if not f.endswith(".md"):
            continue
        base = (REPO / f).parent
        for target in link.findall((REPO / f).read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if path and not (base / path).exists():
                broken.append(f"{f}: {target}")
    assert not broken, "Markdown links to missing files:\n" + "\n".join(broken)

"""mkdocs hook: the site's home page is the repository's README.md.

README.md links to the documentation as ``docs/<page>.md`` (so that the links work on a
code host); on the site the same pages sit beside index.md, so the ``docs/`` prefix of
relative links and image paths is dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

_README = Path(__file__).resolve().parents[1] / "README.md"


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != "index.md":
        return markdown
    text = _README.read_text(encoding="utf-8")
    text = re.sub(r"\]\(docs/", "](", text)
    # links to repository files outside docs/ (LICENSE, ...) have no page on the site
    return re.sub(r"\[([^\]]+)\]\((?!https?://|#)([^)]+?)\)",
                  lambda m: m.group(0) if m.group(2).split("#")[0].endswith(".md")
                  or m.group(2).startswith("images/") else m.group(1), text)

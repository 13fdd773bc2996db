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
    return re.sub(r"\]\(docs/", "](", text)

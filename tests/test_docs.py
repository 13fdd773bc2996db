"""The documentation site: `mkdocs build --strict` passes, every link in it resolves, and
the benchmark tables quote figures that are in benchmarks/results/*.json."""

import json
import math
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).parents[1]


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        for name in ("href", "src"):
            if attrs.get(name) and (tag, name) in (("a", "href"), ("img", "src"),
                                                   ("link", "href"), ("script", "src")):
                self.links.append(attrs[name])


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="the site needs the docs extra (pip install '.[docs]')")
    pytest.importorskip("mkdocstrings", reason="the API pages need the docs extra")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stderr


def test_site_builds_without_warnings(site):
    out, log = site
    assert "WARNING" not in log, log
    for page in ("index.html", "demo/index.html", "usage/index.html", "reference/index.html",
                 "benchmarks/index.html", "guarantees/index.html"):
        assert (out / page).is_file(), page
    home = (out / "index.html").read_text(encoding="utf-8")
    assert "make demo" in home and "images/removal.png" in home   # the README, as home page
    reference = (out / "reference" / "index.html").read_text(encoding="utf-8")
    assert "finalize_features" in reference and "subset_retraining" in reference


def test_every_link_of_the_site_resolves(site):
    out, _ = site
    # 404.html is served from any depth, so mkdocs writes it with root-absolute links
    pages = {path: _parse(path) for path in out.rglob("*.html") if path.name != "404.html"}
    checked = 0
    for path, parsed in pages.items():
        for link in parsed.links:
            parts = urlsplit(link)
            if parts.scheme or link.startswith("//") or link.startswith("mailto:"):
                continue                                  # external: not fetched here
            if not parts.path:
                target = path
            elif parts.path.startswith("/"):
                target = out / unquote(parts.path).lstrip("/")
            else:
                target = (path.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            assert target.exists(), f"{path.relative_to(out)}: broken link {link}"
            if parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                assert parts.fragment in ids, f"{path.relative_to(out)}: no #{parts.fragment} in {link}"
            checked += 1
    assert checked > 100


def _json_numbers():
    values = []

    def walk(x):
        if isinstance(x, bool):
            return
        if isinstance(x, (int, float)) and math.isfinite(x):
            values.append(float(x))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        walk(json.loads(path.read_text()))
    return values


# units the tables use for JSON values: as is, GFLOP/s from FLOP/s, MiB from bytes, ms, %
_SCALES = (1.0, 1e-9, 1 / 2**20, 1 / 2**30, 1e3, 1e-3, 100.0)


def test_benchmark_tables_quote_the_json():
    """Every number of at least three significant digits in the benchmark tables of the
    docs is, at its printed precision, a figure of benchmarks/results/*.json."""
    values = _json_numbers()
    missing, seen = [], 0
    for page in ("benchmarks.md", "scaling.md", "structured.md", "speed.md"):
        for number, line in enumerate((ROOT / "docs" / page).read_text().splitlines(), 1):
            if not line.startswith("|") or set(line) <= set("|-: "):
                continue
            for token in re.findall(r"(?<![\w.^·])-?\d[\d,]*(?:\.\d+)?(?![\w^⁰-⁹])", line):
                digits = token.replace(",", "").replace("-", "").replace(".", "").lstrip("0")
                if len(digits) < 3:
                    continue                              # counts, k, batch sizes, ratios
                x = float(token.replace(",", ""))
                decimals = len(token.split(".")[1]) if "." in token else 0
                tol = 0.5 * 10 ** -decimals * 1.0001
                seen += 1
                if not any(abs(v * s - x) <= tol for v in values for s in _SCALES):
                    missing.append(f"docs/{page}:{number}: {token}")
    assert seen > 100
    assert not missing, missing

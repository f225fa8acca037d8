"""The docs site: it builds strictly, and its pages render in a headless browser with title, tables and navigation."""

import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built from this checkout's docs/ and mkdocs.yml, strictly (a broken link or missing page fails)."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)]
    subprocess.run(build, check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    return out


def rendered_dom(page, profile):
    """The page's DOM after headless Chromium has loaded it and run its scripts (no network, fresh profile)."""
    command = [
        shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
        "--dump-dom", page.as_uri(),
    ]
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=120).stdout


class Outline(HTMLParser):
    """What a reader sees of a page's structure: its title, tables, navigation links and headings."""

    def __init__(self):
        super().__init__()
        self.title, self.tables, self.nav_links, self.headings = "", 0, [], []
        self._in = []

    def handle_starttag(self, tag, attrs):
        self._in.append(tag)
        self.tables += tag == "table"

    def handle_endtag(self, tag):
        if tag in self._in:
            del self._in[len(self._in) - 1 - self._in[::-1].index(tag):]

    def handle_data(self, data):
        text = data.strip()
        if not text:
            return
        if "title" in self._in:
            self.title += text
        elif "nav" in self._in and "a" in self._in:
            self.nav_links.append(text)
        elif any(h in self._in for h in ("h1", "h2", "h3")):
            self.headings.append(text)


def outline(site, page, tmp_path):
    if shutil.which("chromium") is None:
        message = "needs Debian's chromium (apt-get install chromium); .ci/run installs it"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)   # never skipped in CI
    parsed = Outline()
    parsed.feed(rendered_dom(site / page, tmp_path / page.replace("/", "-")))
    return parsed


def test_the_index_renders_with_its_title_a_table_and_the_navigation(site, tmp_path):
    page = outline(site, "index.html", tmp_path)
    assert page.title.startswith("handprop")
    assert page.tables >= 1
    for entry in ("Using handprop", "Results", "How correctness is proven", "Layers"):
        assert entry in page.nav_links, page.nav_links


def test_an_api_page_renders_the_layers_from_their_docstrings(site, tmp_path):
    page = outline(site, "api/layers/index.html", tmp_path)
    assert page.title.startswith("Layers")
    assert "Home" in page.nav_links
    for layer in ("Linear", "BatchNorm1d", "LayerNorm", "CausalSelfAttention"):
        assert any(layer in heading for heading in page.headings), layer

"""The documentation site as built by `make docs` (docs/_build/html): its internal links, and
the site in a real browser (headless Chromium, driven by playwright).

`make test` builds the site before running the suite, so these tests read what the build just
wrote; a missing site fails them (it is never a skip). CI's second leg runs the suite without
building the docs and deselects them with `-m "not docs"`. The browser tests need Debian's
`chromium` (`make test` installs it as root); where none can be installed they are skipped and
say so, except where JBN_REQUIRE_BROWSER=1 (CI's first leg) makes that a failure.
"""

import html
import html.parser
import importlib.util
import os
import pathlib
import re
import shutil
import urllib.parse

import pytest

SITE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "_build" / "html"
# What the browser test runs Chromium with: no sandbox (containers, root), and nothing that
# reaches for the network (which may be closed) or a GPU.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.docs


@pytest.fixture(scope="module")
def site() -> pathlib.Path:
    if not (SITE / "index.html").exists():
        pytest.fail(
            f"the documentation site is not built ({SITE}): run `make docs` first (`make test` "
            "does), or deselect these tests with -m 'not docs'"
        )
    return SITE


class _Links(html.parser.HTMLParser):
    """The `href`/`src` of every element and every `id` of one page."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.links.append(value)
            elif name == "id" and value:
                self.ids.add(value)


def _parse(path: pathlib.Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def broken_internal_links(site: pathlib.Path) -> list[str]:
    """Every link from a page of `site` to a file of the site that does not exist, or to an
    anchor its target page does not have (external links are not followed)."""
    # The theme's Jinja macro files in _static/ end in .html but are not pages.
    pages = {
        path: _parse(path)
        for path in site.rglob("*.html")
        if "_static" not in path.relative_to(site).parts
    }
    broken = []
    for page, parsed in pages.items():
        for link in parsed.links:
            url = urllib.parse.urlsplit(link)
            if url.scheme or link.startswith("//"):
                continue
            target = (page.parent / urllib.parse.unquote(url.path)).resolve() if url.path else page
            if target.is_dir():
                target = target / "index.html"
            where = f"{page.relative_to(site)} -> {link}"
            if not target.exists():
                broken.append(where)
            elif url.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if urllib.parse.unquote(url.fragment) not in ids:
                    broken.append(where + " (no such anchor)")
    return broken


def test_internal_links_resolve(site):
    assert len(list(site.rglob("*.html"))) > 20  # the guides, results and API pages
    assert broken_internal_links(site) == []


def test_broken_links_are_found(tmp_path):
    (tmp_path / "index.html").write_text(
        '<a href="a.html#here">fine</a> <a href="missing.html">gone</a> '
        '<a href="a.html#nowhere">no anchor</a> <a href="https://example.org/x">external</a>'
    )
    (tmp_path / "a.html").write_text('<h1 id="here">A</h1>')
    assert broken_internal_links(tmp_path) == [
        "index.html -> missing.html",
        "index.html -> a.html#nowhere (no such anchor)",
    ]


def _formula_blocks():
    """docs/_ext/formula_blocks.py, the build's extension, as a module."""
    path = SITE.parents[1] / "_ext" / "formula_blocks.py"
    spec = importlib.util.spec_from_file_location("formula_blocks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docstring_formulas_are_code_blocks(site):
    """An indented formula below a docstring's 'text:' is a code block, line for line: no API
    page has a block quote (which joins the lines into one paragraph)."""
    pages = sorted((site / "api").rglob("*.html"))
    assert len(pages) > 20
    quoting = [str(p.relative_to(site)) for p in pages if "<blockquote" in p.read_text("utf-8")]
    assert quoting == []
    page = (site / "api" / "_autosummary" / "jbn.fused_batch_norm.html").read_text("utf-8")
    blocks = [
        html.unescape(re.sub(r"<[^>]*>", "", block))
        for block in re.findall(r"<pre>(.*?)</pre>", page, flags=re.S)
    ]
    assert any(
        "\ny = (x - mean) / sqrt(var + epsilon) * scale + offset" in block for block in blocks
    ), blocks


def test_formula_blocks_leaves_markup_and_code_alone():
    lines = [
        "The update, per feature:",
        "",
        "    y = a * x,    z = b",
        "",
        "Code::",
        "",
        "    def f(x):",
        "",
        "        return x",
        "",
        "A list:",
        "",
        "  - one",
        "",
        "An example:",
        "",
        "    >>> f(1)",
        "    1",
        "",
        ">>> f(2)",
        "2",
        "",
        "    2",
        "",
        "A sentence.",
        "",
        "    y = f(x)",
    ]
    expected = lines.copy()
    expected[0] = "The update, per feature::"
    expected[-3] = "A sentence. ::"
    _formula_blocks().mark_literal_blocks(lines)
    assert lines == expected


@pytest.fixture(scope="module")
def browser(site):
    executable = shutil.which("chromium")
    if executable is None:
        message = "no Chromium here: install Debian's chromium package (make test does as root)"
        if os.environ.get("JBN_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    yield page
    page.close()


def test_index_renders(site, page, tmp_path):
    page.goto((site / "index.html").as_uri())
    assert "batch normalization for JAX" in page.locator("h1").first.inner_text()
    navigation = page.locator("nav").all_inner_texts()
    for title in ("Getting started", "API reference", "Results"):
        assert any(title in text for text in navigation), title
    # The theme's stylesheet and scripts loaded: the sidebar is laid out beside the article.
    sidebar = page.locator(".bd-sidebar-primary").bounding_box()
    article = page.locator("article").bounding_box()
    assert sidebar is not None and article is not None and sidebar["x"] < article["x"]
    page.screenshot(path=tmp_path / "index.png", full_page=False)


def test_api_page_shows_signature(site, page):
    page.goto((site / "api" / "_autosummary" / "jbn.fused_batch_norm.html").as_uri())
    signature = " ".join(page.locator("dt.sig").first.inner_text().split())
    assert signature.startswith("jbn.fused_batch_norm(x, scale=None, offset=None, *,"), signature
    for argument in (
        "epsilon=0.001",
        "axis=-1",
        "axis_name=None",
        "mask=None",
        "return_count=False",
    ):
        assert argument in signature, argument
    assert "Training-mode batch norm" in page.locator("article").inner_text()


def test_search_finds_renorm(site, page):
    page.goto((site / "search.html").as_uri() + "?q=renorm")
    results = page.locator("ul.search li")
    results.first.wait_for(timeout=30_000)  # the search index loads and runs in JavaScript
    texts = results.all_inner_texts()
    assert any("jbn.batch_renorm" in text for text in texts), texts[:10]

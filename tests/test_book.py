"""The book pipeline on a tiny temporary book: two chapters and one plain page, executed by a real kernel."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import nbformat
import pytest
import yaml

from emolib.cache import project_root
from emolib.pipeline import book as bk
from emolib.pipeline.cli import main

HEADER = """\
---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---
"""

ALPHA = (
    HEADER
    + """
# Alpha

```{code-cell} ipython3
:tags: [parameters]
preset = "full"
n_items = 3
```

```{code-cell} ipython3
print(f"alpha preset={preset} n_items={n_items}")
```

```{math}
:label: eq-alpha
y = a x + b
```

The line {eq}`eq-alpha`.
"""
)

BETA = (
    HEADER
    + """
# Beta

```{code-cell} ipython3
:tags: [parameters]
preset = "full"
```

```{code-cell} ipython3
print(f"beta preset={preset}")
```
"""
)

FAILING_CELL = """
```{code-cell} ipython3
raise ValueError("planted failure in beta")
```
"""

INTRO = """\
# Tiny book

A plain page with an equation $e^{i\\pi} + 1 = 0$ and a citation {cite:p}`shu2026syntax`.

```{bibliography}
```
"""

TOC = """\
format: jb-book
root: book/intro
parts:
  - caption: Chapters
    chapters:
      - file: book/01_alpha
      - file: book/02_beta
"""

BIB = """\
@misc{shu2026syntax,
  author = {Shu, Bangzhao and Singh, Arinjay and ElSherief, Mai},
  title  = {From Syntax to Emotion: A Mechanistic Analysis of Emotion Inference in {LLMs}},
  year   = {2026},
}
"""


@pytest.fixture
def tiny(tmp_path: Path) -> bk.Book:
    root = tmp_path / "tiny"
    (root / "book").mkdir(parents=True)
    shutil.copy(project_root() / "_config.yml", root / "_config.yml")  # the real config, warnings-as-errors
    (root / "_toc.yml").write_text(TOC)
    (root / "references.bib").write_text(BIB)
    (root / "book" / "intro.md").write_text(INTRO)
    (root / "book" / "01_alpha.md").write_text(ALPHA)
    (root / "book" / "02_beta.md").write_text(BETA)
    return bk.Book.at(root, tmp_path / "build")


def _page(book: bk.Book, name: str) -> bk.Page:
    return next(p for p in book.pages() if p.name == name)


def _stdout(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_toc_order_and_kinds(tiny):
    pages = tiny.pages()
    assert [p.docname for p in pages] == ["book/intro", "book/01_alpha", "book/02_beta"]
    assert [p.is_chapter for p in pages] == [False, True, True]
    assert [c.name for c in tiny.chapters(["book/02_beta.md"])] == ["02_beta"]
    with pytest.raises(bk.BookError, match="no chapter 'nope'"):
        tiny.chapters(["nope"])


def test_missing_toc_file_is_named(tiny):
    (tiny.root / "book" / "02_beta.md").unlink()
    with pytest.raises(bk.BookError, match="02_beta"):
        tiny.pages()


def test_overrides_parse_as_literals():
    assert bk.parse_overrides(["n=3", "x=0.5", "name=abc", "flag=True", "xs=[1, 2]"]) == {
        "n": 3,
        "x": 0.5,
        "name": "abc",
        "flag": True,
        "xs": [1, 2],
    }
    with pytest.raises(bk.BookError):
        bk.parse_overrides(["novalue"])
    with pytest.raises(bk.BookError, match="--preset"):
        bk.parse_overrides(["preset=quick"])


def test_executed_notebook_gets_preset_override_and_stamp(tiny):
    page = _page(tiny, "01_alpha")
    out = bk.execute_chapter(tiny, page, "quick", {"n_items": 7, "undefined_elsewhere": 1})
    assert out == tiny.build / "executed" / "01_alpha.ipynb"
    assert "alpha preset=quick n_items=7" in _stdout(out)
    stamp = nbformat.read(out, as_version=4).metadata[bk.METADATA_KEY]
    assert stamp["preset"] == "quick"
    assert stamp["parameters"] == {"preset": "quick", "n_items": 7}  # only names its parameters cell defines
    assert stamp["source"] == "book/01_alpha.md"
    assert stamp["source_sha256"] == bk.sha256_bytes(page.source.read_bytes())
    assert {"git", "executed_utc", "run_seconds", "emolib_version"} <= set(stamp)
    assert bk.check_executed(tiny, page, "quick") == stamp


def test_failing_cell_fails_the_run_and_leaves_no_executed_copy(tiny):
    page = _page(tiny, "02_beta")
    bk.execute_chapter(tiny, page, "quick")
    assert tiny.executed_path(page).is_file()  # a good copy from an earlier run...
    page.source.write_text(BETA + FAILING_CELL)
    with pytest.raises(bk.ChapterFailedError) as info:
        bk.execute_chapter(tiny, page, "quick")
    message = str(info.value)
    assert "02_beta" in message and "planted failure in beta" in message and "ValueError" in message
    assert not tiny.executed_path(page).exists()  # ...is gone, not left to be published
    assert (tiny.build / "failed" / "02_beta.ipynb").is_file()
    assert not list((tiny.build / "running").glob("*"))


def test_stale_source_or_other_preset_is_refused(tiny):
    page = _page(tiny, "02_beta")
    with pytest.raises(bk.StaleNotebookError, match="no executed notebook"):
        bk.check_executed(tiny, page, "quick")
    bk.execute_chapter(tiny, page, "quick")
    with pytest.raises(bk.StaleNotebookError, match="preset 'quick', not 'full'"):
        bk.check_executed(tiny, page, "full")
    page.source.write_text(BETA + "\nOne more sentence.\n")
    with pytest.raises(bk.StaleNotebookError, match="changed since it was executed"):
        bk.check_executed(tiny, page, "quick")
    with pytest.raises(bk.StaleNotebookError):
        bk.run_book(root=tiny.root, build=tiny.build, preset="quick", execute=False)


def test_chapter_without_parameters_cell_is_rejected(tiny):
    page = _page(tiny, "02_beta")
    page.source.write_text(BETA.replace(":tags: [parameters]\n", ""))
    with pytest.raises(bk.BookError, match="tagged `parameters`"):
        bk.execute_chapter(tiny, page, "quick")


def test_unknown_override_is_rejected(tiny):
    with pytest.raises(bk.BookError, match="no_such_parameter"):
        bk.run_book(root=tiny.root, build=tiny.build, preset="quick", overrides={"no_such_parameter": 1})


def test_prune_toc_keeps_selected_files_and_drops_empty_parts():
    toc = {
        "format": "jb-book",
        "root": "book/intro",
        "parts": [
            {
                "caption": "A",
                "chapters": [{"file": "book/a", "sections": [{"file": "book/a1"}]}, {"file": "book/b"}],
            },
            {"caption": "C", "chapters": [{"file": "book/c"}]},
        ],
    }
    pruned = bk.prune_toc(toc, {"book/intro", "book/a1", "book/b"})
    assert pruned["parts"] == [{"caption": "A", "chapters": [{"file": "book/a1"}, {"file": "book/b"}]}]
    assert toc["parts"][1]["chapters"] == [{"file": "book/c"}]  # the input is not modified


def test_cli_exits_nonzero_naming_the_failing_chapter(tiny, capsys):
    (tiny.root / "book" / "02_beta.md").write_text(BETA + FAILING_CELL)
    code = main(
        [
            "book",
            "--root",
            str(tiny.root),
            "--build-dir",
            str(tiny.build),
            "--preset",
            "quick",
            "--execute-only",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "chapter 02_beta" in err and "planted failure in beta" in err
    assert (tiny.build / "executed" / "01_alpha.ipynb").is_file()
    assert not (tiny.build / "executed" / "02_beta.ipynb").exists()


needs_mathjax = pytest.mark.skipif(
    not (project_root() / "node_modules" / "mathjax" / "es5" / "tex-chtml.js").is_file(),
    reason="MathJax not installed: run `make setup` (npm ci)",
)


@needs_mathjax
def test_render_builds_html_with_local_mathjax(tiny):
    index = bk.run_book(root=tiny.root, build=tiny.build, preset="quick", overrides={"n_items": 5})
    assert index == tiny.build / "html" / "index.html" and index.is_file()
    html = tiny.build / "html"
    alpha = (html / "book" / "01_alpha.html").read_text()
    assert "alpha preset=quick n_items=5" in alpha
    assert "_static/mathjax/tex-chtml.js" in alpha
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert list((html / "_static" / "mathjax" / "output" / "chtml" / "fonts").rglob("*.woff"))
    for page in html.rglob("*.html"):
        assert "cdn.jsdelivr" not in page.read_text(), page
    staged = json.loads((tiny.build / "stage" / "book" / "01_alpha.ipynb").read_text())
    assert staged["metadata"][bk.METADATA_KEY]["preset"] == "quick"
    assert not (tiny.build / "stage" / "book" / "01_alpha.md").exists()  # sources never reach the renderer


@needs_mathjax
def test_render_only_plain_pages(tiny):
    (tiny.root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\n")
    index = bk.run_book(root=tiny.root, build=tiny.build, preset="full")
    assert index.is_file() and (tiny.build / "html" / "book" / "intro.html").is_file()


@needs_mathjax
def test_broken_reference_fails_the_render_and_leaves_no_html(tiny):
    (tiny.root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\n")
    (tiny.root / "book" / "intro.md").write_text(INTRO + "\nSee {ref}`no-such-label`.\n")
    with pytest.raises(bk.RenderError, match="no-such-label"):
        bk.run_book(root=tiny.root, build=tiny.build, preset="full")
    assert not (tiny.build / "html").exists()


@needs_mathjax
def test_a_partial_book_renders_references_to_pages_it_leaves_out(tiny):
    (tiny.root / "book" / "intro.md").write_text(INTRO + "\nSee {ref}`beta-findings`.\n")
    beta = (tiny.root / "book" / "02_beta.md").read_text()
    (tiny.root / "book" / "02_beta.md").write_text(beta + "\n(beta-findings)=\n## Found\n")
    index = bk.run_book(root=tiny.root, build=tiny.build, preset="quick", chapters=["01_alpha"])
    assert index.is_file() and not (tiny.build / "html" / "book" / "02_beta.html").exists()
    full = bk.partial_book_config(yaml.safe_load((project_root() / "_config.yml").read_text()))
    assert set(bk.CROSS_PAGE_WARNINGS) <= set(full["sphinx"]["config"]["suppress_warnings"])
    assert full["sphinx"]["config"]["numfig"] is True  # everything else as configured


def test_plain_page_detection(tmp_path):
    plain, chapter = tmp_path / "plain.md", tmp_path / "chapter.md"
    plain.write_text(textwrap.dedent("# Title\n\ntext\n"))
    chapter.write_text(ALPHA)
    assert not bk.is_notebook_source(plain)
    assert bk.is_notebook_source(chapter)


def test_chapters_run_offline_unless_the_hub_is_asked_for(tmp_path):
    from emolib.pipeline.cli import build_parser

    offline = bk.chapter_environment(tmp_path)
    online = bk.chapter_environment(tmp_path, hub=True)
    assert offline["EMOLIB_BUILD_DIR"] == online["EMOLIB_BUILD_DIR"] == str(tmp_path)
    assert {offline[key] for key in bk.OFFLINE_ENV} == {"1"}
    assert {online[key] for key in bk.OFFLINE_ENV} == {
        "0"
    }  # explicit, so `make`'s exported "1" is overridden
    assert build_parser().parse_args(["book", "--hub"]).hub
    assert not build_parser().parse_args(["book"]).hub

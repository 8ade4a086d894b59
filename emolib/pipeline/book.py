"""The book pipeline: execute each chapter with papermill, then render the executed notebooks with Jupyter Book.

Chapters are jupytext MyST-markdown notebooks (`book/*.md` with a jupytext/kernelspec header); other pages listed in
`_toc.yml` are plain MyST pages. Execution and rendering are separate steps so that the render never runs code:

1. `execute_chapter` converts a chapter with jupytext, runs it with papermill (`preset` and other parameters injected
   after its `parameters` cell, working directory = the chapter's folder, as when a reader runs it in Jupyter),
   and only on success renames the result onto `_build/executed/<chapter>.ipynb`, stamped with the source's sha256
   and the preset. The previous executed copy is deleted first, so a failed run leaves none behind.
2. `render` refuses any executed notebook whose stamp does not match the current source and the requested preset,
   stages the book in `_build/stage/` (config, toc, bibliography, plain pages, executed notebooks, a local MathJax),
   and builds it with `jupyter-book build -W -n --keep-going` (warnings are errors) into `_build/html/`.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import datetime as dt
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from emolib import __version__
from emolib.cache import atomic_file, project_root
from emolib.pipeline.provenance import git_state
from emolib.pipeline.toc import TocError, toc_docnames

PRESETS = ("quick", "full")
BOOK_FOLDER = "book"
METADATA_KEY = "emolib"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
#: The same switches off: chapters may download hub models and pretrained SAE releases (`--hub`, the paper-scale
#: path; the book's own builds never use it).
ONLINE_ENV = {key: "0" for key in OFFLINE_ENV}


def chapter_environment(build: Path, hub: bool = False) -> dict[str, str]:
    """The environment a chapter's kernel starts with: the build folder for its results, and the hub switches
    (offline unless `hub`)."""
    return {**(ONLINE_ENV if hub else OFFLINE_ENV), "EMOLIB_BUILD_DIR": str(build)}


# MathJax is copied into this folder of the stage, which `_config.yml` lists in `html_static_path` (Sphinx then
# serves it as `_static/mathjax/`, the `mathjax_path` it names). Not `_static` itself: Jupyter Book adds every
# .js file under a `_static` folder to every page.
VENDOR_FOLDER = "_vendor"
MATHJAX_ENTRY = "tex-chtml.js"
# tex-chtml.js plus what it loads on demand: TeX extensions (autoload), CHTML fonts, menu and accessibility.
MATHJAX_PARTS = (MATHJAX_ENTRY, "input/tex/extensions", "output/chtml", "ui", "a11y", "sre")
SKIP_NAMES = {"__pycache__", ".ipynb_checkpoints", ".DS_Store"}


class BookError(RuntimeError):
    """A book step failed; the message names the chapter or file and what to do."""


class ChapterFailedError(BookError):
    """A cell of a chapter raised while papermill executed it."""


class StaleNotebookError(BookError):
    """An executed notebook is missing or does not match its source or the requested preset."""


class RenderError(BookError):
    """`jupyter-book build` failed (with -W, any warning fails it)."""


@dataclasses.dataclass(frozen=True)
class Page:
    """One `_toc.yml` entry: `docname` as written there (`book/00_setup`), its source file, and its kind."""

    docname: str
    source: Path
    is_chapter: bool

    @property
    def name(self) -> str:
        """The chapter's short name (`00_setup`), used by `--chapters`, `_build/executed/` and results files."""
        return Path(self.docname).name


@dataclasses.dataclass(frozen=True)
class Book:
    """A book folder (`root` holds `_config.yml`, `_toc.yml`, `book/`) and where its build goes."""

    root: Path
    build: Path

    @classmethod
    def at(cls, root: Path | str | None = None, build: Path | str | None = None) -> Book:
        """The book at `root` (default: the project); build defaults to `$EMOLIB_BUILD_DIR` or `<root>/_build`."""
        root = Path(root or project_root()).resolve()
        if build is None:
            build = os.environ.get("EMOLIB_BUILD_DIR") or root / "_build"
        for name in ("_config.yml", "_toc.yml"):
            if not (root / name).is_file():
                raise BookError(f"{root / name} does not exist: {root} is not a book folder")
        return cls(root=root, build=Path(build).resolve())

    def pages(self) -> list[Page]:
        """Every page of `_toc.yml`, in reading order."""
        try:
            docnames = toc_docnames(self.root / "_toc.yml")
        except TocError as err:
            raise BookError(str(err)) from None
        pages = [self._page(docname) for docname in docnames]
        names = [p.name for p in pages if p.is_chapter]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise BookError(f"chapters must have distinct file names; repeated: {', '.join(dupes)}")
        return pages

    def chapters(self, names: Sequence[str] | None = None) -> list[Page]:
        """The chapters (notebook pages), all of them or those named (`00_setup`, `book/00_setup[.md]`)."""
        chapters = [p for p in self.pages() if p.is_chapter]
        if not names:
            return chapters
        wanted = []
        for name in names:
            key = Path(name).with_suffix("").as_posix() if name.endswith(".md") else name
            match = [c for c in chapters if key in (c.name, c.docname)]
            if not match:
                known = ", ".join(c.name for c in chapters) or "none"
                raise BookError(f"no chapter {name!r} in {self.root / '_toc.yml'} (chapters: {known})")
            wanted += [c for c in match if c not in wanted]
        return [c for c in chapters if c in wanted]

    def executed_path(self, page: Page) -> Path:
        return self.build / "executed" / f"{page.name}.ipynb"

    def _page(self, docname: str) -> Page:
        for suffix in (".md", ".rst"):
            source = self.root / f"{docname}{suffix}"
            if source.is_file():
                return Page(docname, source, is_chapter=suffix == ".md" and is_notebook_source(source))
        if (self.root / f"{docname}.ipynb").is_file():
            raise BookError(
                f"{docname}.ipynb: chapters are jupytext MyST files, not .ipynb "
                f"(convert with `jupytext --to myst {docname}.ipynb`)"
            )
        raise BookError(
            f"{self.root / '_toc.yml'} lists {docname!r}, but {self.root / docname}.md does not exist"
        )


def _front_matter(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    match = re.match(r"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*\r?\n", text, flags=re.DOTALL)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        raise BookError(f"{path}: front matter is not valid YAML: {err}") from err
    return data if isinstance(data, dict) else {}


def is_notebook_source(path: Path) -> bool:
    """True for a jupytext notebook (front matter with a `jupytext` or `kernelspec` key), False for a plain page."""
    front = _front_matter(path)
    return "jupytext" in front or "kernelspec" in front


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parameter_names(nb: Any) -> set[str] | None:
    """Names assigned in the first code cell tagged `parameters`, or None when there is no such cell."""
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            try:
                tree = ast.parse(cell.source)
            except SyntaxError:
                return set(re.findall(r"^(\w+)\s*(?::[^=\n]*)?=", cell.source, flags=re.MULTILINE))
            names = set()
            for node in tree.body:
                if isinstance(node, ast.Assign):
                    names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    names.add(node.target.id)
            return names
    return None


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["n=3", "model='gemma'", "name=abc"]` -> `{"n": 3, "model": "gemma", "name": "abc"}` (Python literals, else text)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise BookError(f"parameter override {item!r} is not of the form name=value")
        if key == "preset":
            raise BookError("set the preset with --preset, not -p preset=...")
        try:
            overrides[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            overrides[key] = raw.strip()
    return overrides


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block (the kernel inherits them when it starts)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _failure_message(page: Page, err: Any, preset: str, kept: Path) -> str:
    source = "\n".join("    " + line for line in str(getattr(err, "source", "")).splitlines()[:15])
    trace = _ANSI.sub("", "\n".join(getattr(err, "traceback", None) or [str(err)]))
    error = f"{getattr(err, 'ename', 'Error')}: {getattr(err, 'evalue', '')}"
    if error not in trace:
        trace += "\n" + error
    return (
        f"chapter {page.name} ({page.source}) failed with preset {preset!r} in cell "
        f"{getattr(err, 'cell_index', '?')} (execution count {getattr(err, 'exec_count', None)}):\n{source}\n\n"
        f"{trace}\n\nThe partly executed notebook is kept for inspection at {kept}; "
        f"no executed notebook was published for {page.name}."
    )


def execute_chapter(
    book: Book,
    page: Page,
    preset: str,
    overrides: Mapping[str, Any] | None = None,
    *,
    log_output: bool = False,
    hub: bool = False,
) -> Path:
    """Run one chapter with papermill; return `_build/executed/<chapter>.ipynb`, written only if every cell ran.

    `overrides` are injected only into chapters whose parameters cell defines them. The kernel runs in the
    chapter's folder with `EMOLIB_BUILD_DIR` pointing at this build (so `write_results` lands beside it) and the
    Hugging Face offline switches on (off with `hub`).
    """
    import jupytext
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    target = book.executed_path(page)
    running = book.build / "running" / f"{page.name}.ipynb"
    failed = book.build / "failed" / f"{page.name}.ipynb"
    for path in (target, running, failed):
        path.unlink(missing_ok=True)
    running.parent.mkdir(parents=True, exist_ok=True)

    raw = page.source.read_bytes()
    nb = jupytext.reads(raw.decode("utf-8"), fmt=page.source.suffix.lstrip("."))
    names = parameter_names(nb)
    if names is None or "preset" not in names:
        raise BookError(
            f"chapter {page.name} ({page.source}) needs a first code cell tagged `parameters` that sets "
            f'`preset = "full"`; papermill injects the requested preset after it'
        )
    parameters = {"preset": preset, **{k: v for k, v in (overrides or {}).items() if k in names}}

    print(f"[emolib] executing {page.source.relative_to(book.root)} with {parameters}", flush=True)
    started, clock = dt.datetime.now(dt.UTC), time.monotonic()
    env = chapter_environment(book.build, hub)
    try:
        with _environment(env):
            papermill.execute_notebook(
                nb,
                str(running),
                parameters=parameters,
                kernel_name="python3",
                cwd=str(page.source.parent),
                progress_bar=True,
                log_output=log_output,
            )
    except PapermillExecutionError as err:
        failed.parent.mkdir(parents=True, exist_ok=True)
        if running.exists():
            os.replace(running, failed)
        raise ChapterFailedError(_failure_message(page, err, preset, failed)) from None
    except BaseException:
        running.unlink(missing_ok=True)
        raise

    executed = nbformat.read(running, as_version=4)
    for (
        cell
    ) in executed.cells:  # the injected-parameters cell: shown collapsed, so readers can see the preset
        tags = cell.metadata.get("tags", [])
        if "injected-parameters" in tags and "hide-input" not in tags:
            cell.metadata["tags"] = [*tags, "hide-input"]
    executed.metadata[METADATA_KEY] = {
        "source": page.source.relative_to(book.root).as_posix(),
        "source_sha256": sha256_bytes(raw),
        "preset": preset,
        "parameters": parameters,
        "git": git_state(),
        "emolib_version": __version__,
        "executed_utc": started.isoformat(timespec="seconds"),
        "run_seconds": round(time.monotonic() - clock, 1),
    }
    with atomic_file(target) as tmp:
        nbformat.write(executed, str(tmp))
    running.unlink(missing_ok=True)
    print(
        f"[emolib] {page.name}: done in {executed.metadata[METADATA_KEY]['run_seconds']} s -> {target}",
        flush=True,
    )
    return target


def check_executed(book: Book, page: Page, preset: str) -> dict[str, Any]:
    """The stamp of the executed copy of `page`; StaleNotebookError unless it matches the source and preset."""
    import nbformat

    path = book.executed_path(page)
    rerun = f"run `emolib book --chapters {page.name} --preset {preset}`"
    if not path.is_file():
        raise StaleNotebookError(f"chapter {page.name} has no executed notebook ({path} is missing): {rerun}")
    stamp = nbformat.read(path, as_version=4).metadata.get(METADATA_KEY)
    if not stamp:
        raise StaleNotebookError(
            f"{path} was not produced by `emolib book` (no '{METADATA_KEY}' stamp): {rerun}"
        )
    current = sha256_bytes(page.source.read_bytes())
    if stamp.get("source_sha256") != current:
        raise StaleNotebookError(
            f"{path} is stale: {page.source.relative_to(book.root)} changed since it was executed "
            f"(sha256 {str(stamp.get('source_sha256'))[:12]}... then, {current[:12]}... now): {rerun}"
        )
    if stamp.get("preset") != preset:
        raise StaleNotebookError(
            f"{path} was executed with preset {stamp.get('preset')!r}, not {preset!r}: {rerun}"
        )
    return stamp


def prune_toc(toc: Mapping[str, Any], keep: set[str]) -> dict[str, Any]:
    """A copy of a jb-book toc without the file entries not in `keep`; their kept sections move up in their place;
    parts left empty are dropped."""

    def entries(items: list[Any]) -> list[Any]:
        out = []
        for item in items:
            if not isinstance(item, dict) or "file" not in item:
                out.append(item)
                continue
            sections = entries(item.get("sections", []))
            if str(Path(item["file"]).with_suffix("")) in keep or item["file"] in keep:
                new = {k: v for k, v in item.items() if k != "sections"}
                if sections:
                    new["sections"] = sections
                out.append(new)
            else:
                out.extend(sections)
        return out

    toc = copy.deepcopy(dict(toc))
    if "parts" in toc:
        parts = []
        for part in toc["parts"]:
            chapters = entries(part.get("chapters", []))
            if chapters:
                parts.append({**part, "chapters": chapters})
        toc["parts"] = parts
        if not parts:
            del toc["parts"]
    for key in ("chapters", "sections"):
        if key in toc:
            toc[key] = entries(toc[key])
            if not toc[key]:
                del toc[key]
    return toc


def mathjax_source() -> Path:
    """The es5 folder of the npm `mathjax` package installed by `make setup` (`npm ci`)."""
    folder = Path(os.environ.get("EMOLIB_MATHJAX_DIR") or project_root() / "node_modules" / "mathjax" / "es5")
    if not (folder / MATHJAX_ENTRY).is_file():
        raise BookError(
            f"MathJax is not installed ({folder / MATHJAX_ENTRY} is missing): run `make setup` "
            f"(which runs `npm ci`) so that the book renders equations offline"
        )
    return folder


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*SKIP_NAMES), dirs_exist_ok=True)


#: Sphinx warning types of references to targets on other pages: a partial book leaves those pages out.
CROSS_PAGE_WARNINGS = ("ref.ref", "ref.doc", "myst.xref_missing")


def partial_book_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """`_config.yml` for a partial book: the same, except that references to targets on pages it leaves out are
    not warnings (every other warning still fails the render; the whole book checks every reference)."""
    out = copy.deepcopy(dict(config))
    sphinx_config = out.setdefault("sphinx", {}).setdefault("config", {})
    known = list(sphinx_config.get("suppress_warnings", []))
    sphinx_config["suppress_warnings"] = known + [w for w in CROSS_PAGE_WARNINGS if w not in known]
    return out


def stage(book: Book, pages: Sequence[Page], preset: str) -> Path:
    """Assemble `_build/stage/`: what Jupyter Book needs, with executed notebooks in place of chapter sources."""
    chapters = [p for p in pages if p.is_chapter]
    stamps = {p.name: check_executed(book, p, preset) for p in chapters}
    for name, stamp in stamps.items():
        extra = {k: v for k, v in stamp.get("parameters", {}).items() if k != "preset"}
        if extra:
            print(f"[emolib] note: chapter {name} was executed with overrides {extra}", flush=True)

    target = book.build / "stage"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    config = yaml.safe_load((book.root / "_config.yml").read_text())
    toc = yaml.safe_load((book.root / "_toc.yml").read_text())
    all_docs = [p.docname for p in book.pages()]
    if len(pages) != len(all_docs):
        toc = prune_toc(toc, {p.docname for p in pages})
        config = partial_book_config(config)
        print(
            f"[emolib] rendering a partial book: {', '.join(p.docname for p in pages)} (references to pages left "
            "out are not checked; the whole book checks them)",
            flush=True,
        )
    (target / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    (target / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    if (book.root / "references.bib").is_file():
        shutil.copy2(book.root / "references.bib", target / "references.bib")

    # Assets and plain pages of the book folder (figures, includes), never notebook sources or stray notebooks.
    folder = book.root / BOOK_FOLDER
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(book.root)
            if (
                path.is_dir()
                or SKIP_NAMES & set(rel.parts)
                or any(part.startswith(".") for part in rel.parts)
            ):
                continue
            if path.suffix == ".ipynb" or (path.suffix == ".md" and is_notebook_source(path)):
                continue
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / rel)
    for page in pages:
        dest = target / (page.docname + (".ipynb" if page.is_chapter else page.source.suffix))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(book.executed_path(page) if page.is_chapter else page.source, dest)

    mathjax = mathjax_source()
    dest = target / VENDOR_FOLDER / "mathjax"
    for part in MATHJAX_PARTS:
        src = mathjax / part
        if src.is_dir():
            _copy_tree(src, dest / part)
        elif src.is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / part)
    return target


def _jupyter_book() -> str:
    local = Path(sys.executable).with_name("jupyter-book")
    found = str(local) if local.is_file() else shutil.which("jupyter-book")
    if not found:
        raise BookError("jupyter-book is not installed in this environment: run `make setup`")
    return found


def render(book: Book, preset: str, pages: Sequence[Page] | None = None) -> Path:
    """Stage and build the book with Jupyter Book; return `_build/html/index.html`.

    The previous `_build/html` is removed first, so a failed render leaves no HTML that looks current.
    """
    pages = list(pages if pages is not None else book.pages())
    html = book.build / "html"
    shutil.rmtree(html, ignore_errors=True)
    staged = stage(book, pages, preset)
    out = book.build / "jupyter-book"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [_jupyter_book(), "build", str(staged), "--path-output", str(out)]
    cmd += ["--builder", "html", "-W", "-n", "--keep-going"]
    print(f"[emolib] rendering {len(pages)} page(s) with jupyter-book (warnings are errors)", flush=True)
    clock = time.monotonic()
    proc = subprocess.run(
        cmd,
        cwd=book.root,
        env={**os.environ, **OFFLINE_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = _ANSI.sub("", proc.stdout)
    log = book.build / "jupyter-book.log"
    log.write_text(output)
    built = out / "_build" / "html"  # where jupyter-book 1.x puts html under --path-output
    if proc.returncode != 0 or not (built / "index.html").is_file():
        problems = [line for line in output.splitlines() if re.search(r"\b(WARNING|ERROR|CRITICAL)\b", line)]
        raise RenderError(
            f"jupyter-book build failed (exit {proc.returncode}); its output (also in {log}):\n\n{output}\n"
            + "-" * 79
            + f"\njupyter-book build failed with {len(problems)} warning(s)/error(s) (warnings are errors):\n"
            + "\n".join(problems)
            + f"\nPaths under {staged} mirror the book folder; a .ipynb there is the executed copy of the .md chapter."
        )
    os.replace(built, html)
    if not (html / "_static" / "mathjax" / MATHJAX_ENTRY).is_file():
        raise RenderError(f"the built book lacks its local MathJax ({html}/_static/mathjax/{MATHJAX_ENTRY})")
    print(f"[emolib] rendered in {time.monotonic() - clock:.1f} s -> {html / 'index.html'}", flush=True)
    return html / "index.html"


def run_book(
    *,
    preset: str = "full",
    chapters: Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    root: Path | str | None = None,
    build: Path | str | None = None,
    execute: bool = True,
    render_html: bool = True,
    log_output: bool = False,
    hub: bool = False,
) -> Path | None:
    """Execute the chapters (all, or those named) with `preset`, then render; return the index.html path.

    With `chapters`, only those chapters (and the plain pages) are rendered: a partial book for a quick look.
    With `hub`, the chapters may download from the Hugging Face hub (hub models, pretrained SAE releases);
    rendering stays offline.
    """
    if preset not in PRESETS:
        raise BookError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if not (execute or render_html):
        raise BookError("nothing to do: both execution and rendering are switched off")
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    book = Book.at(root, build)
    selected = book.chapters(chapters)
    # Any run changes what the HTML would show: drop the old one now, so that a run that fails half-way leaves
    # no HTML that looks current.
    shutil.rmtree(book.build / "html", ignore_errors=True)
    overrides = dict(overrides or {})
    if overrides and selected:
        import jupytext

        defined = set()
        for page in selected:
            defined |= parameter_names(jupytext.read(page.source)) or set()
        if unknown := sorted(set(overrides) - defined):
            raise BookError(
                f"no selected chapter has a parameter named {', '.join(unknown)} in its parameters cell"
            )
    if execute:
        for page in selected:
            execute_chapter(book, page, preset, overrides, log_output=log_output, hub=hub)
        if not selected:
            print("[emolib] no chapters in the toc: nothing to execute", flush=True)
    if not render_html:
        return None
    pages = book.pages()
    if chapters:  # a partial book: the plain pages, the root page and the selected chapters
        pages = [p for i, p in enumerate(pages) if i == 0 or not p.is_chapter or p in selected]
    return render(book, preset, pages)

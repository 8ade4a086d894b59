"""The reading order of the book: the documents of a Jupyter Book `_toc.yml`."""

from __future__ import annotations

from pathlib import Path


class TocError(ValueError):
    """A `_toc.yml` entry the pipeline cannot follow (glob entries)."""


def toc_docnames(toc_path: Path) -> list[str]:
    """The documents of a Jupyter Book `_toc.yml`, root first, then depth-first in reading order."""
    from sphinx_external_toc.api import GlobItem, UrlItem
    from sphinx_external_toc.parsing import parse_toc_yaml

    site_map = parse_toc_yaml(toc_path)
    order: list[str] = []

    def visit(docname: str) -> None:
        order.append(docname)
        for tree in site_map[docname].subtrees:
            for item in tree.items:
                if isinstance(item, GlobItem):
                    raise TocError(
                        f"{toc_path}: glob entries ({item}) are not supported; list files one by one"
                    )
                if not isinstance(item, UrlItem):
                    visit(str(item))

    visit(site_map.root.docname)
    return [str(Path(d).with_suffix("")) if Path(d).suffix in (".md", ".rst", ".ipynb") else d for d in order]

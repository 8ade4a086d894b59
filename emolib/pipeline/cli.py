"""The `emolib` command: build the book (`emolib book`) and refresh the README results table (`emolib readme`).

emolib book --preset quick                      # execute every chapter, then render _build/html/index.html
emolib book --chapters 00_setup -p n_items=20   # one chapter with an override, rendered as a partial book
emolib book --render-only                       # re-render from _build/executed/ (refuses stale notebooks)
emolib readme                                   # rewrite the README block from _build/results/*.json
emolib compare OLD NEW                          # compare two builds' results, number by number
emolib costs                                    # what the build cost: chapter times, cache build times per model
emolib classify --model M texts.csv [--steer plan.json]   # classify your own texts, optionally steered
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _chapter_list(values: Sequence[str] | None) -> list[str]:
    return [name for value in values or [] for name in value.split(",") if name.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emolib", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    book = commands.add_parser(
        "book",
        help="execute the chapters with papermill and render the book with Jupyter Book",
        description="Execute each chapter of _toc.yml (jupytext notebooks under book/) with papermill into "
        "_build/executed/, then render everything with jupyter-book (-W -n) into _build/html/.",
    )
    book.add_argument(
        "--preset", choices=("quick", "full"), default="full", help="chapter preset (default: full)"
    )
    book.add_argument(
        "--chapters",
        nargs="+",
        metavar="NAME",
        help="only these chapters (e.g. 00_setup, or comma-separated); the render then shows only them",
    )
    book.add_argument(
        "-p",
        "--parameter",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a value of the chapters' parameters cell (a Python literal, else a string); repeatable",
    )
    book.add_argument(
        "--root", type=Path, help="book folder holding _config.yml and _toc.yml (default: the project)"
    )
    book.add_argument(
        "--build-dir", type=Path, help="output folder (default: $EMOLIB_BUILD_DIR or <root>/_build)"
    )
    only = book.add_mutually_exclusive_group()
    only.add_argument("--execute-only", action="store_true", help="run the chapters, do not render")
    only.add_argument("--render-only", action="store_true", help="render the already executed notebooks")
    book.add_argument(
        "--log-output", action="store_true", help="also echo each cell's output while executing"
    )
    book.add_argument(
        "--hub",
        action="store_true",
        help="let the chapters download hub models and pretrained SAE releases (the paper-scale path; the book's "
        "own builds are offline)",
    )

    readme = commands.add_parser("readme", help="rewrite the README results table from _build/results/*.json")
    readme.add_argument("--readme", type=Path, help="the file to rewrite (default: README.md of the project)")
    readme.add_argument(
        "--results-dir", type=Path, help="default: $EMOLIB_BUILD_DIR/results or _build/results"
    )

    compare = commands.add_parser(
        "compare",
        help="compare two results files or folders number by number (did a change move any result?)",
        description="Exit 0 when every number of OLD is in NEW (within the tolerance), 1 otherwise.",
    )
    compare.add_argument("old", type=Path, help="a results file or a folder of them (e.g. another build's)")
    compare.add_argument("new", type=Path, help="the results file or folder to compare with")
    compare.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance (default 1e-6)")
    compare.add_argument("--atol", type=float, default=1e-9, help="absolute tolerance (default 1e-9)")
    compare.add_argument("--limit", type=int, default=30, help="differences listed per kind (default 30)")

    costs = commands.add_parser(
        "costs",
        help="what a build cost: each chapter's run time and each cached artefact's build time per model",
        description="Read the executed chapters' stamps and the cache manifests (also of an interrupted build).",
    )
    costs.add_argument("--cache-dir", type=Path, help="default: $EMOLIB_CACHE_DIR or .cache/emolib")
    costs.add_argument(
        "--build-dir", type=Path, help="default: $EMOLIB_BUILD_DIR or _build (its executed/ chapters)"
    )
    costs.add_argument(
        "--since", type=float, metavar="UNIX_TIME", help="only cache entries written at or after this time"
    )

    classify = commands.add_parser(
        "classify",
        help="classify your own texts (CSV or JSONL with a text column) with a book model, optionally steered",
        description="Restricted first-token scoring with the book's prompt for --dataset's labels; writes the "
        "predicted label and every label's probability per text. --steer applies a saved SteeringPlan.",
    )
    classify.add_argument("input", type=Path, help="a .csv or .jsonl file")
    classify.add_argument("--model", required=True, help="a registered model (see the README's models table)")
    classify.add_argument(
        "--steer", type=Path, metavar="PLAN", help="a steering plan JSON (chapter 4 writes them)"
    )
    classify.add_argument(
        "--text-column", default="text", help="the column holding the texts (default: text)"
    )
    classify.add_argument(
        "--dataset", default="isear", help="whose prompt and labels to use (default: isear)"
    )
    classify.add_argument(
        "--output", type=Path, help="default: <input stem>.predictions.csv beside the input"
    )
    classify.add_argument("--batch-size", type=int, default=16)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "book":
        import logging

        from emolib.pipeline.book import BookError, parse_overrides, run_book

        logging.basicConfig(level=logging.INFO if args.log_output else logging.WARNING, format="%(message)s")
        try:
            index = run_book(
                preset=args.preset,
                chapters=_chapter_list(args.chapters) or None,
                overrides=parse_overrides(args.parameter),
                root=args.root,
                build=args.build_dir,
                execute=not args.render_only,
                render_html=not args.execute_only,
                log_output=args.log_output,
                hub=args.hub,
            )
        except BookError as err:
            print(f"\nemolib book: error: {err}", file=sys.stderr)
            return 1
        if index is not None:
            print(f"[emolib] the book is at {index}")
        return 0
    if args.command == "readme":
        from emolib.pipeline.results import update_readme

        changed = update_readme(args.readme, args.results_dir)
        print("[emolib] README results table " + ("updated" if changed else "already up to date"))
        return 0
    if args.command == "compare":
        from emolib.pipeline.compare import compare_results

        try:
            comparison = compare_results(args.old, args.new, rtol=args.rtol, atol=args.atol)
        except FileNotFoundError as err:
            print(f"emolib compare: error: {err}", file=sys.stderr)
            return 2
        print(comparison.report(limit=args.limit))
        return 0 if comparison.same else 1
    if args.command == "classify":
        from emolib.methods.steering import SteeringError
        from emolib.pipeline.classify import ClassifyError, ClassifyRequest, classify_file

        output = args.output or args.input.with_name(f"{args.input.stem}.predictions.csv")
        request = ClassifyRequest(
            model=args.model,
            input=args.input,
            output=output,
            text_column=args.text_column,
            dataset=args.dataset,
            plan=args.steer,
            batch_size=args.batch_size,
        )
        try:
            frame = classify_file(request)
        except (ClassifyError, SteeringError) as err:
            print(f"emolib classify: error: {err}", file=sys.stderr)
            return 1
        print(f"[emolib] {len(frame)} predictions written to {output}")
        return 0
    if args.command == "costs":
        from emolib.cache import build_dir, cache_dir
        from emolib.pipeline.costs import report

        print(report(args.cache_dir or cache_dir(), args.build_dir or build_dir(), since=args.since))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())

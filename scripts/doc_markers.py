"""What the doc-table scripts share: a generated block between a doc's begin/end markers, written (`--write`),
checked (`--check`: exit 1 if the doc differs) or printed."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable


def render(text: str, begin: str, end: str, body: str, where: str = "the doc") -> str:
    """`text` with `body` as the only thing between its one `begin` ... `end` pair."""
    if text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"{where} must hold one {begin} ... {end} pair")
    head, rest = text.split(begin)
    return f"{head}{begin}\n{body}\n{end}{rest.split(end)[1]}"


def emit(doc: Path, begin: str, end: str, body: str, write: bool, check: bool) -> int:
    """Print `body`, or write it between the markers of `doc`, or check that `doc` already holds it."""
    if not (write or check):
        print(body)
        return 0
    text = doc.read_text()
    new = render(text, begin, end, body, str(doc))
    if check:
        return 0 if new == text else 1
    doc.write_text(new)
    return 0


def read_rows(files: list[str], keep: Callable[[dict], bool] = lambda r: "tool" in r) -> list[dict]:
    """The JSON lines of result `files` that `keep` accepts, each with `_file` (its file's name) for the table."""
    rows = []
    for f in files:
        for line in Path(f).read_text().splitlines():
            r = json.loads(line)
            if keep(r):
                r["_file"] = Path(f).name
                rows.append(r)
    return rows


def cli(doc: Path, tag: str, default_name: str, body: Callable[[list[str]], str], argv: list[str] | None = None) -> int:
    """A table script's command line: FILES [--name NAME] [--write | --check]; body(files) is the block between
    <!-- TAG:NAME:begin --> and <!-- TAG:NAME:end --> of `doc` (emit)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--name", default=default_name)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args(argv)
    return emit(doc, f"<!-- {tag}:{a.name}:begin -->", f"<!-- {tag}:{a.name}:end -->", body(a.files), a.write,
                a.check)

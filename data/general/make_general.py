"""Build general.jsonl: prose paragraphs from the docstrings of Python standard-library modules.

Text unrelated to any lorakit task, used to measure forgetting (the loss on it before vs after fine-tuning).
Source: the docstrings of the CPython 3.11 standard library modules listed below, as shipped with the
interpreter running this script. License: Python Software Foundation License Version 2 (PSF-2.0).
Run: python data/general/make_general.py  (rewrites data/general/general.jsonl next to this file)
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from pathlib import Path

MODULES = ["textwrap", "json", "collections", "heapq", "bisect", "fractions", "statistics", "calendar", "csv",
           "argparse", "logging", "string", "random", "difflib", "shlex", "queue", "contextlib", "functools",
           "dataclasses", "enum", "typing", "zipfile", "tarfile", "sqlite3", "email.message", "http.client",
           "urllib.parse", "unittest", "pdb", "doctest", "threading", "subprocess", "tempfile", "shutil",
           "pathlib", "datetime", "decimal", "abc", "ast", "inspect", "pickle", "copy", "weakref", "itertools"]
PER_MODULE = 2
TOTAL = 48


def prose(par: str) -> bool:
    lines = par.splitlines()
    if any(l.startswith((" ", "\t", ">>>", "-", "*", "|", "=")) for l in lines):  # code, lists, tables
        return False
    text = " ".join(par.split())
    letters = sum(c.isalpha() or c == " " for c in text)
    return 200 <= len(text) <= 900 and letters / len(text) > 0.85 and text.endswith((".", ":"))


def paragraphs(module) -> list[str]:
    docs = [inspect.getdoc(module) or ""]
    for _, obj in sorted(vars(module).items()):
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == module.__name__:
            docs.append(inspect.getdoc(obj) or "")
    out = []
    for doc in docs:
        for par in re.split(r"\n\s*\n", doc):
            if prose(par):
                out.append(" ".join(par.split()))
    return out


def main() -> None:
    rows, seen = [], set()
    for name in MODULES:
        kept = 0
        for par in paragraphs(importlib.import_module(name)):
            if par in seen or kept >= PER_MODULE:
                continue
            seen.add(par)
            rows.append({"text": par, "source": f"Python {sys.version_info.major}.{sys.version_info.minor} "
                                                f"docstring, module {name}"})
            kept += 1
        if len(rows) >= TOTAL:
            break
    out = Path(__file__).with_name("general.jsonl")
    out.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows[:TOTAL]))
    Path(__file__).with_name("sources.txt").write_text("".join(r["source"] + "\n" for r in rows[:TOTAL]))
    print(f"wrote {min(len(rows), TOTAL)} paragraphs to {out}")


if __name__ == "__main__":
    main()

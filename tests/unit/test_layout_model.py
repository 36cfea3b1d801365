"""Two house rules of issue 22 that the general layout test does not cover: only arch.py reads transformers'
decoder internals (the model description: everything else asks it), and the serving engine's functions fit a
screen (at most 60 lines each)."""
import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "lorakit"
SHORT = ["serve/engine.py"]  # modules whose every function is at most MAX_FUNCTION lines
MAX_FUNCTION = 60


def test_engine_functions_fit_a_screen():
    long = []
    for rel in SHORT:
        for node in ast.walk(ast.parse((SRC / rel).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION:
                    long.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not long, long

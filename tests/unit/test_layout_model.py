"""Two house rules of issue 22 that the general layout test does not cover: only arch.py reads transformers'
decoder internals (the model description: everything else asks it), and the serving engine's and the training
loop's functions fit a screen (at most 60 lines each)."""
import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "lorakit"
SHORT = ["serve/engine.py", "train/loop.py", "train/setup_steps.py"]  # every function at most MAX_FUNCTION lines
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


INTERNALS = {"embed_tokens", "rotary_emb", "rotary_emb_local", "lm_head"}  # attributes of transformers' decoders
# module -> the internals it may read, and why
ALLOWED: dict[str, tuple[set[str], str]] = {}


def _internal_reads(tree) -> list[tuple[int, str]]:
    """(line, attribute) of every read of a decoder internal: `x.embed_tokens`, `x.rotary_emb`, `x.lm_head`, and
    `x.model.layers` (a *ForCausalLM's decoder layers)."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        if node.attr in INTERNALS:
            out.append((node.lineno, node.attr))
        elif node.attr == "layers" and isinstance(node.value, ast.Attribute) and node.value.attr == "model":
            out.append((node.lineno, "model.layers"))
    return sorted(out)


def test_only_arch_reads_decoder_internals():
    bad = []
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC).as_posix()
        if rel == "arch.py":
            continue
        allowed = ALLOWED.get(rel, (set(), ""))[0]
        bad += [f"{rel}:{line} .{attr}" for line, attr in _internal_reads(ast.parse(f.read_text()))
                if attr not in allowed]
    assert not bad, f"read these through lorakit.arch: {bad}"


def test_the_check_sees_each_kind_of_read():
    code = "a = m.model.layers\nb = m.model.embed_tokens(x)\nc = inner.rotary_emb(h, p)\nd = model.lm_head\n"
    assert [attr for _, attr in _internal_reads(ast.parse(code))] == ["model.layers", "embed_tokens", "rotary_emb",
                                                                      "lm_head"]

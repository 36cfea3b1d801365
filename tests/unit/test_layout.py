"""The package's architecture holds: no import circles between modules, no import from a lower part to a higher
one (cli > lab, serve > train > adapters > core > the base modules), no module over 400 lines, no print in
library code (the CLI decides what a person sees)."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "lorakit"
# part -> rank; a module may import only from parts of lower or equal rank
RANK = {"version": 0, "files": 0, "faults": 0, "runs": 0, "templates": 1, "config": 0, "arch": 1, "generate": 1, "kernels": 1, "core": 2, "models": 3, "adapters": 4,
        "train": 5, "ui": 5, "lab": 6, "serve": 6, "cli": 7, "__init__": 8, "__main__": 8}
PRINT_OK = {"cli", "__main__"}


def _modules():
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        yield name, f


def _part(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(f: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorakit"):
            subs = [f"{node.module}.{a.name}" for a in node.names]
            pkg = SRC.parent.joinpath(*node.module.split("."))
            modules = [s for s in subs if pkg.joinpath(s.rsplit(".", 1)[1]).with_suffix(".py").exists()
                       or pkg.joinpath(s.rsplit(".", 1)[1], "__init__.py").exists()]
            out += modules if len(modules) == len(subs) else [node.module] + modules
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("lorakit")]
    return out


def test_no_import_from_a_higher_part():
    mods = dict(_modules())
    bad = []
    for name, f in mods.items():
        src = _part(name)
        for imp in _imports(f):
            if imp not in mods:
                continue
            dst = _part(imp)
            if RANK[dst] > RANK[src]:
                bad.append(f"{name} -> {imp}")
    assert not bad, bad


# parts that may not import each other although their ranks would allow it: the server runs adapters, it does not
# train them (prompt templates live in lorakit/templates.py, beside generation, for both); the dashboard (ui/) reads
# run folders by the names in lorakit/runs.py, never through the loop or the sweep
APART = {("serve", "train"), ("serve", "lab"), ("ui", "train"), ("ui", "lab")}


def test_serve_imports_nothing_from_train_or_lab():
    bad = [f"{name} -> {imp}" for name, f in _modules() for imp in _imports(f)
           if (_part(name), _part(imp)) in APART]
    assert not bad, bad


def test_no_import_circles():
    mods = dict(_modules())
    graph = {n: {i for i in _imports(f) if i in mods and i != n} for n, f in mods.items()}
    # a package importing its own submodules (re-exports) is not a circle
    for n in graph:
        graph[n] = {i for i in graph[n] if not (i.startswith(n + ".") and mods[n].name == "__init__.py")
                    and not (n.startswith(i + ".") and mods[i].name == "__init__.py")}
    seen, stack, cycles = set(), [], []

    def visit(n):
        if n in stack:
            cycles.append(stack[stack.index(n):] + [n])
            return
        if n in seen:
            return
        seen.add(n)
        stack.append(n)
        for m in sorted(graph[n]):
            visit(m)
        stack.pop()
    for n in sorted(graph):
        visit(n)
    assert not cycles, cycles


def test_modules_are_small_and_library_code_does_not_print():
    big, prints = [], []
    for name, f in _modules():
        text = f.read_text()
        if text.count("\n") > 400:
            big.append(f"{name}: {text.count(chr(10))} lines")
        if _part(name) not in PRINT_OK:
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                    prints.append(f"{name}:{node.lineno}")
    assert not big, big
    assert not prints, prints


def test_help_and_listing_adapters_do_not_import_torch(tmp_path):
    """`lorakit --help` and `lorakit adapters list` answer without torch (the command line imports lazily; the
    registry reads SQLite only): in a fresh interpreter, torch is not loaded after either, nor psycopg (only a
    postgresql:// registry needs it)."""
    import subprocess
    import sys

    code = ("import contextlib, io, sys\n"
            "from lorakit.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['--help'])\n"
            f"assert main(['adapters', 'list', '--registry', {str(tmp_path / 'r.sqlite')!r}]) == 0\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'psycopg') if m in sys.modules))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": str(SRC.parent), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[]", p.stdout


def test_no_private_name_is_imported_from_another_module():
    """A leading underscore means "this module's own": another module that needs it needs a public name."""
    bad = []
    for name, f in _modules():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorakit"):
                bad += [f"{name}: from {node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad


def test_kernels_are_dispatched_from_kernels_only():
    """kernels/ is the one dispatch point: its Triton modules (kernels/triton_*.py) are imported by kernels/ alone;
    the server and the training backends call the dispatches (lora_delta, ce_chunk, swiglu_lora_fwd/_bwd)."""
    triton = {n for n, _ in _modules() if n.startswith("lorakit.kernels.triton_")}
    assert triton, "no kernels/triton_*.py module found"
    bad = [f"{name} -> {imp}" for name, f in _modules() if _part(name) != "kernels"
           for imp in _imports(f) if imp in triton]
    assert not bad, bad

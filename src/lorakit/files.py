"""Atomic file and directory writes: a reader sees the old version or the new one, never half of one."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write_dir(path: str | Path, write: Callable[[Path], None], between: Callable[[], None] | None = None) -> Path:
    """`write(tmp)` fills a temp sibling directory, which then replaces `path`. `between()` runs after the old
    directory moved aside and before the new one moves in (a fault point for crash tests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.rename(path, old)
            if between is not None:
                between()
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def atomic_write_file(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` writes a temp file in the same directory, which then replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_file(path, lambda p: p.write_text(text))


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def recover(path: str | Path) -> None:
    """After a process was killed mid-write: a directory whose replacement was cut between its two renames is put
    back, and temp siblings of `path` left by writes that never finished are removed. For paths one process owns."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    olds = sorted(path.parent.glob(f".{path.name}.old-*"))
    if not path.exists() and olds:
        os.rename(olds.pop(), path)
    for p in olds + sorted(path.parent.glob(f".{path.name}.tmp-*")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs (the owner of a lock or a leftover temporary file): a process of another
    user counts as running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

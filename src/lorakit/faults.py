"""Named fault points, for crash tests: a test sets LORAKIT_FAULT and the process fails at exactly that point,
instead of a test sleeping and hoping to kill it at the right moment.

    LORAKIT_FAULT=<point>[@<n>][:<action>]

<point> is a name the code passes to `point()` (e.g. `train.micro_batch`, `checkpoint.written`,
`checkpoint.swapped`); `@<n>` limits it to the call whose number is n (a micro-batch index, a checkpoint's step);
<action> is `kill` (SIGKILL this process, the default), `killpg` (SIGKILL its whole process group: a sweep and
its runs) or `raise` (a RuntimeError, as a bad row or a full disk would). Unset, `point()` costs one comparison.

A test in the same process can also run its own code at a point (`with faults.hook("registry.copied", swap):`):
the world changes at exactly that step (a file swapped, an adapter removed by another caller), no sleeping."""
from __future__ import annotations

import contextlib
import os
import signal
from typing import Callable

ACTIONS = ("kill", "killpg", "raise")


def _parse(spec: str | None) -> tuple[str, int | None, str] | None:
    if not spec:
        return None
    where, _, action = spec.partition(":")
    name, _, n = where.partition("@")
    action = action or "kill"
    if action not in ACTIONS or not name or (n and not n.lstrip("-").isdigit()):
        raise ValueError(f"LORAKIT_FAULT={spec!r}: expected <point>[@<n>][:{'|'.join(ACTIONS)}]")
    return name, int(n) if n else None, action


_FAULT = _parse(os.environ.get("LORAKIT_FAULT"))
_HOOKS: dict[str, Callable[[int | None], None]] = {}


@contextlib.contextmanager
def hook(name: str, fn: Callable[[int | None], None]):
    """Call fn(n) whenever the code reaches point `name` (tests only), until the block ends."""
    if name in _HOOKS:
        raise ValueError(f"fault point {name!r} already has a hook")
    _HOOKS[name] = fn
    try:
        yield
    finally:
        del _HOOKS[name]


def point(name: str, n: int | None = None) -> None:
    """Fail here if LORAKIT_FAULT names this point (and this n); run a test's hook for it."""
    if _HOOKS and name in _HOOKS:
        _HOOKS[name](n)
    if _FAULT is None or _FAULT[0] != name or (_FAULT[1] is not None and _FAULT[1] != n):
        return
    action = _FAULT[2]
    if action == "raise":
        raise RuntimeError(f"injected fault at {name}" + (f"@{n}" if n is not None else ""))
    if action == "killpg":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def arm(spec: str | None) -> None:
    """Set this process's fault as LORAKIT_FAULT=spec would have at start: for a child forked from a process
    that imported this module already (a test's fork server pays the imports once for many killed children)."""
    global _FAULT
    _FAULT = _parse(spec)

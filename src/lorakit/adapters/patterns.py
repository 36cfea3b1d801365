"""An adapter file's rank_pattern / alpha_pattern, matched once against its module paths, within a time limit.

The keys are regular expressions from the file's adapter_config.json: a hostile one backtracks catastrophically
(`([a-z_.0-9]+)+X` takes seconds per module path, doubling with each character), and Python's `re` holds the
interpreter lock while it runs, so no thread of the process (the HTTP loop, the engine) would move meanwhile.
So a file's patterns are matched once, when it is read, and the result (module path -> rank, alpha) is kept in
its LoraConfig (`resolved`) and in the registry beside the version: serving looks values up, never matches.

Keys without quantifiers or groups (plain and escaped names, `.` wildcards, `|` alternatives: what lorakit,
compose and PEFT's own files hold) cannot backtrack and are matched here. Any other key set is matched in a
separate Python process (`-I -S`: the standard library only) that is killed after PATTERN_SECONDS; the key it
was matching then is named in the refusal.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys

from lorakit.config import PATTERN_SECONDS, LoraConfig, match_pattern, pattern_regex

STORED_KEY = "lorakit.resolved_patterns"  # where the registry keeps the result beside a version's config
PLAIN_KEY = re.compile(r"(?:[A-Za-z0-9_\-.|]|\\[^A-Za-z0-9])*")  # no quantifier, group, class or escape class
LITERAL_KEY = re.compile(r"(?:[A-Za-z0-9_\-]|\\\.)+")  # a module name or path, its dots escaped
IN_PROCESS_MATCHES = 20_000  # plain keys x paths matched here; more go to the worker like any other key set

_WORKER = r"""
import json, sys
import re
job = json.loads(sys.stdin.read())
for field, keys in job["fields"]:
    left = list(job["paths"])
    for i, rx in enumerate(keys):
        print(json.dumps(["start", field, i]), flush=True)
        pat = re.compile(rx)
        hit = [p for p in left if pat.match(p)]
        taken = set(hit)
        left = [p for p in left if p not in taken]
        print(json.dumps(["done", field, i, hit]), flush=True)
"""


def resolve(cfg: LoraConfig, paths: list[str], timeout: float = PATTERN_SECONDS) -> dict[str, tuple[int, float]]:
    """module path -> (rank, alpha) for each of `paths` under cfg's patterns (PEFT's first-matching-key rule).
    ValueError naming the field and key if the matching does not finish within `timeout` seconds."""
    fields = [("rank_pattern", list(cfg.rank_pattern)), ("alpha_pattern", list(cfg.alpha_pattern))]
    keys = [k for _, ks in fields for k in ks]
    if all(LITERAL_KEY.fullmatch(k) for k in keys):
        first = _match_literal(fields, paths)
    elif all(PLAIN_KEY.fullmatch(k) for k in keys) and len(keys) * len(paths) <= IN_PROCESS_MATCHES:
        return {p: (int(match_pattern(cfg.rank_pattern, p, cfg.r)), float(match_pattern(cfg.alpha_pattern, p,
                                                                                          cfg.alpha)))
                for p in paths}
    else:
        first = _match_apart(fields, paths, timeout)  # (field, path) -> index of the first key matching it
    rank_vals, alpha_vals = list(cfg.rank_pattern.values()), list(cfg.alpha_pattern.values())
    out = {}
    for p in paths:
        i, j = first.get(("rank_pattern", p)), first.get(("alpha_pattern", p))
        out[p] = (int(cfg.r if i is None else rank_vals[i]), float(cfg.alpha if j is None else alpha_vals[j]))
    return out


def _match_literal(fields: list[tuple[str, list[str]]], paths: list[str]) -> dict:
    """Keys that are module names or paths: key L matches path P exactly when P == L or P ends with '.' + L
    (what `(.*\\.)?(L)$` says), so each path looks up its dotted suffixes: no regex, linear in the paths."""
    first = {}
    for field, keys in fields:
        index: dict[str, int] = {}
        for i, k in enumerate(keys):
            index.setdefault(k.replace("\\.", "."), i)
        for p in paths:
            parts = p.split(".")
            hits = [index[s] for s in (".".join(parts[j:]) for j in range(len(parts))) if s in index]
            if hits:
                first[(field, p)] = min(hits)
    return first


def _match_apart(fields: list[tuple[str, list[str]]], paths: list[str], timeout: float) -> dict:
    job = json.dumps({"paths": paths, "fields": [(f, [pattern_regex(k) for k in keys]) for f, keys in fields]})
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WORKER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(job, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        field, i = _running(out)
        key = dict(fields)[field][i] if field else "?"
        raise ValueError(f"{field} key {key!r} did not finish matching the adapter's {len(paths)} module paths "
                         f"within {timeout:g} s (a pattern that backtracks catastrophically); write patterns "
                         "without nested repetition") from None
    if proc.returncode != 0:
        raise ValueError(f"the adapter's rank_pattern / alpha_pattern could not be matched: "
                         f"{err.strip().splitlines()[-1] if err.strip() else f'exit {proc.returncode}'}")
    first = {}
    for line in out.splitlines():
        ev = json.loads(line)
        if ev[0] == "done":
            for p in ev[3]:
                first.setdefault((ev[1], p), ev[2])
    return first


def _running(out: str) -> tuple[str | None, int]:
    """The key the worker had started and not finished when it was stopped."""
    last = None
    for line in out.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            break  # a line cut by the kill
        last = ev if ev[0] == "start" else None
    return (last[1], last[2]) if last else (None, -1)


def to_json(resolved: dict[str, tuple[int, float]]) -> dict[str, list]:
    return {p: [r, a] for p, (r, a) in resolved.items()}


def from_json(data: object, paths: list[str]) -> dict[str, tuple[int, float]] | None:
    """A stored resolution for exactly `paths`, or None if it is not one (then the caller matches again)."""
    if not isinstance(data, dict) or set(data) != set(paths):
        return None
    out = {}
    for p, v in data.items():
        ok = isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and not isinstance(v[0], bool) \
            and v[0] > 0 and isinstance(v[1], (int, float)) and not isinstance(v[1], bool) \
            and math.isfinite(v[1]) and v[1] > 0
        if not ok:
            return None
        out[p] = (v[0], float(v[1]))
    return out


def attach(cfg: LoraConfig, paths: list[str], stored: object = None) -> None:
    """Give cfg its patterns' values for `paths` (from `stored` when it is a resolution of them, else matched
    by `resolve`). A config without patterns needs none."""
    if cfg.rank_pattern or cfg.alpha_pattern:
        cfg.resolved = from_json(stored, paths) if stored is not None else None
        if cfg.resolved is None:
            cfg.resolved = resolve(cfg, paths)

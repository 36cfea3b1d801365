"""Training data: JSONL (or CSV) rows -> token ids with labels on completion tokens only.

Row formats (one per file, detected from the first row's keys):
  prompt/completion  {"prompt": str, "completion": str}
  messages           {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  alpaca             {"instruction": str, "input": str (optional), "output": str}
  text               {"text": str}                      (loss on every token)
With `template="chat"` (the default when the tokenizer has a chat template), prompt/completion and alpaca rows
are rendered as a user turn and an assistant turn; loss falls on the assistant's tokens and its end-of-turn token.
"""
from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from lorakit.templates import chat_prompt, resolve_template

IGNORE = -100
FORMATS = {
    "prompt/completion": ({"prompt", "completion"}, set()),
    "messages": ({"messages"}, set()),
    "alpaca": ({"instruction", "output"}, {"input"}),
    "text": ({"text"}, set()),
    "tokens": ({"input_ids"}, {"labels"}),  # pre-tokenized; loss on every token, or where labels != -100
}
ROLES = {"system", "user", "assistant"}


def _detect(row: dict, where: str) -> str:
    for name, (required, _) in FORMATS.items():
        if required <= set(row):
            return name
    expected = "; ".join(f"{n}: {sorted(r | o)}" for n, (r, o) in FORMATS.items())
    raise ValueError(f"{where}: row has keys {sorted(row)}, which match no format; expected one of {expected}")


def _check_row(row, fmt: str, where: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    required, optional = FORMATS[fmt]
    missing = required - set(row)
    if missing:
        raise ValueError(f"{where}: missing key(s) {sorted(missing)} for the {fmt} format (file's first row)")
    extra = set(row) - required - optional
    if extra:
        raise ValueError(f"{where}: unexpected key(s) {sorted(extra)} for the {fmt} format; "
                         f"expected {sorted(required | optional)}")
    if fmt == "tokens":
        ids, labels = row["input_ids"], row.get("labels", row["input_ids"])
        for k, v in (("input_ids", ids), ("labels", labels)):
            if not isinstance(v, list) or not v or not all(type(x) is int for x in v):
                raise ValueError(f"{where}: {k!r} must be a non-empty list of integers")
        if len(labels) != len(ids) or min(ids) < 0:
            raise ValueError(f"{where}: 'labels' must be as long as 'input_ids' ({len(ids)}) and ids >= 0")
        return
    if fmt == "messages":
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: messages[{i}] must be {{'role': one of {sorted(ROLES)}, "
                                 f"'content': str}}, got {m!r}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{where}: messages has no assistant turn to learn from")
        return
    for k in required | (optional & set(row)):
        if not isinstance(row[k], str):
            raise ValueError(f"{where}: {k!r} must be a string, got {type(row[k]).__name__}")
    if fmt == "text" and not row["text"].strip():
        raise ValueError(f"{where}: 'text' is empty")
    if fmt == "prompt/completion" and not row["completion"]:
        raise ValueError(f"{where}: 'completion' is empty")


def load_rows(path: str | Path) -> tuple[list[dict], str]:
    """Read and validate a data file -> (rows, format). Errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    rows: list[tuple[int, dict]] = []
    text = _utf8(path)
    if path.suffix == ".csv":
        for i, r in enumerate(csv.DictReader(io.StringIO(text, newline="")), start=2):
            rows.append((i, {k: v for k, v in r.items() if k is not None and v is not None}))
    else:
        for i, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}); expected one JSON object per line") \
                    from None
            except RecursionError:
                raise ValueError(f"{path}:{i}: JSON nested too deeply") from None
    if not rows:
        raise ValueError(f"data file {str(path)!r} is empty; expected rows in one of the formats "
                         f"{list(FORMATS)}")
    first_line, first = rows[0]
    if not isinstance(first, dict):
        raise ValueError(f"{path}:{first_line}: expected a JSON object, got {type(first).__name__}")
    fmt = _detect(first, f"{path}:{first_line}")
    for line, row in rows:
        _check_row(row, fmt, f"{path}:{line}")
    return [r for _, r in rows], fmt


def _utf8(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are an error naming the file, line and byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at offset {e.start}); "
                         "save the file as UTF-8") from None


def row_format(row: dict) -> str:
    return _detect(row, "row")


def prompt_and_answer(row: dict) -> tuple[str | list[dict], str]:
    """A completion-style row -> (prompt, reference answer). Messages: all turns before the last
    assistant turn form the prompt."""
    fmt = row_format(row)
    if fmt == "prompt/completion":
        return row["prompt"], row["completion"]
    if fmt == "alpaca":
        inp = row.get("input") or ""
        return row["instruction"] + (f"\n\n{inp}" if inp else ""), row["output"]
    if fmt == "messages":
        msgs = row["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return msgs[:last], msgs[last]["content"]
    raise ValueError("text rows have no prompt/answer split; use prompt/completion, messages or alpaca rows")


def _segments(tok, row: dict, template: str) -> list[tuple[str, bool]]:
    """A row -> [(text, is_target)] in order."""
    fmt = row_format(row)
    if fmt == "text":
        return [(row["text"], True)]
    if fmt == "messages" or template == "chat":
        if fmt == "messages":
            msgs = row["messages"]
        else:
            prompt, answer = prompt_and_answer(row)
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        segs, done = [], ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            head = chat_prompt(tok, msgs[:i], add_generation_prompt=True) if i else ""
            full = chat_prompt(tok, msgs[:i + 1], add_generation_prompt=False)
            if not head.startswith(done) or not full.startswith(head):
                raise ValueError("the chat template does not render turns as a growing prefix; use plain text rows")
            segs.append((head[len(done):], False))
            answer = full[len(head):]
            # learn the answer and the end-of-turn marker, not the whitespace after it
            stripped = answer.rstrip()
            segs += [(stripped, True), (answer[len(stripped):], False)]
            done = full
        return segs
    prompt, answer = prompt_and_answer(row)
    return [(prompt, False), (answer, True)]


def tokenize_row(tok, row: dict, template: str, max_len: int) -> tuple[list[int], list[int]]:
    """-> (input_ids, labels), labels = IGNORE outside the target text. Truncated to max_len."""
    if "input_ids" in row:  # pre-tokenized
        return list(row["input_ids"][:max_len]), list(row.get("labels", row["input_ids"])[:max_len])
    ids: list[int] = []
    labels: list[int] = []
    if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False):
        ids.append(tok.bos_token_id)
        labels.append(IGNORE)
    for text, target in _segments(tok, row, template):
        if not text:
            continue
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        labels += t if target else [IGNORE] * len(t)
    if template == "plain" and row_format(row) != "messages" and tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
        labels.append(tok.eos_token_id)
    return ids[:max_len], labels[:max_len]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def build_examples(tok, rows: list[dict], template: str = "auto", max_len: int = 512) -> list[Example]:
    template = resolve_template(tok, template)
    out = []
    for i, row in enumerate(rows):
        ids, labels = tokenize_row(tok, row, template, max_len)
        if all(lab == IGNORE for lab in labels):
            raise ValueError(f"row {i + 1}: no target tokens left after truncation to max_len={max_len}")
        out.append(Example(ids, labels))
    return out


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (IGNORE on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        labels[r, :n] = torch.tensor(e.labels)
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(examples: list[Example], batch_size: int, seed: int, epoch: int, pad_id: int,
            shuffle: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Deterministic per (seed, epoch): a resumed run sees exactly the batches it would have seen."""
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed * 100_003 + epoch).shuffle(order)
    for i in range(0, len(order), batch_size):
        yield collate([examples[j] for j in order[i:i + batch_size]], pad_id)


# ---------------------------------------------------------------- packing
PACK_ALIGN = 128  # packed widths are multiples of this (FlexAttention's block size)


def pack(examples: list[Example], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Rows concatenated into ONE row of `width` tokens (default: their total, no padding), padding-free:
    input_ids, labels, position_ids (1, width) and seq_lens, a tuple of ints (the rows' lengths, then the tail's
    if any; host-side, so reading it never waits for the device) and target_pos, the positions whose next label
    is a target (ints: the fast path runs only them through the head).
    Each row keeps its own positions (0, 1, ...); its first label is IGNORE (the previous row's last token must
    not predict it), so the targets are exactly the unpacked batch's. The tail (width - total) is a segment of
    pad tokens with no target. Attention must stay within each segment (seq_lens: a document mask)."""
    total = sum(len(e.input_ids) for e in examples)
    width = total if width is None else width
    if width < total:
        raise ValueError(f"pack width {width} is below the rows' {total} tokens")
    ids = torch.full((1, width), pad_id, dtype=torch.long)
    labels = torch.full((1, width), IGNORE, dtype=torch.long)
    pos = torch.zeros((1, width), dtype=torch.long)
    lens, at = [], 0
    for e in examples:
        n = len(e.input_ids)
        ids[0, at:at + n] = torch.tensor(e.input_ids)
        labels[0, at + 1:at + n] = torch.tensor(e.labels[1:])
        pos[0, at:at + n] = torch.arange(n)
        lens.append(n)
        at += n
    if width > total:
        pos[0, total:] = torch.arange(width - total)
        lens.append(width - total)
    scored = tuple((labels[0, 1:] != IGNORE).nonzero()[:, 0].tolist())  # positions that predict a target
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "seq_lens": tuple(lens), "target_pos": scored}


def doc_ids(seq_lens, device=None) -> torch.Tensor:
    """Segment lengths -> (sum,) the segment each token belongs to."""
    lens = torch.as_tensor(seq_lens, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(lens)), lens).to(device)


def choose_widths(totals: list[int], max_shapes: int = 4, align: int = PACK_ALIGN) -> list[int]:
    """At most `max_shapes` packed widths (multiples of `align`) covering every total in `totals`, chosen to
    pad the fewest tokens over all of them (each total goes to the smallest width >= it): a compiled forward
    sees these shapes and no others. Exact dynamic programme over the distinct rounded-up totals."""
    if not totals:
        return []
    need: dict[int, int] = {}
    for t in totals:
        w = -(-max(t, 1) // align) * align
        need[w] = need.get(w, 0) + 1
    sizes = sorted(need)
    cnt = [need[s] for s in sizes]
    m, k = len(sizes), min(max_shapes, len(sizes))
    # cost(i, j): sizes[i..j] all padded up to sizes[j] (extra over their own rounded widths; the rest is fixed)
    pre_c, pre_s = [0], [0]
    for s, c in zip(sizes, cnt):
        pre_c.append(pre_c[-1] + c)
        pre_s.append(pre_s[-1] + s * c)

    def cost(i: int, j: int) -> int:
        return sizes[j] * (pre_c[j + 1] - pre_c[i]) - (pre_s[j + 1] - pre_s[i])
    inf = float("inf")
    best = [[inf] * m for _ in range(k + 1)]  # best[g][j]: sizes[..j] in g groups, the last ending at j
    back = [[-1] * m for _ in range(k + 1)]
    for j in range(m):
        best[1][j] = cost(0, j)
    for g in range(2, k + 1):
        for j in range(m):
            for i in range(j):
                c = best[g - 1][i] + cost(i + 1, j)
                if c < best[g][j]:
                    best[g][j], back[g][j] = c, i
    g = min(range(1, k + 1), key=lambda g: (best[g][m - 1], g))
    out, j = [], m - 1
    while j >= 0 and g >= 1:
        out.append(sizes[j])
        j, g = back[g][j], g - 1
    return sorted(out)


def width_for(total: int, widths: list[int]) -> int:
    """The smallest of `widths` holding `total` tokens (a total above them all: rounded up to the alignment)."""
    for w in widths:
        if w >= total:
            return w
    return -(-total // PACK_ALIGN) * PACK_ALIGN

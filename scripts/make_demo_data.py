"""Generate the demo task: rewrite a date written in everyday English (or a numeric style) as ISO 8601.

A real chore in data cleaning, small enough to learn on a CPU in minutes, with one right answer per prompt
(exact match). Dates are drawn uniformly from 1900-01-01..2099-12-31 with a fixed seed; the weekday, when
shown, is the true one. Output: data/demo/train.jsonl and data/demo/test.jsonl (prompt/completion rows).
Run: python scripts/make_demo_data.py
"""
import datetime as dt
import json
import random
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
INSTRUCTION = "Rewrite this date in ISO 8601 format (YYYY-MM-DD). Reply with the date only.\n"


def ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


STYLES = [
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day}, {d.year}",
    lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{d.strftime('%A')}, {MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",
    lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",
    lambda d: f"{MONTHS[d.month - 1]} {ordinal(d.day)} {d.year}",
]


def make(n: int, rng: random.Random, seen: set) -> list[dict]:
    start, span = dt.date(1900, 1, 1), (dt.date(2099, 12, 31) - dt.date(1900, 1, 1)).days
    rows = []
    while len(rows) < n:
        d = start + dt.timedelta(days=rng.randrange(span + 1))
        text = rng.choice(STYLES)(d)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"prompt": INSTRUCTION + text, "completion": d.isoformat()})
    return rows


def main():
    rng = random.Random(20261123)
    seen: set = set()
    out = Path(__file__).resolve().parent.parent / "data" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("test", 100), ("train", 1000)):  # test first: train never repeats a test prompt
        rows = make(n, rng, seen)
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {out / (name + '.jsonl')} ({n} rows)")


if __name__ == "__main__":
    main()

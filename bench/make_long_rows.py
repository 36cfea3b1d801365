"""A long-row chat data set for bench/gpu_train_data.py: rows of about 200 to 4,000 tokens (SmolLM2's tokenizer).

    python bench/make_long_rows.py OUT.jsonl [--rows 240] [--seed 0]

Each row is a messages row: the user asks for a summary of a report of N words (N drawn uniformly so that the
rendered row holds 200-4,000 tokens; about 1.12 tokens a word), the assistant answers with a summary of a tenth
of its length (at most 300 words) drawn from the report's own sentences. Deterministic per seed.
"""
from __future__ import annotations

import argparse
import json
import random

WORDS = ("the of and to in is was for that on with as by at from this be it are or an not which have has had "
         "were but all their they one been can more its other new some could time these two may first then do "
         "any like my now over such our man me even most made after also did many before must through back "
         "years where much your way well down should because each just those people how too little state good "
         "very make world still own see men work long get here between both life being under never day same "
         "another know while last might us great old year off come since against go came right used take three "
         "report revenue quarter market customer order shipping delivery invoice account service support team "
         "product price growth region sales costs margin forecast budget risk plan review update issue release "
         "server network storage latency request error failure recovery backup policy security audit contract").split()
TOKENS_PER_WORD = 1.12
OVERHEAD = 40  # the chat template's system prompt, the instruction and the turn markers, in tokens


def sentence(rng: random.Random) -> str:
    n = rng.randint(8, 18)
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def text_of(rng: random.Random, n_words: int) -> list[str]:
    out, count = [], 0
    while count < n_words:
        s = sentence(rng)
        out.append(s)
        count += s.count(" ") + 1
    return out


def make(rows: int, seed: int, lo: int = 200, hi: int = 4000) -> list[dict]:
    rng = random.Random(seed)
    data = []
    for _ in range(rows):
        target = rng.randint(lo, hi)
        words = max(20, int((target - OVERHEAD) / TOKENS_PER_WORD))
        answer_words = min(300, max(8, words // 11))
        report = text_of(rng, words - answer_words)
        summary = " ".join(rng.sample(report, k=max(1, min(len(report), answer_words // 13))))
        data.append({"messages": [
            {"role": "user", "content": "Summarize this report in a few sentences.\n\n" + " ".join(report)},
            {"role": "assistant", "content": summary}]})
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=240)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with open(a.out, "w") as f:
        for row in make(a.rows, a.seed):
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

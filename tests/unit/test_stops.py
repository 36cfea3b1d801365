"""Stop strings: the streaming matcher cuts the text exactly where a plain search of the whole text would, holds
back exactly what may still become a stop string, and a request's stop strings are bounded in count and length."""
import json
import random

import pytest

from lorakit.serve import protocol as P
from lorakit.serve.stops import MAX_STOP_CHARS, StopMatcher, TextStream


class PieceTok:
    """Token id -> a fixed piece of text (a stand-in for a tokenizer's decode)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def reference(pieces, ids, stops):
    """The text a request returns: the first token after which the text holds a stop string ends it, cut at
    the earliest such string's start."""
    text = ""
    for i in ids:
        text += pieces[i]
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return text[:min(hits)], True
    return text, False


@pytest.mark.parametrize("seed", range(40))
def test_streamed_pieces_equal_a_search_of_the_whole_text(seed):
    rng = random.Random(seed)
    alpha = "ab" if seed % 2 else "abc"
    pieces = ["".join(rng.choice(alpha) for _ in range(rng.randint(1, 3))) for _ in range(12)]
    stops = ["".join(rng.choice(alpha) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
    ids = [rng.randrange(len(pieces)) for _ in range(rng.randint(1, 30))]
    tok, want = PieceTok(pieces), reference(pieces, ids, stops)
    stream, out = TextStream(tok, stops), []
    for n, i in enumerate(ids):
        out.append(stream.add(i))
        if stream.stopped:
            break
        # what is sent never holds the start of a stop string that the text ends with: it could still become one
        text, sent = tok.decode(ids[:n + 1]), len("".join(out))
        assert all(len(text) - k >= sent for s in stops for k in range(1, len(s)) if text.endswith(s[:k]))
    out.append(stream.finish())
    assert ("".join(out), stream.stopped) == want


def test_a_long_stop_string_costs_each_character_once():
    """A stop string of n characters against n - 1 matching characters fed one at a time: a check of every prefix
    per token would do n^2 / 2 = 2e10 comparisons here; the automaton does about 2n."""
    n = 200_000
    m = StopMatcher(["a" * n])
    for _ in range(n - 1):
        assert m.feed("a") is None
    assert m.partial() == n - 1
    assert m.feed("a") == 0


def test_overlapping_and_repeated_patterns():
    m = StopMatcher(["abab", "bc"])
    assert m.feed("aba") is None and m.partial() == 3
    assert m.feed("bcab") == 0  # "abab" (at 0) and "bc" (at 3) both complete in this piece: the earliest start wins
    m = StopMatcher(["aab"])
    assert m.feed("aaaa") is None and m.partial() == 2
    assert m.feed("b") == 2


BASE = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("stop", [["x" * (MAX_STOP_CHARS + 1)], ["y" * 240_000] * 4,
                                  ["z" * (MAX_STOP_CHARS // 2 + 1)] * 2])
def test_stop_strings_longer_than_the_cap_are_refused_by_name(stop):
    with pytest.raises(P.APIError) as e:
        P.parse_request(P.parse_json(json.dumps({**BASE, "stop": stop}).encode()), "chat", {"base"},
                        P.Limits(100, 64, 256, 49152))
    assert e.value.status == 400 and e.value.param == "stop"
    assert str(MAX_STOP_CHARS) in e.value.message and str(sum(map(len, stop))) in e.value.message


def test_stop_strings_at_the_cap_are_accepted():
    stop = ["w" * (MAX_STOP_CHARS // 4)] * 4
    p = P.parse_request(P.parse_json(json.dumps({**BASE, "stop": stop}).encode()), "chat", {"base"},
                        P.Limits(100, 64, 256, 49152))
    assert p.stop == stop

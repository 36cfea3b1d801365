"""Stop strings: a request's `stop` list checked against the text it generates, in time linear in that text.

Each stop string gets a Knuth-Morris-Pratt automaton. Feeding it the generated characters one by one keeps, per
stop string, the length of its longest prefix that the text ends with: a full match means stop there, and the
largest partial match is how much text must be held back (it may yet become a stop string). Every character
costs amortized O(1) per stop string, so a token costs what its own characters cost, never the length of the
text or of the stop strings (checking `text.endswith(s[:k])` for every k was quadratic in a stop string's length:
four 240,000-character stop strings held the HTTP loop for seconds per token).

The request's stop strings are bounded too (protocol.parse_request): at most MAX_STOPS of them and
MAX_STOP_CHARS characters in all.
"""
from __future__ import annotations

MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 1024  # all stop strings of a request together


def _failure(s: str) -> list[int]:
    """fail[i]: the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class StopMatcher:
    """Feed text as it grows; `feed` returns the earliest start of a stop string completed by the new characters."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.fails = [_failure(s) for s in self.stops]
        self.state = [0] * len(self.stops)  # per stop string: how much of it the text ends with
        self.pos = 0  # characters fed so far

    def feed(self, new: str) -> int | None:
        hit = None
        for j, (s, fail) in enumerate(zip(self.stops, self.fails)):
            q, n = self.state[j], len(s)
            for i, c in enumerate(new):
                while q and s[q] != c:
                    q = fail[q - 1]
                if s[q] == c:
                    q += 1
                if q == n:
                    start = self.pos + i + 1 - n
                    hit = start if hit is None else min(hit, start)
                    q = fail[q - 1]
            self.state[j] = q
        self.pos += len(new)
        return hit

    def partial(self) -> int:
        """Characters at the end of the text fed so far that may still begin a stop string."""
        return max(self.state, default=0)


class TextStream:
    """Token ids -> text pieces, holding back incomplete UTF-8 and anything that may start a stop string."""

    def __init__(self, tok, stop: list[str]):
        self.tok, self.stop = tok, stop
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._matcher = StopMatcher(stop)

    def add(self, tid: int) -> str:
        self.ids.append(tid)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character is still incomplete
        m = self._matcher
        if not text.startswith(self.text[:m.pos]):  # the tokenizer re-spelled earlier text: match it again
            self._matcher = m = StopMatcher(self.stop)
        self.text = text
        hit = m.feed(text[m.pos:])
        if hit is not None:
            self.text, self.stopped = text[:hit], True
            return self._flush(len(self.text))
        return self._flush(len(text) - m.partial())

    def finish(self) -> str:
        if not self.stopped:
            self.text = self.tok.decode(self.ids, skip_special_tokens=True)
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        piece = self.text[self.sent: upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece

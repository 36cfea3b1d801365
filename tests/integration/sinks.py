"""What the engine tests hand to a request as its event sink: the tokens it streams, its end event, and an
optional callback after each token (to pace a row or act at a given point of its decoding)."""
import threading


class Collect:
    def __init__(self, on_token=None):
        self.tokens, self.end, self.done, self.on_token = [], None, threading.Event(), on_token

    def __call__(self, ev):
        if ev[0] == "token":
            self.tokens.append(ev[1])
            if self.on_token:
                self.on_token(len(self.tokens))
        else:
            self.end = ev
            self.done.set()

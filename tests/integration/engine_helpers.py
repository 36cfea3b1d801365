"""What the engine tests share: the tokenizer stand-in, tiny adapters saved from a tiny model, a request's use of
one of them, greedy generation outside the engine to compare with, and the event sink they hand to a request (the tokens it streams, its end event, and an optional callback after each token, to pace
a row or act at a given point of its decoding)."""
import threading
import types

import torch

from lorakit import LoraConfig, add_adapter, save_adapter, set_active
from lorakit.adapters.peft_files import read_adapter
from lorakit.generate import generate_ids
from lorakit.models import tiny_llama
from lorakit.serve.request import AdapterUse

TOK = types.SimpleNamespace(eos_token_id=2, pad_token_id=0)


def save_tiny_adapters(root, names="abc"):
    """Adapters `names` (r=4 on every linear layer, random B, seed = their index) saved under root/NAME from
    one tiny model; -> (root, that model with the adapters on it)."""
    m = tiny_llama()
    for i, n in enumerate(names):
        torch.manual_seed(i)
        add_adapter(m, LoraConfig(r=4, alpha=8, targets="all-linear", init_lora_weights=False), n)
        save_adapter(m, root / n, n)
    return root, m


def use(root, n, w=1.0):
    """Adapter root/n as a request names it (key and label n@1), weight w."""
    return AdapterUse(f"{n}@1", lambda: read_adapter(root / n), w, f"{n}@1")


def offline(m, name, prompt, n):
    """Greedy tokens of `prompt` on model m with adapter `name` active (None: the base), outside any engine."""
    set_active(m, name)
    out = generate_ids(m, TOK, [prompt], max_new_tokens=n)[0]
    set_active(m, None)
    return out


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

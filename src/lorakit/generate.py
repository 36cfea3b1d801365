"""Offline text generation (greedy by default), the reference the server must match token for token."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from lorakit import arch
from lorakit.templates import chat_prompt


def stop_ids(model, tok) -> set[int]:
    """Token ids that end a completion: the tokenizer's EOS and the generation config's."""
    ids = set()
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]) + [tok.eos_token_id]:
        if e is not None:
            ids.add(int(e))
    return ids


def encode_prompt(tok, prompt: str | list[dict]) -> list[int]:
    """Prompt text (or chat messages) -> token ids, without adding special tokens twice."""
    text = chat_prompt(tok, prompt) if isinstance(prompt, list) else prompt
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate_ids(model, tok, prompts: Sequence[list[int]], max_new_tokens: int = 64,
                 batch_size: int = 8, temperature: float = 0.0, seed: int = 0,
                 on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """Generate for token-id prompts; returns only the new ids (stopping at EOS, which is dropped).
    `on_batch(n)` is called after each batch of n prompts (a progress bar's update)."""
    device = next(model.parameters()).device
    stops = stop_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(stops, default=0)
    out: list[list[int]] = []
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(chunk):  # left padding: every row's last prompt token is at the end
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        new = [[] for _ in chunk]
        done = torch.zeros(len(chunk), dtype=torch.bool)
        past, kw = None, arch.cache_keyword(type(model))
        cur_ids, cur_pos = ids, pos
        for _ in range(max_new_tokens):
            o = model(input_ids=cur_ids, attention_mask=mask, position_ids=cur_pos, use_cache=True,
                      logits_to_keep=1, **{kw: past})
            past = getattr(o, kw)
            logits = o.logits[:, -1, :].float()  # (b, vocab)
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1).cpu()
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            else:
                nxt = logits.argmax(-1).cpu()
            for r in range(len(chunk)):
                if not done[r]:
                    if int(nxt[r]) in stops:
                        done[r] = True
                    else:
                        new[r].append(int(nxt[r]))
            if bool(done.all()):
                break
            cur_ids = nxt.to(device)[:, None]
            cur_pos = cur_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones(len(chunk), 1, dtype=mask.dtype, device=device)], dim=1)
        out.extend(new)
        if on_batch is not None:
            on_batch(len(chunk))
    model.train(was_training)
    return out


def generate(model, tok, prompts: Sequence[str | list[dict]], max_new_tokens: int = 64, batch_size: int = 8,
             temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Prompts (text or chat messages) -> completions (text)."""
    ids = [encode_prompt(tok, p) for p in prompts]
    outs = generate_ids(model, tok, ids, max_new_tokens, batch_size, temperature, seed)
    return [tok.decode(o, skip_special_tokens=True) for o in outs]

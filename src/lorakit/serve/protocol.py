"""The OpenAI wire format: parse and validate request bodies, shape responses and errors.

Plain functions over dicts (no pydantic models), so every rejection carries a message that names
the offending field and what was expected, in OpenAI's error shape:
    {"error": {"message": ..., "type": "invalid_request_error", "param": ..., "code": ...}}

The `model` field picks what runs:
    "<base name>" or "base"          the base model alone
    "support" / "support@2"          an adapter (its current version / version 2)
    "domain:0.7+tone:0.3"            a weighted stack, composed on the fly (exact sum of the weight changes)
    "mix:support-sales" / "...@2"    a mixture of LoRAs: its router weights its adapters per token (runs alone)
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

from lorakit.adapters.refs import MIX, parse_ref
from lorakit.serve.request import MAX_WEIGHT  # |w| of a stack weight: larger only pushes toward overflow
from lorakit.serve.stops import MAX_STOP_CHARS, MAX_STOPS

ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_STACK = 8


class APIError(Exception):
    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code, param)


@dataclass
class Limits:
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    context: int = 2048  # the model's max positions
    vocab_size: int = 0  # token ids in a prompt must be below this (0: unchecked)


@dataclass
class Parsed:
    kind: str  # "chat" | "completion"
    model: str
    prompt: list[dict] | str | list[int]
    stack: list[tuple[str, float]]  # [] = base; [(ref, weight), ...]
    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    ignore_eos: bool = False


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except ValueError as e:  # bad JSON, bad UTF-8, an integer of more than 4300 digits
        raise bad(f"request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise bad("request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def parse_model(model: object, base_ids: set[str]) -> list[tuple[str, float]]:
    """The `model` field -> [] for the base, else [(adapter ref, weight), ...]."""
    if not isinstance(model, str) or not model:
        raise bad(f"'model' must be a non-empty string, got {model!r}", "model")
    if model in base_ids:
        return []
    if model.startswith(MIX):
        try:
            parse_ref(model)
        except ValueError as e:
            raise bad(f"'model' {model!r}: {e} (a mixture runs alone: no '+' or weights)", "model",
                      "invalid_model") from None
        return [(model, 1.0)]
    parts = model.split("+")
    if len(parts) > MAX_STACK:
        raise bad(f"a stack may hold at most {MAX_STACK} adapters, got {len(parts)}", "model")
    stack = []
    for part in parts:
        ref, sep, w = part.partition(":")
        try:
            parse_ref(ref)
        except ValueError as e:
            raise bad(f"'model' {model!r}: {e}", "model", "invalid_model") from None
        weight = 1.0
        if sep:
            try:
                weight = float(w)
            except ValueError:
                raise bad(f"'model' {model!r}: weight {w!r} of {ref!r} is not a number", "model") from None
            if not (math.isfinite(weight) and abs(weight) <= MAX_WEIGHT):
                raise bad(f"'model' {model!r}: weight {w!r} of {ref!r} must be a finite number between "
                          f"{-MAX_WEIGHT:g} and {MAX_WEIGHT:g}", "model")
        stack.append((ref, weight))
    if len({r for r, _ in stack}) != len(stack):
        raise bad(f"'model' {model!r} names an adapter twice", "model")
    return stack


def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise bad(f"'{key}' must be {'an integer' if integer else 'a number'}, got {v!r}", key)
    if not (lo <= v <= hi):
        raise bad(f"'{key}' must be between {lo} and {hi}, got {v!r}", key)
    return v


def flag(body: dict, key: str) -> bool:
    """An optional boolean field: JSON true/false (or null/absent: false), never a string like "false"."""
    v = body.get(key)
    if v is not None and not isinstance(v, bool):
        raise bad(f"'{key}' must be true or false, got {v!r}", key)
    return bool(v)


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"messages[{i}] must be an object with 'role' one of {sorted(ROLES)}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for p in content:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise bad(f"messages[{i}].content: only text parts are supported", "messages")
                texts.append(p["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string, got {type(content).__name__}", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def _prompt(body: dict) -> str | list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p):
        return p
    raise bad("'prompt' must be a string, a list of token ids, or a list holding one of those "
              "(batched prompts are not supported: send one request per prompt)", "prompt")


def _refuse_unsupported(body: dict) -> None:
    if body.get("n", 1) != 1:
        raise bad(f"'n' must be 1 (one choice per request), got {body.get('n')!r}", "n")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise bad(f"'{key}' is not supported (only 0)", key)
    for key in ("logprobs", "echo", "suffix", "tools"):
        v = body.get(key)
        if not (v is None or v is False or (key != "logprobs" and isinstance(v, (str, list, dict)) and not v)):
            raise bad(f"'{key}' is not supported by this server", key)


def parse_request(body: dict, kind: str, base_ids: set[str], limits: Limits) -> Parsed:
    _refuse_unsupported(body)
    stack = parse_model(body.get("model"), base_ids)
    prompt = _messages(body) if kind == "chat" else _prompt(body)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is not None:
        max_tokens = _number({key: max_tokens}, key, None, 1, limits.max_new_tokens, integer=True)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise bad(f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them", "stop")
    if sum(map(len, stop)) > MAX_STOP_CHARS:
        raise bad(f"'stop' strings hold {sum(map(len, stop))} characters in all; this server accepts at most "
                  f"{MAX_STOP_CHARS}", "stop", "stop_too_long")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    stream = flag(body, "stream")
    return Parsed(kind, body["model"], prompt, stack, max_tokens,
                  temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
                  top_p=float(_number(body, "top_p", 1.0, 1e-6, 1.0)),
                  seed=_number(body, "seed", None, -(2 ** 63), 2 ** 63 - 1, integer=True),
                  stop=stop, stream=stream, include_usage=flag(opts, "include_usage"),
                  return_token_ids=flag(body, "return_token_ids"), ignore_eos=flag(body, "ignore_eos"))


def check_prompt(ids: list[int], max_tokens: int | None, kind: str, limits: Limits) -> int:
    """Validate the prompt's ids and length; return the max_tokens to use."""
    n_prompt = len(ids)
    if limits.vocab_size and ids and max(ids) >= limits.vocab_size:
        raise bad(f"prompt token id {max(ids)} is outside the vocabulary (0..{limits.vocab_size - 1})", "prompt")
    if n_prompt == 0:
        raise bad("the prompt is empty", "prompt" if kind == "completion" else "messages")
    if n_prompt > limits.max_prompt_tokens:
        raise bad(f"the prompt has {n_prompt} tokens; this server accepts at most {limits.max_prompt_tokens}",
                  "messages" if kind == "chat" else "prompt", "prompt_too_long")
    room = limits.context - n_prompt
    if room < 1:
        raise bad(f"the prompt ({n_prompt} tokens) fills the model's context of {limits.context}",
                  "prompt", "context_length_exceeded")
    if max_tokens is None:
        return min(room, limits.max_new_tokens if kind == "chat" else 16)
    if max_tokens > room:
        raise bad(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the model's context of "
                  f"{limits.context}", "max_tokens", "context_length_exceeded")
    return max_tokens


def parse_score(body: dict, base_ids: set[str], limits: Limits) -> tuple[Parsed, str | list[int]]:
    """POST /v1/score: `model`, the prompt as `messages` (rendered with the chat template exactly as
    /v1/chat/completions renders it for that model) or `prompt` (text or token ids), and the answer to score as
    `completion` (token ids, e.g. a chat completion's `token_ids`, or text, tokenized without special tokens)."""
    stack = parse_model(body.get("model"), base_ids)
    if ("messages" in body) == ("prompt" in body):
        raise bad("send the prompt as either 'messages' (chat) or 'prompt' (text or token ids)", "messages")
    kind = "chat" if "messages" in body else "completion"
    prompt = _messages(body) if kind == "chat" else _prompt(body)
    c = body.get("completion")
    ids = isinstance(c, list) and c and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in c)
    if not (ids or (isinstance(c, str) and c)):
        raise bad("'completion' must be the answer to score: a non-empty string or list of token ids", "completion")
    return Parsed(kind, body["model"], prompt, stack, None), c


def check_completion(ids: list[int], n_prompt: int, limits: Limits) -> None:
    """The answer to score: ids in the vocabulary, at most max_prompt_tokens of them, prompt + answer in context."""
    if not ids:
        raise bad("'completion' holds no tokens", "completion")
    if limits.vocab_size and max(ids) >= limits.vocab_size:
        raise bad(f"completion token id {max(ids)} is outside the vocabulary (0..{limits.vocab_size - 1})",
                  "completion")
    if len(ids) > limits.max_prompt_tokens:
        raise bad(f"the completion has {len(ids)} tokens; this server scores at most {limits.max_prompt_tokens}",
                  "completion", "completion_too_long")
    if n_prompt + len(ids) > limits.context:
        raise bad(f"prompt ({n_prompt} tokens) + completion ({len(ids)} tokens) exceeds the model's context of "
                  f"{limits.context}", "completion", "context_length_exceeded")


def score_response(p: Parsed, reference: str, n_prompt: int, ids: list[int], score) -> dict:
    """score: serve.score.Score, per completion token."""
    s = score.summary()
    return {"id": "score-" + uuid.uuid4().hex[:24], "object": "score", "created": int(time.time()),
            "model": p.model, "reference": reference, "completion_token_ids": ids, "kl": score.kl,
            "logprobs": score.logprobs, "base_logprobs": score.base_logprobs, "kl_mean": s["mean"],
            "kl_max": s["max"], "kl_sum": s["sum"], "usage": usage(n_prompt, len(ids))}


# ---------------------------------------------------------------- responses
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(n_prompt: int, n_out: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


def response(p: Parsed, rid: str, text: str, reason: str, ids: list[int], n_prompt: int) -> dict:
    choice: dict = {"index": 0, "finish_reason": reason, "logprobs": None}
    if p.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    if p.return_token_ids:
        choice["token_ids"] = ids
    return {"id": rid, "object": "chat.completion" if p.kind == "chat" else "text_completion",
            "created": int(time.time()), "model": p.model, "choices": [choice], "usage": usage(n_prompt, len(ids))}


def chunk(p: Parsed, rid: str, text: str | None, reason: str | None = None, ids: list[int] | None = None,
          role: bool = False) -> dict:
    choice: dict = {"index": 0, "finish_reason": reason, "logprobs": None}
    if p.kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    if p.return_token_ids and ids is not None:
        choice["token_ids"] = ids
    return {"id": rid, "object": "chat.completion.chunk" if p.kind == "chat" else "text_completion",
            "created": int(time.time()), "model": p.model, "choices": [choice]}


def usage_chunk(p: Parsed, rid: str, n_prompt: int, n_out: int) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if p.kind == "chat" else "text_completion",
            "created": int(time.time()), "model": p.model, "choices": [], "usage": usage(n_prompt, n_out)}

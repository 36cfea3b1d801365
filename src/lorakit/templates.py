"""Prompt templates: how a prompt is rendered before the model answers (the tokenizer's chat template, or plain
text), what an adapter records about that, and which template to use for an adapter. Training, eval, generation
and the server all render through here, so an adapter sees the prompts it was trained on."""
from __future__ import annotations

import hashlib
import json


def chat_prompt(tok, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render chat messages with the model's own chat template (plain 'role: text' lines if it has none)."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + ("\nassistant:" if add_generation_prompt else "")


def resolve_template(tok, template: str = "auto") -> str:
    if template not in ("auto", "chat", "plain"):
        raise ValueError(f"template {template!r} unknown; expected auto, chat or plain")
    if template == "auto":
        return "chat" if getattr(tok, "chat_template", None) else "plain"
    return template


def chat_template_sha256(tok) -> str | None:
    """sha256 of the tokenizer's chat template text (None if it has none)."""
    t = getattr(tok, "chat_template", None)
    if not t:
        return None
    text = t if isinstance(t, str) else json.dumps(t, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def template_info(tok, template: str = "auto") -> dict:
    """How training rows were rendered, for an adapter's lorakit metadata:
    {"template": "chat" | "plain", "chat_template_sha256": str | None}."""
    return {"template": resolve_template(tok, template), "chat_template_sha256": chat_template_sha256(tok)}


def pick_template(tok, requested: str | None, recorded: dict[str, dict]) -> tuple[str, list[str]]:
    """The template to render prompts with -> (template, warnings).

    requested: None (follow the adapters' recorded template; "auto" when none is recorded) or auto/chat/plain.
    recorded: adapter name -> its lorakit metadata (keys of `template_info`; PEFT adapters have none).
    A recorded template that differs from the one used, or a chat template that differs from the tokenizer's,
    gives a warning naming both."""
    recs = {n: m for n, m in recorded.items() if isinstance(m, dict) and m.get("template") in ("chat", "plain")}
    if requested is None:
        template = next(iter(recs.values()))["template"] if recs else resolve_template(tok, "auto")
        how = f"the template of adapter {next(iter(recs))!r}" if recs else "--template auto"
    else:
        template = resolve_template(tok, requested)
        how = f"--template {requested}" + (f" ({template})" if requested == "auto" else "")
    warnings = []
    now_sha = chat_template_sha256(tok)
    for name, m in recs.items():
        if m["template"] != template:
            warnings.append(f"adapter {name!r} was trained on prompts rendered {m['template']!r}, but prompts here "
                            f"are rendered {template!r} ({how}); answers may differ from training. "
                            f"Use --template {m['template']} (or leave --template out) to match")
        elif template == "chat" and m.get("chat_template_sha256") and now_sha \
                and m["chat_template_sha256"] != now_sha:
            warnings.append(f"adapter {name!r} was trained with chat template sha256 "
                            f"{m['chat_template_sha256'][:12]}, but this tokenizer's is {now_sha[:12]}")
    return template, warnings


def render_prompt(tok, prompt: str | list[dict], template: str) -> str:
    """The exact text the model sees before its answer (shared by training, eval and generation)."""
    if isinstance(prompt, list):
        return chat_prompt(tok, prompt)
    if template == "chat":
        return chat_prompt(tok, [{"role": "user", "content": prompt}])
    return prompt

"""What a request's `model` resolves to in the registry: the adapters it runs (and, for `mix:name[@N]`, the
mixture gating them per token), and how a chat prompt is rendered for them (the template they were trained on)."""
from __future__ import annotations

import functools
import logging

from lorakit.adapters.peft_files import read_adapter, read_metadata
from lorakit.adapters.mixtures import read_mixture, resolve_mixture
from lorakit.adapters.patterns import STORED_KEY as PATTERNS_KEY
from lorakit.adapters.pg import RegistryUnavailable
from lorakit.adapters.registry import MIX, IncompatibleAdapter, Registry, UnknownAdapter
from lorakit.serve import protocol as P
from lorakit.serve.request import MAX_WEIGHT, AdapterUse, MixtureUse

log = logging.getLogger("lorakit.serve")


def registry_error(e: Exception) -> P.APIError:
    if isinstance(e, RegistryUnavailable):
        return P.APIError(503, str(e), "registry_unavailable")
    if isinstance(e, UnknownAdapter):
        return P.APIError(404, str(e), "model_not_found", "model")
    if isinstance(e, IncompatibleAdapter):
        return P.APIError(409, str(e), "incompatible_adapter")
    return P.APIError(400, str(e), "invalid_value")


def _use(registry, v, weight: float = 1.0) -> AdapterUse:
    # the slot key is the content hash: a name re-added with other files can never hit stale weights; the files
    # are checked against it when they are loaded (registry.local_files); its rank/alpha patterns as matched at
    # add time (adapters/patterns.py): no request runs their regexes
    return AdapterUse(v.sha256, lambda res=v.config.get(PATTERNS_KEY): read_adapter(registry.local_files(v), res),
                      weight, v.ref, recorded_rank(v.config))


def served_header(uses, mixture) -> str:
    """What ran, as resolved when the request arrived: 'name@N#<sha256 prefix>' per adapter (and mixture), or
    'base'; clients and tests check which version served them."""
    parts = [f"{u.label}#{u.key[:16]}" for u in uses] + ([f"{mixture.label}#{mixture.key[:16]}"] if mixture else [])
    return ",".join(parts) or "base"


def recorded_rank(config: dict) -> int:
    """An adapter version's largest module rank from its registry record (0 where the record cannot tell: patterns
    matched before lorakit stored their values; the slot bank checks the file's own ranks then)."""
    resolved, r = config.get(PATTERNS_KEY), config.get("r")
    if isinstance(resolved, dict) and resolved:
        ranks = [v[0] for v in resolved.values() if isinstance(v, list) and v and isinstance(v[0], int)]
        return max(ranks, default=0)
    return r if isinstance(r, int) and not config.get("rank_pattern") else 0


def resolve_stack(registry: Registry, stack: list[tuple[str, float]]) -> tuple[list[AdapterUse], MixtureUse | None]:
    """The parsed `model` -> the adapters a request uses and, for 'mix:name[@N]', the mixture gating them
    (its pinned adapter versions, in gate order)."""
    try:
        if len(stack) == 1 and stack[0][0].startswith(MIX):
            mix, adapters = resolve_mixture(registry, stack[0][0])
            return [_use(registry, a) for a in adapters], MixtureUse(
                mix.sha256, lambda: read_mixture(registry.local_files(mix)), mix.ref)
        uses = [_use(registry, registry.resolve(ref), weight) for ref, weight in stack]
    except ValueError as e:
        raise registry_error(e) from None
    check_weight_sum(uses)
    return uses, None


def check_weight_sum(uses: list[AdapterUse]) -> None:
    """The |w| <= MAX_WEIGHT bound holds per adapter version, whatever it is called: 'a:10+a@1:10' (or the same
    files under two names) would otherwise run one adapter at weight 20. 400 naming the refs and the limit."""
    total: dict[str, list] = {}
    for u in uses:
        t = total.setdefault(u.key, [0.0, []])
        t[0] += abs(u.weight)
        t[1].append(u.label)
    for size, labels in total.values():
        if len(labels) > 1 and size > MAX_WEIGHT:
            raise P.bad(f"'model' names one adapter version {len(labels)} times ({', '.join(labels)}) with weights "
                        f"whose sizes sum to {size:g}; the limit is {MAX_WEIGHT:g} per adapter version", "model")


@functools.lru_cache(maxsize=256)
def _adapter_meta(path: str) -> dict:
    return read_metadata(path)  # a registry version's files never change


def _meta(registry: Registry, ref: str) -> dict:
    """The recorded template of an adapter version, or of a mixture (its router's training rows)."""
    v = registry.resolve(ref)
    if v.kind == "mixture":
        m = v.config.get("manifest", {})
        return {k: m[k] for k in ("template", "chat_template_sha256") if k in m}
    return _adapter_meta(str(v.path if v.path.is_dir() else registry.local_files(v)))


_warned: set[str] = set()


def chat_prompt_for(registry: Registry, tok, p: P.Parsed) -> str | list[dict]:
    """A chat request's prompt as the named adapter saw its rows in training: a single user turn for an
    adapter trained on plain-rendered rows is its text as is; otherwise the chat template renders the messages
    (as for the base). Mismatches inside a stack are logged once."""
    from lorakit.templates import pick_template

    msgs = p.prompt
    if p.kind != "chat" or not p.stack:
        return msgs
    metas = {ref: _meta(registry, ref) for ref, _ in p.stack}
    if not any(m.get("template") for m in metas.values()):
        return msgs  # a PEFT adapter records nothing: the chat template, as for the base
    template, warns = pick_template(tok, None, metas)
    for w in warns:
        if w not in _warned:
            _warned.add(w)
            log.warning(w)
    single_user = len(msgs) == 1 and msgs[0]["role"] == "user"
    return msgs[0]["content"] if template == "plain" and single_user else msgs

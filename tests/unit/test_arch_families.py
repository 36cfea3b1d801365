"""The model description (lorakit.arch) and the server's forward (serve/forward.py) on a tiny random model of each
described family, every family feature switched on (models.TINY: sliding windows shorter than the prompts, Gemma
2's attention and logit soft-caps, q/k norms, partial RoPE, fused qkv and gate_up, sandwich norms with perturbed
weights): the server's prefill, decode, chunked extend and no-cache forward give the model's own logits, and a model type
outside the description is refused by name."""
import pytest
import torch

from lorakit import arch
from lorakit.models import TINY, tiny_decoder, tiny_llama
from lorakit.serve import forward

FAMILIES = list(TINY)
LENGTHS = [3, 9, 14, 20]  # rows of a batch; 14 and 20 pass the tiny models' window of 8


def _prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in LENGTHS]


def _tol(ref: torch.Tensor) -> float:
    """fp32 rounding of sums over the hidden size, relative to the logits' own scale."""
    return 1e-5 * (1.0 + ref.abs().max().item())


def test_described_families_are_the_served_ones():
    assert set(FAMILIES) == set(arch.SUPPORTED) == {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text",
                                                    "phi3"}


@pytest.mark.parametrize("kind", FAMILIES)
def test_prefill_and_decode_give_the_models_logits(kind):
    model = tiny_decoder(kind)
    forward.check_supported(model)
    prompts = _prompts()
    cache = forward.RowCache(model, len(prompts), chunk=16)
    got = forward.prefill(model, cache, slice(0, len(prompts)), prompts)  # (n, vocab), rows of 4 lengths
    seqs = [list(p) for p in prompts]
    for step in range(6):  # each step: every row's next token at its own position, up to 26 > the window
        for r, s in enumerate(seqs):
            ref = model(torch.tensor([s])).logits[0, -1]
            assert (got[r] - ref).abs().max() <= _tol(ref), (kind, step, r)
        nxt = got.argmax(-1).tolist()
        for s, t in zip(seqs, nxt):
            s.append(t)
        got = forward.decode(model, cache, nxt, [len(s) - 1 for s in seqs])


@pytest.mark.parametrize("kind", FAMILIES)
def test_no_cache_forward_gives_the_models_logits(kind):
    model = tiny_decoder(kind, seed=1)
    ids = torch.tensor(_prompts(1)[-1:] * 2)  # (2, 20)
    ref = model(ids).logits
    got = arch.logits(model, forward.hidden(model, ids))
    assert (got - ref).abs().max() <= _tol(ref)


LONGROPE = dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0, 2.0, 4.0, 8.0]},
                original_max_position_embeddings=16)  # phi3: rotary dims / 2 = head 16 x partial 0.5 / 2


@pytest.mark.parametrize("kind", FAMILIES + ["phi3-longrope"])
def test_extend_in_chunks_gives_the_models_logits(kind):
    """A long prompt or a scored text runs a chunk at a time (forward.extend): chunks of 6 over 20 tokens, so a
    chunk's queries see keys of earlier chunks and windows of 8 reach back across chunk boundaries; with longrope
    the first chunks (inside the original 16 positions) take the long factors that the whole text's forward does."""
    model = tiny_decoder(kind.split("-")[0], seed=2, **(LONGROPE if kind.endswith("longrope") else {}))
    ids = torch.tensor(_prompts(2)[-1:] * 2)  # (2, 20)
    ref = model(ids).logits
    cache = forward.RowCache(model, 2, chunk=16)
    got = torch.cat([arch.logits(model, forward.extend(model, cache, slice(0, 2), ids[:, i:i + 6], i, 20))
                     for i in range(0, ids.shape[1], 6)], dim=1)
    assert (got - ref).abs().max() <= _tol(ref)


@pytest.mark.parametrize("kind", ["mistral", "gemma2", "gemma3_text", "qwen3", "phi3"])
def test_each_feature_changes_the_numbers(kind):
    """The parity above would hold trivially if a feature changed nothing on these models: without its window,
    soft-cap, q/k norm or partial RoPE the forward's logits move by more than the tolerance."""
    model = tiny_decoder(kind)
    ids = torch.tensor(_prompts()[-1:])  # (1, 20)
    ref = model(ids).logits
    plain = {"mistral": dict(sliding_window=None), "gemma2": dict(attn_logit_softcapping=None),
             "gemma3_text": dict(sliding_window=64), "qwen3": {}, "phi3": dict(partial_rotary_factor=1.0)}[kind]
    other = tiny_decoder(kind, **plain)
    if kind == "qwen3":
        for layer in arch.decoder_layers(other):  # an identity q/k norm
            parts = arch.layer_parts(layer)
            parts.q_norm.weight.fill_(1.0)
            parts.k_norm.weight.fill_(1.0)
    assert (arch.logits(other, forward.hidden(other, ids)) - ref).abs().max() > 100 * _tol(ref)


def test_longrope_rows_get_their_own_factors():
    """Phi-3's longrope switches to its long factors once a sequence passes the original context: a batch of a
    short and a long row gives each the logits it has alone."""
    model = tiny_decoder("phi3", **LONGROPE)
    assert arch.rope_type(model) == "longrope"
    prompts = _prompts()[1:4:2]  # 9 and 20 tokens: one row inside the original 16, one past it
    cache = forward.RowCache(model, 2, chunk=16)
    got = forward.prefill(model, cache, slice(0, 2), prompts)
    for r, p in enumerate(prompts):
        ref = model(torch.tensor([p])).logits[0, -1]
        assert (got[r] - ref).abs().max() <= _tol(ref), r


def test_other_model_types_are_refused_by_name():
    model = tiny_llama()
    model.config.model_type = "gpt_neox"
    with pytest.raises(ValueError) as e:
        forward.check_supported(model)
    assert "'gpt_neox'" in str(e.value) and "llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3" in str(e.value)


def test_stateful_rope_is_refused():
    model = tiny_decoder("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="'dynamic'"):
        forward.check_supported(model)

"""GGUF files for llama.cpp and Ollama: a (merged) Llama-family model, and a LoRA adapter in llama.cpp's layout.

Model (`write_model_gguf`): the tensors under llama.cpp's names (token_embd, blk.N.attn_q, ..., output_norm,
output), q and k rows permuted the way llama.cpp's converter does (its rotary embedding pairs dimensions i and
i + d/2 of a head as adjacent elements; transformers' GGUF reader permutes them back), 1-D tensors in F32 and
the rest in the chosen type (F32, F16, BF16 or Q8_0; a row that is not a whole number of Q8_0 blocks stays F16,
as llama.cpp does), the hyperparameters under `llama.*` and the tokenizer under `tokenizer.ggml.*` (byte-level
BPE: the vocabulary, token types, merges, special ids, the chat template).

Adapter (`write_lora_gguf`): general.type = "adapter", adapter.type = "lora", adapter.lora.alpha; per adapted
weight `<gguf name>.lora_a` (numpy (r, in), ggml ne [in, r]) and `.lora_b` (numpy (out, r)); the token
embedding's lora_a is transposed (llama.cpp gathers its rows by token). llama.cpp scales each module by
alpha / r with r read from lora_b, so per-module scales that differ from alpha / r (rank_pattern with
alpha_pattern, rsLoRA) are folded into lora_b. q/k lora_b rows get the model's permutation (A is untouched).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch

from lorakit.adapters.peft_files import read_adapter
from lorakit.files import atomic_write_file

log = logging.getLogger(__name__)

ARCH = "llama"
MODEL_TYPES = {"llama", "mistral"}  # the model types llama.cpp's converter writes as arch "llama"
OUTTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
# transformers' module path (before ".weight"/".bias") -> llama.cpp's tensor name
GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_name(module: str) -> str | None:
    """'model.layers.3.self_attn.q_proj' -> 'blk.3.attn_q' (None for a module llama.cpp has no tensor for)."""
    if module in GLOBAL:
        return GLOBAL[module]
    m = _LAYER_RE.match(module)
    if m and m.group(2) in LAYER:
        return f"blk.{m.group(1)}.{LAYER[m.group(2)]}"
    return None


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k permutation of a projection's output rows (out, ...): within each head, the rotary
    halves [x_0..x_{d/2-1}, x_{d/2}..] become interleaved pairs (x_0, x_{d/2}, x_1, ...)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads(config, gname: str) -> int | None:
    """The head count whose permutation this tensor takes (None: not permuted)."""
    if gname.endswith(".attn_q"):
        return config.num_attention_heads
    if gname.endswith(".attn_k"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def check_config(config) -> None:
    mt = getattr(config, "model_type", None)
    if mt not in MODEL_TYPES:
        raise ValueError(f"GGUF export writes Llama-family models ({sorted(MODEL_TYPES)}); this model is {mt!r}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind not in (None, "default"):
        raise ValueError(f"GGUF export does not write rope scaling {kind!r} yet (only unscaled rotary embeddings)")


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# ---------------------------------------------------------------- tokenizer
def _pre_tokenizer(tj: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (how text is split before BPE)."""
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds[:1] == ["Split"] and kinds[-1:] == ["ByteLevel"]:
        regex = (parts[0].get("pattern") or {}).get("Regex", "")
        if r"\p{N}{1,3}" in regex and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in regex:
            return "llama-bpe"
        if r"\p{N}|" in regex or regex.endswith(r"\p{N}"):
            return "qwen2"
    log.warning("pre-tokenizer %s not recognised; writing 'default' (llama.cpp may split text differently)", kinds)
    return "default"


def tokenizer_fields(tok, n_vocab: int) -> dict:
    """tokenizer.ggml.* for a byte-level BPE tokenizer, padded to the model's n_vocab embedding rows."""
    backend = getattr(tok, "backend_tokenizer", None)
    tj = json.loads(backend.to_str()) if backend is not None else {}
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in json.dumps(tj.get("decoder")):
        raise ValueError("GGUF export writes byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen2, ...); "
                         f"this tokenizer is {model.get('type')!r}" + (" with byte fallback (SentencePiece-like)"
                                                                      if model.get("byte_fallback") else ""))
    tokens: list[str | None] = [None] * n_vocab
    types = [5] * n_vocab  # UNUSED
    for text, i in model["vocab"].items():
        if i < n_vocab:
            tokens[i], types[i] = text, 1  # NORMAL
    for a in tj.get("added_tokens", []):
        if a["id"] < n_vocab:
            tokens[a["id"]], types[a["id"]] = a["content"], 3 if a.get("special") else 4  # CONTROL / USER_DEFINED
    if len(tok) > n_vocab:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but the model only {n_vocab} embedding rows")
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {k: getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "unk", "pad")}
    return {"pre": _pre_tokenizer(tj), "tokens": tokens, "types": types, "merges": merges, "ids": ids,
            "add_bos": bool(getattr(tok, "add_bos_token", False)),
            "chat_template": tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None}


def _add_tokenizer(w, f: dict) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(f["pre"])
    w.add_token_list(f["tokens"])
    w.add_token_types(f["types"])
    w.add_token_merges(f["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                     ("pad", w.add_pad_token_id)):
        if f["ids"][key] is not None:
            add(int(f["ids"][key]))
    w.add_add_bos_token(f["add_bos"])
    if f["chat_template"]:
        w.add_chat_template(f["chat_template"])


# ---------------------------------------------------------------- model
def encode(t: torch.Tensor, outtype: str) -> tuple[np.ndarray, "object"]:
    """A tensor -> (array to write, its GGML type): 1-D stays F32; Q8_0 needs rows of whole 32-blocks (else F16)."""
    import gguf

    data = t.detach().to(torch.float32).cpu().numpy()
    qtype = gguf.GGMLQuantizationType[OUTTYPES[outtype]]
    if data.ndim <= 1:
        qtype = gguf.GGMLQuantizationType.F32
    elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, qtype), qtype


def model_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor as llama.cpp wants it) for every weight the GGUF holds."""
    config = model.config
    check_config(config)
    out = []
    for key, t in model.state_dict().items():
        module, _, kind = key.rpartition(".")
        if "rotary_emb" in module:
            continue
        if module == "lm_head" and getattr(config, "tie_word_embeddings", False):
            continue  # llama.cpp reads the embedding when there is no output tensor
        name = gguf_name(module)
        if name is None or kind not in ("weight", "bias"):
            raise ValueError(f"no llama.cpp tensor for {key!r} (is the adapter merged? lorakit export merges it)")
        heads = _heads(config, name)
        out.append((f"{name}.{kind}", permute_rows(t, heads) if heads else t))
    return out


def write_model_gguf(model, tok, path: str | Path, outtype: str = "f16", name: str | None = None) -> Path:
    """Write `model` (adapters merged already) and its tokenizer as one GGUF file llama.cpp loads."""
    import gguf

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r} unknown; expected one of {sorted(OUTTYPES)}")
    config = model.config
    tensors = model_tensors(model)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    tokf = tokenizer_fields(tok, n_vocab)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), ARCH)
        w.add_type("model")
        w.add_name(name or Path(str(getattr(config, "name_or_path", "") or "model")).name)
        w.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
        w.add_embedding_length(config.hidden_size)
        w.add_block_count(config.num_hidden_layers)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        w.add_rope_freq_base(_rope_theta(config))
        w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        w.add_rope_dimension_count(_head_dim(config))
        if _head_dim(config) != config.hidden_size // config.num_attention_heads:
            w.add_key_length(_head_dim(config))
            w.add_value_length(_head_dim(config))
        w.add_vocab_size(n_vocab)
        w.add_file_type(int(ftype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(w, tokf)
        _finish(w, tensors, outtype)

    path = Path(path)
    atomic_write_file(path, write)
    log.info("wrote %s: %d tensors, %s", path, len(tensors), outtype)
    return path


def _finish(w, tensors: list[tuple[str, torch.Tensor]], outtype: str) -> None:
    """Add the tensors encoded as `outtype`, then write the header, the metadata and the tensors, and close."""
    for tname, t in tensors:
        data, qtype = encode(t, outtype)
        w.add_tensor(tname, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------- adapter
def lora_tensors(adapter_path: str | Path, config) -> tuple[float, list[tuple[str, torch.Tensor]]]:
    """(alpha, [(name, tensor)]) of a LoRA adapter in llama.cpp's layout, for a base with `config`."""
    check_config(config)
    af = read_adapter(adapter_path)
    cfg = af.config
    if cfg.use_dora or any(k.endswith(".lora_magnitude_vector") for k in af.tensors):
        raise ValueError(f"adapter {str(adapter_path)!r} uses DoRA, which llama.cpp's LoRA format cannot hold; "
                         f"merge it (lorakit export without --adapter-only)")
    alpha = float(cfg.alpha)
    if alpha <= 0:
        raise ValueError(f"adapter {str(adapter_path)!r} has alpha {cfg.alpha}; llama.cpp needs alpha > 0")
    out = []
    for module, t in af.modules().items():
        name = gguf_name(module)
        if name is None or (name == "output" and getattr(config, "tie_word_embeddings", False)):
            raise ValueError(f"adapter module {module!r} has no llama.cpp tensor to adapt")
        A, B = t["lora_A"].float(), t["lora_B"].float()  # (r, in), (out, r); embedding: (r, vocab), (dim, r)
        r = A.shape[0]
        scale = cfg.scale_for(module, r=r)
        B = B * (scale * r / alpha)  # llama.cpp applies alpha / r: fold the rest of this module's scale into B
        heads = _heads(config, name)
        if heads:
            B = permute_rows(B, heads)
        if name == "token_embd":
            A = A.T.contiguous()  # (vocab, r): llama.cpp gathers rows of lora_a by token id
        out += [(f"{name}.weight.lora_a", A), (f"{name}.weight.lora_b", B)]
    return alpha, out


def write_lora_gguf(adapter_path: str | Path, config, path: str | Path, outtype: str = "f32") -> Path:
    """Write a LoRA adapter as a llama.cpp LoRA GGUF (llama.cpp --lora FILE, Ollama ADAPTER FILE)."""
    import gguf

    if outtype not in ("f32", "f16", "bf16"):
        raise ValueError(f"adapter outtype {outtype!r} unknown; expected f32, f16 or bf16")
    alpha, tensors = lora_tensors(adapter_path, config)

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), ARCH)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_name(Path(adapter_path).name)
        _finish(w, tensors, outtype)

    path = Path(path)
    atomic_write_file(path, write)
    return path

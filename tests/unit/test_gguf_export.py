"""GGUF export: a merged model that transformers' GGUF reader loads back with the merged model's logits (to the
type's rounding: exactly the logits of the same weights rounded the same way), and a LoRA adapter in
llama.cpp's layout (names, shapes, alpha, and the weight change llama.cpp would add)."""
import copy

import pytest
import torch

gguf = pytest.importorskip("gguf")

from lorakit import LoraConfig, add_adapter, save_adapter  # noqa: E402
from lorakit.adapters.gguf_export import (check_config, permute_rows, write_lora_gguf,  # noqa: E402
                                          write_model_gguf)
from lorakit.cli.main import main  # noqa: E402
from lorakit.core.inject import unload  # noqa: E402
from lorakit.models import load_base  # noqa: E402

IDS = torch.tensor([[5, 60, 70, 290, 33, 1, 2, 250]])
Q = gguf.GGMLQuantizationType
TEXT = ["Rewrite as ISO 8601: the 5th of March, 2021 -> 2021-03-05", "Friday, March 5, 2021", "05.03.2021",
        "Hello world, how are you today?", "  tabs\tand \u00fcn\u00efcode \u2713 ok"]


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """A tiny Llama with a small byte-level BPE tokenizer (320 tokens, trained here; chat tokens as specials), so
    reading a GGUF back parses a short vocabulary (the embedded one's 49k tokens are the slow test's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lorakit.models import tiny_llama

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXT * 20, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    model = tiny_llama(vocab_size=len(tok), init_std=0.2)
    path = tmp_path_factory.mktemp("small") / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def rounded(model, outtype: str):
    """A copy of `model` whose weights went through the export's type and back (2-D tensors; 1-D stay fp32)."""
    ref = copy.deepcopy(model)
    qtype = Q[{"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[outtype]]
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim < 2:
                continue
            t = qtype if not (qtype == Q.Q8_0 and p.shape[-1] % 32) else Q.F16
            data = gguf.quants.quantize(p.detach().numpy(), t)
            p.copy_(torch.from_numpy(gguf.quants.dequantize(data, t).reshape(p.shape).copy()))
    return ref


def gguf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


@pytest.fixture(scope="module")
def merged(small_dir):
    """The tiny Llama with a non-trivial adapter merged in, and its logits before merging."""
    model, tok = load_base(str(small_dir), device="cpu")
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(r=4, alpha=8, targets="all-linear", init_lora_weights=False))
    want = model(IDS).logits
    unload(model, merge_active=True)
    assert (model(IDS).logits - want).abs().max() < 1e-4
    return model, tok, want


@pytest.mark.parametrize("outtype,err", [("f32", 1e-4), ("f16", 0.05), ("bf16", 0.3), ("q8_0", 0.5)])
def test_merged_model_reads_back_with_its_logits(merged, tmp_path, outtype, err):
    model, tok, want = merged
    path = write_model_gguf(model, tok, tmp_path / f"m-{outtype}.gguf", outtype)
    got = gguf_model(path)(IDS).logits
    assert (got - rounded(model, outtype)(IDS).logits).abs().max() <= 1e-4  # equal up to the type's rounding
    assert (got - want).abs().max() <= err  # and what that rounding costs here
    r = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert f["general.architecture"] == "llama" and f["general.type"] == "model"
    assert f["llama.block_count"] == 2 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.rope.dimension_count"] == 16 and f["llama.embedding_length"] == 64
    kinds = {t.name: t.tensor_type for t in r.tensors}
    assert kinds["blk.0.attn_norm.weight"] == Q.F32 and kinds["output_norm.weight"] == Q.F32
    assert kinds["blk.1.ffn_down.weight"] == Q[outtype.upper()]
    assert sorted(n for n in kinds if n.startswith("blk.0.")) == sorted(
        f"blk.0.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                                      "ffn_gate", "ffn_up", "ffn_down"))
    assert {"token_embd.weight", "output.weight"} <= set(kinds)  # the tiny model's head is not tied


def test_tokenizer_reads_back(merged, tmp_path):
    from transformers import AutoTokenizer

    model, tok, _ = merged
    path = write_model_gguf(model, tok, tmp_path / "m.gguf", "f16")
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for s in TEXT + ["<|im_start|>user\nRewrite: the 5th of March<|im_end|>\n", "unseen words: zebra quartz"]:
        assert back(s)["input_ids"] == tok(s)["input_ids"]
    assert back.eos_token == tok.eos_token and back.chat_template == tok.chat_template
    r = gguf.GGUFReader(str(path))
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2" and r.fields["tokenizer.ggml.pre"].contents() == "gpt-2"


def _ggml_shape(t):
    return [int(x) for x in t.shape]  # GGUFReader's shape is ggml's ne: [in, out] for an (out, in) matrix


def test_lora_adapter_in_llama_cpp_layout(small_dir, tmp_path):
    """Every module llama.cpp can adapt, with per-module ranks, alphas and rsLoRA: names and shapes pass
    llama.cpp's checks, and alpha / r * lora_b @ lora_a is the weight change lorakit merges (permuted for q, k)."""
    model, tok = load_base(str(small_dir), device="cpu")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    cfg = LoraConfig(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"],
                     init_lora_weights=False, use_rslora=True, rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 3})
    add_adapter(model, cfg)
    save_adapter(model, tmp_path / "ad")
    write_lora_gguf(tmp_path / "ad", model.config, tmp_path / "ad.gguf")
    unload(model, merge_active=True)
    delta = {k: model.state_dict()[k] - base[k] for k in base}

    r = gguf.GGUFReader(str(tmp_path / "ad.gguf"))
    assert r.fields["general.type"].contents() == "adapter" and r.fields["adapter.type"].contents() == "lora"
    assert r.fields["general.architecture"].contents() == "llama"
    alpha = r.fields["adapter.lora.alpha"].contents()
    assert alpha == 8.0
    t = {x.name: x for x in r.tensors}
    names = {n.rsplit(".", 1)[0] for n in t}
    assert names == {f"blk.{i}.{m}.weight" for i in range(2) for m in ("attn_q", "attn_k", "attn_v", "ffn_down")} \
        | {"token_embd.weight", "output.weight"}
    base_ne = {"attn_q": [64, 64], "attn_k": [64, 32], "attn_v": [64, 32], "ffn_down": [128, 64],
               "token_embd": [64, len(tok)], "output": [64, len(tok)]}
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "ffn_down": "mlp.down_proj"}
    for name in names:
        a, b = t[name + ".lora_a"], t[name + ".lora_b"]
        kind = name.split(".")[-2]
        ne, na, nb = base_ne[kind], _ggml_shape(a), _ggml_shape(b)
        A, B = torch.from_numpy(a.data.copy()), torch.from_numpy(b.data.copy())
        if kind == "token_embd":  # llama.cpp: model ne[0] == b ne[1], model ne[1] == a ne[1]
            assert ne[0] == nb[1] and ne[1] == na[1]
            got = alpha / nb[0] * (A @ B.T)  # (vocab, dim): row t is b @ a[t]
            assert (got - delta["model.embed_tokens.weight"]).abs().max() < 1e-5
            continue
        assert ne[0] == na[0] and ne[1] == nb[1] and na[1] == nb[0]  # llama.cpp's shape checks
        got = alpha / nb[0] * (B @ A)  # what llama.cpp adds to its (permuted) weight
        key = "lm_head.weight" if kind == "output" else f"model.layers.{name.split('.')[1]}.{hf[kind]}.weight"
        want = delta[key]
        if kind in ("attn_q", "attn_k"):
            want = permute_rows(want, 4 if kind == "attn_q" else 2)
        assert (got - want).abs().max() < 1e-5, name
    assert _ggml_shape(t["blk.0.attn_k.weight.lora_a"])[1] == 2  # rank_pattern kept


def test_cli_export_and_refusals(small_dir, tmp_path, capsys):
    tiny_dir = small_dir
    model, _ = load_base(str(tiny_dir), device="cpu")
    torch.manual_seed(2)
    add_adapter(model, LoraConfig(r=2, targets=["q_proj"], init_lora_weights=False))
    save_adapter(model, tmp_path / "ad")
    assert main(["export", "--model", str(tiny_dir), "--adapter", str(tmp_path / "ad"), "--outtype", "q8_0",
                 "-o", str(tmp_path / "m.gguf")]) == 0
    assert main(["export", "--model", str(tiny_dir), "--adapter", str(tmp_path / "ad"), "--adapter-only",
                 "-o", str(tmp_path / "a.gguf")]) == 0
    assert "wrote" in capsys.readouterr().out
    unload(model, merge_active=True)
    got = gguf_model(tmp_path / "m.gguf")(IDS).logits
    assert (got - rounded(model, "q8_0")(IDS).logits).abs().max() <= 1e-4
    assert len(gguf.GGUFReader(str(tmp_path / "a.gguf")).tensors) == 4  # q_proj x 2 layers x (a, b)

    dora = load_base(str(tiny_dir), device="cpu")[0]
    add_adapter(dora, LoraConfig(r=2, targets=["q_proj"], use_dora=True))
    save_adapter(dora, tmp_path / "dora")
    assert main(["export", "--model", str(tiny_dir), "--adapter", str(tmp_path / "dora"), "--adapter-only",
                 "-o", str(tmp_path / "d.gguf")]) == 2
    assert "DoRA" in capsys.readouterr().err and not (tmp_path / "d.gguf").exists()
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="this model is 'gpt2'"):
        check_config(GPT2Config())


@pytest.mark.slow  # the embedded model: tied embeddings, 30 layers, 9 heads / 3 KV heads, Q8_0
def test_embedded_merged_q8_0(embedded, tmp_path):
    model, tok = embedded
    model = copy.deepcopy(model)
    torch.manual_seed(3)
    add_adapter(model, LoraConfig(r=8, alpha=16, targets="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(0.1)
    ids = tok("<|im_start|>user\nRewrite as ISO 8601: the 5th of March, 2021<|im_end|>\n",
              return_tensors="pt")["input_ids"]
    want = model(ids).logits
    unload(model, merge_active=True)
    path = write_model_gguf(model, tok, tmp_path / "e.gguf", "q8_0")
    got = gguf_model(path)(ids).logits
    assert (got - rounded(model, "q8_0")(ids).logits).abs().max() <= 1e-3
    # what Q8_0 costs: logits span ~30 here; the error stays a few percent of that and the next token is the same
    assert (got - want).abs().max() < 0.1 * want.abs().max() and got[0, -1].argmax() == want[0, -1].argmax()
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert "output.weight" not in names and "blk.29.attn_k.weight" in names  # tied head: llama.cpp reuses token_embd
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for s in TEXT + ["<|im_start|>user\nhi<|im_end|>\n"]:
        assert back(s)["input_ids"] == tok(s)["input_ids"]
    assert back.eos_token == tok.eos_token == "<|im_end|>" and back.chat_template == tok.chat_template

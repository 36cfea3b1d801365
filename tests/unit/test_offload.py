"""The 4-bit base's input embedding kept in host memory while training (train/offload.py): the same outputs and
gradients, the same parameter count, no parameter left off the model's device, and the table back on restore."""
import torch
import torch.nn as nn

from lorakit import LoraConfig, add_adapter
from lorakit.core.inject import count_params
from lorakit.core.nf4 import quantize_model
from lorakit.models import tiny_llama
from lorakit.train.offload import HostEmbedding, restore, why_not_offload


def test_host_embedding_same_outputs_and_gradients_then_restored(ids):
    m = tiny_llama()
    quantize_model(m)
    add_adapter(m, LoraConfig(r=4, alpha=8, targets="all-linear", init_lora_weights=False))
    before = count_params(m)
    ref = m(ids, labels=ids)
    ref.loss.backward()
    ref_grads = [p.grad.clone() for p in m.parameters() if p.requires_grad]
    m.zero_grad(set_to_none=True)
    emb = m.get_input_embeddings()
    table = emb.weight.detach().clone()
    m.set_input_embeddings(HostEmbedding(emb, torch.device("cpu")))
    assert count_params(m) == before  # the table counts as the parameters it stands for
    assert all(p is not emb.weight for p in m.parameters())  # not a parameter: devices of parameters unchanged
    out = m(ids, labels=ids)
    out.loss.backward()
    assert torch.equal(out.logits, ref.logits)
    for p, g in zip([p for p in m.parameters() if p.requires_grad], ref_grads):
        assert torch.equal(p.grad, g)
    restore(m, emb)
    assert m.get_input_embeddings() is emb and torch.equal(emb.weight, table)


def test_offload_only_where_it_is_plainly_right():
    m = tiny_llama()
    assert "device is cpu" in why_not_offload(m, torch.device("cpu"))
    assert "not 4-bit" in why_not_offload(m, torch.device("cuda"))
    quantize_model(m)
    assert why_not_offload(m, torch.device("cuda")) is None
    m.lm_head.weight = m.model.embed_tokens.weight  # tied
    assert "tied" in why_not_offload(m, torch.device("cuda"))
    m2 = tiny_llama()
    quantize_model(m2)
    m2.model.embed_tokens.weight.requires_grad_(True)
    assert "trains" in why_not_offload(m2, torch.device("cuda"))
    m2.model.embed_tokens = nn.Sequential()
    assert "not a plain nn.Embedding" in why_not_offload(m2, torch.device("cuda"))

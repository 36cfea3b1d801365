"""QLoRA on the embedded SmolLM2-135M: train on the 4-bit base, then the adapter works on the fp32 base."""
import copy

import torch

from lorakit import LoraConfig, add_adapter, delete_adapter, load_adapter, save_adapter
from lorakit.core.nf4 import LoraNF4Linear, quantize_model, weight_bytes

PAIRS = [("upper: cat dog sun\n=>", " CAT DOG SUN"), ("upper: tree fish bird\n=>", " TREE FISH BIRD"),
         ("upper: milk rain snow\n=>", " MILK RAIN SNOW"), ("upper: king queen horse\n=>", " KING QUEEN HORSE")]


def _batch(tok):
    rows = [tok(p, add_special_tokens=False).input_ids + tok(c, add_special_tokens=False).input_ids
            + [tok.eos_token_id] for p, c in PAIRS]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (r, (p, _)) in enumerate(zip(rows, PAIRS)):
        ids[i, :len(r)] = torch.tensor(r)
        n = len(tok(p, add_special_tokens=False).input_ids)
        labels[i, n:len(r)] = ids[i, n:len(r)]  # loss on the completion only
    mask = (labels != -100) | (torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None])
    return ids, mask.long(), labels


def test_qlora_on_embedded_model_transfers_to_fp32_base(embedded, tmp_path):
    model, tok = embedded
    q = copy.deepcopy(model)
    info = quantize_model(q)
    assert info["modules"] == 210 and info["dense_bytes"] > 7.7 * info["quant_bytes"]
    assert weight_bytes(q)["total_bytes"] < 0.32 * weight_bytes(model)["total_bytes"]  # 538 MB -> 168 MB
    targets = r"model\.layers\.(2[6-9])\.self_attn\.(q|v|o)_proj"  # the top 4 layers: a short backward
    add_adapter(q, LoraConfig(r=8, alpha=16, targets=targets))
    assert isinstance(q.model.layers[29].self_attn.q_proj, LoraNF4Linear)
    ids, mask, labels = _batch(tok)
    opt = torch.optim.AdamW([p for p in q.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = q(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    save_adapter(q, tmp_path / "qlora")
    with torch.no_grad():
        q_loss = q(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        base_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        load_adapter(model, tmp_path / "qlora", "qlora")
        try:
            fp_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        finally:
            delete_adapter(model, "qlora")  # the session fixture stays a bare base
    # the improvement learned on the 4-bit base holds on the fp32 base (within the quantization gap)
    assert fp_loss < 0.5 * base_loss and abs(fp_loss - q_loss) < 0.25 * base_loss, (base_loss, q_loss, fp_loss)
    print(f"losses {losses}, base {base_loss:.3f}, 4-bit+adapter {q_loss:.3f}, fp32+adapter {fp_loss:.3f}")

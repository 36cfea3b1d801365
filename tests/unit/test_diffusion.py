"""LoRA on a diffusers UNet2DModel: PEFT/diffusers load lorakit's files and lorakit loads theirs (outputs equal to
1e-5), merge/unmerge exact on the conv layers, a base fingerprint for a UNet (registry, shape checks), and the
DDPM loss through the one training loop (loss falls, accumulation = bigger batch, resume reproduces the run)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from lorakit import LoraConfig, TrainConfig, add_adapter, fingerprint, load_adapter, merge, save_adapter, unmerge
from lorakit.adapters.peft_files import PREFIX, read_adapter
from lorakit.adapters.registry import Registry
from lorakit.core.conv_embedding import LoraConv
from lorakit.core.inject import set_active
from lorakit.train.diffusion import DiffusionBackend, ImageBatches
from lorakit.train.loop import train

peft = pytest.importorskip("peft")
pytest.importorskip("diffusers")
from lorakit.lab.diffusion import UNET_TARGETS, scheduler, tiny_unet  # noqa: E402


def unet(seed=0, channels=(8, 16)):
    torch.manual_seed(seed)
    return tiny_unet(size=8, channels=channels).eval()


@pytest.fixture
def xt():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 1, 8, 8, generator=g), torch.tensor([5, 300, 900])


def out(model, xt):
    with torch.no_grad():
        return model(*xt).sample


def adapted(seed=0, r=4):
    m = unet(seed)
    torch.manual_seed(1)
    add_adapter(m, LoraConfig(r=r, alpha=2 * r, targets=UNET_TARGETS, init_lora_weights=False,
                              rank_pattern={"conv2": 2}))
    m.eval()
    return m


def test_unet_adapter_covers_conv_and_attention_in_peft_layout(tmp_path, xt):
    m = adapted()
    convs = [p for p, mod in m.named_modules() if isinstance(mod, LoraConv)]
    assert "down_blocks.0.resnets.0.conv1" in convs and "mid_block.resnets.0.conv2" in convs
    assert type(m.mid_block.attentions[0].to_q).__name__ == "LoraLinear"
    save_adapter(m, tmp_path / "ad")
    af = read_adapter(tmp_path / "ad")
    assert af.peft_config["task_type"] is None  # not a causal LM: PEFT wraps it in a plain PeftModel
    a = af.tensors[PREFIX + "down_blocks.0.resnets.0.conv1.lora_A.weight"]
    b = af.tensors[PREFIX + "down_blocks.0.resnets.0.conv1.lora_B.weight"]
    assert tuple(a.shape) == (4, 8, 3, 3) and tuple(b.shape) == (8, 4, 1, 1)
    assert tuple(af.tensors[PREFIX + "down_blocks.0.resnets.0.conv2.lora_A.weight"].shape) == (2, 8, 3, 3)


def test_lorakit_unet_adapter_loads_in_peft_both_ways(tmp_path, xt):
    m = adapted()
    want = out(m, xt)
    assert (want - out(unet(), xt)).abs().max() > 1e-3  # the adapter changes the output
    save_adapter(m, tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(unet(), tmp_path / "ad").eval()  # PEFT's own loader
    assert isinstance(pm.base_model.model.down_blocks[0].resnets[0].conv1, peft.tuners.lora.Conv2d)
    assert (out(pm, xt) - want).abs().max() <= 1e-5
    # diffusers' way (load_lora_adapter): inject into the bare model, then set the state dict without prefix
    cfg = peft.LoraConfig.from_pretrained(str(tmp_path / "ad"))
    bare = peft.inject_adapter_in_model(cfg, unet())
    sd = {k.removeprefix(PREFIX): v for k, v in read_adapter(tmp_path / "ad").tensors.items()}
    res = peft.set_peft_model_state_dict(bare, sd)
    assert not res.unexpected_keys
    assert (out(bare.eval(), xt) - want).abs().max() <= 1e-5


def test_peft_unet_adapters_load_in_lorakit(tmp_path, xt):
    cfg = dict(r=6, lora_alpha=12, target_modules=UNET_TARGETS, init_lora_weights=False,
               rank_pattern={"to_q": 3}, alpha_pattern={"conv1": 3})
    torch.manual_seed(7)
    pm = peft.get_peft_model(unet(), peft.LoraConfig(**cfg)).eval()
    want = out(pm, xt)
    pm.save_pretrained(tmp_path / "peft")
    m = unet()
    load_adapter(m, tmp_path / "peft")
    assert m.mid_block.attentions[0].to_q.adapters["default"].r == 3
    assert m.down_blocks[0].resnets[0].conv1.adapters["default"].scale == pytest.approx(3 / 6)
    assert (out(m, xt) - want).abs().max() <= 1e-5
    # a state dict as diffusers gets it (get_peft_model_state_dict of an injected model: no base_model prefix)
    torch.manual_seed(8)
    bare = peft.inject_adapter_in_model(peft.LoraConfig(**cfg), unet()).eval()
    want = out(bare, xt)
    (tmp_path / "bare").mkdir()
    save_file(peft.get_peft_model_state_dict(bare), str(tmp_path / "bare" / "adapter_model.safetensors"))
    (tmp_path / "bare" / "adapter_config.json").write_text(json.dumps(peft.LoraConfig(**cfg).to_dict(), default=list))
    m = unet()
    load_adapter(m, tmp_path / "bare")
    assert (out(m, xt) - want).abs().max() <= 1e-5


def test_merge_unmerge_exact_on_unet_convs(xt):
    m = adapted()
    base = {k: v.clone() for k, v in m.state_dict().items() if "adapters" not in k}
    set_active(m, {"default": 0.5})
    want = out(m, xt)
    merge(m)
    conv = m.down_blocks[0].resnets[0].conv1
    assert (conv.weight - base["down_blocks.0.resnets.0.conv1.weight"]).abs().max() > 1e-3  # really merged
    assert (out(m, xt) - want).abs().max() <= 1e-5
    unmerge(m)
    for k, v in base.items():
        assert (m.state_dict()[k] - v).abs().max() <= 1e-6, k
    assert (out(m, xt) - want).abs().max() <= 1e-5


def test_fingerprint_of_a_unet_and_registry(tmp_path):
    a, b = unet(0), unet(1)
    fa = fingerprint(a)
    assert fa["architecture"] == "UNet2DModel"
    assert fa["shapes"]["down_blocks.0.resnets.0.conv1"] == [8, 8] and fa["shapes"]["mid_block.attentions.0.to_q"]
    assert fingerprint(b)["shape_hash"] == fa["shape_hash"] and fingerprint(b)["weight_hash"] != fa["weight_hash"]
    m = adapted()
    assert {k: fingerprint(m)[k] for k in ("shape_hash", "weight_hash")} == \
        {k: fa[k] for k in ("shape_hash", "weight_hash")}  # an attached adapter does not change the base's print
    save_adapter(m, tmp_path / "ad")
    reg = Registry(tmp_path / "reg.sqlite", base_fp=fa, base_name="tiny-unet")
    assert reg.add("digits", tmp_path / "ad").version == 1
    with pytest.raises(ValueError, match="another base"):
        Registry(tmp_path / "reg2.sqlite", base_fp=fingerprint(b)).add("digits", tmp_path / "ad")
    with pytest.raises(ValueError, match="down_blocks.0.resnets.0.conv1"):
        load_adapter(unet(channels=(16, 32)), tmp_path / "ad")


def _images(n=48, seed=0):
    """Blobs: a bright square at a random place (a learnable distribution)."""
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, 1, 8, 8)
    for i in range(n):
        r, c = torch.randint(0, 5, (2,), generator=g).tolist()
        x[i, 0, r:r + 3, c:c + 3] = 1.0
    return x


def _train(tmp_path, name, steps=30, **kw):
    m = unet()
    cfg = TrainConfig(**{"lr": 1e-2, "max_steps": steps, "batch_size": 16, "warmup_ratio": 0.0, "threads": 1, **kw})
    res = train(m, None, _images(), tmp_path / name, LoraConfig(r=4, alpha=8, targets=UNET_TARGETS), cfg,
                backend=DiffusionBackend(m, scheduler()), progress=False)
    return res, m


def test_ddpm_loss_falls_through_the_loop(tmp_path, xt):
    res, m = _train(tmp_path, "run", steps=40)
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert last < 0.6 * first, res.losses
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41)) and rows[-1]["tokens"] == 40 * 16  # images
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["backend"] == "ddpm"
    m2 = unet()
    load_adapter(m2, tmp_path / "run")
    torch.testing.assert_close(out(m2, xt), out(m, xt), rtol=0, atol=1e-6)


def test_ddpm_accumulation_equals_bigger_batch_and_resume_reproduces(tmp_path):
    a, _ = _train(tmp_path, "a", steps=4, batch_size=16)
    b, _ = _train(tmp_path, "b", steps=4, batch_size=8, grad_accum=2)
    assert a.tokens == b.tokens == 64 and a.losses == pytest.approx(b.losses, rel=1e-5)
    full, _ = _train(tmp_path, "full", steps=6, save_every=3)

    def stop(step, _loss):
        if step == 4:
            raise KeyboardInterrupt

    m = unet()
    cfg = TrainConfig(lr=1e-2, max_steps=6, batch_size=16, warmup_ratio=0.0, threads=1, save_every=3)
    with pytest.raises(KeyboardInterrupt):
        train(m, None, _images(), tmp_path / "cut", LoraConfig(r=4, alpha=8, targets=UNET_TARGETS), cfg,
              backend=DiffusionBackend(m, scheduler()), progress=False, on_step=stop)
    m = unet()
    res = train(m, None, _images(), tmp_path / "cut", LoraConfig(r=4, alpha=8, targets=UNET_TARGETS), cfg,
                backend=DiffusionBackend(m, scheduler()), progress=False, resume=True)
    assert res.losses == pytest.approx(full.losses, rel=1e-5)


def test_image_batches_are_the_same_every_time():
    x = _images(20)
    a, b = ImageBatches(x, 8, 3, 1000), ImageBatches(x, 8, 3, 1000)
    for m in (0, 2, 5):
        ba, bb = a.get(m), b.get(m)
        assert all(torch.equal(ba[k], bb[k]) for k in ba)
    assert len(a.get(2)["images"]) == 4 and a.per_epoch == 3  # the epoch's last, short batch
    assert not torch.equal(a.get(0)["noise"], a.get(3)["noise"])
    with pytest.raises(ValueError, match="float tensor"):
        ImageBatches(x[:, 0], 8, 0, 1000)
    assert a.indices(2) == a.order(0)[16:].tolist() and a.targets == a.lengths == [1] * 20
    with pytest.raises(ValueError, match="one process"):
        DiffusionBackend(unet(), scheduler()).micro_batches(x, TrainConfig(), rank=0, world=2)


def test_digits_and_the_classifier_that_judges_samples():
    pytest.importorskip("sklearn")
    from lorakit.lab.diffusion import NEW_DIGITS, DigitClassifier, digits

    x, y = digits(NEW_DIGITS)
    assert x.shape[1:] == (1, 16, 16) and len(x) == len(y) > 800 and digits(NEW_DIGITS, 8)[0].shape[1:] == (1, 8, 8)
    assert x.min() >= -1 and x.max() <= 1 and set(y.tolist()) == set(NEW_DIGITS)
    clf = DigitClassifier()
    assert clf.accuracy > 0.95
    shares = clf.shares(x)
    assert shares["new_share"] > 0.95 and sum(shares["counts"]) == len(x)



def test_a_given_backend_refuses_text_eval_examples(tmp_path):
    m = unet()
    with pytest.raises(ValueError, match="'ddpm' backend"):
        train(m, None, _images(8), tmp_path / "x", LoraConfig(r=2, targets=UNET_TARGETS), TrainConfig(max_steps=1),
              eval_examples=[object()], backend=DiffusionBackend(m, scheduler()), progress=False)
    assert not (tmp_path / "x").exists()  # refused before anything was written

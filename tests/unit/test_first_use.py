"""What a new user meets first: prompts rendered as the adapter was trained (recorded in its metadata),
a hub id that is not local fails at once naming the cache, and --help shows every default."""
import argparse
import json
import shutil

import pytest
import torch

from lorakit import LoraConfig, add_adapter, save_adapter
from lorakit.adapters.peft_files import read_metadata
from lorakit.cli.main import build_parser, main
from lorakit.generate import generate
from lorakit.models import load_base, resolve_model_path
from lorakit.templates import chat_template_sha256, pick_template, template_info

PROMPT = "Rewrite as ISO 8601: the 5th of March, 2021"


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    """One random adapter saved three ways: recorded chat, recorded plain, and with no record (as PEFT)."""
    root = tmp_path_factory.mktemp("ads")
    model, tok = load_base(str(tiny_dir), device="cpu")
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(r=4, alpha=8, targets="all-linear", init_lora_weights=False))
    save_adapter(model, root / "chat", metadata=template_info(tok, "auto"))
    save_adapter(model, root / "plain", metadata=template_info(tok, "plain"))
    save_adapter(model, root / "none")
    want = {"chat": generate(model, tok, [[{"role": "user", "content": PROMPT}]], 6)[0],
            "plain": generate(model, tok, [PROMPT], 6)[0]}
    assert want["chat"] != want["plain"]  # the rendering matters for this model
    return root, tok, want


def test_template_info_recorded_in_adapter(adapters):
    root, tok, _ = adapters
    meta = read_metadata(root / "chat")
    assert meta == {"template": "chat", "chat_template_sha256": chat_template_sha256(tok)}
    assert len(meta["chat_template_sha256"]) == 64
    assert read_metadata(root / "plain")["template"] == "plain" and read_metadata(root / "none") == {}


def test_pick_template(adapters):
    _, tok, _ = adapters
    chat = template_info(tok, "chat")
    assert pick_template(tok, None, {"a": chat}) == ("chat", [])
    assert pick_template(tok, None, {"a": {"template": "plain"}}) == ("plain", [])
    assert pick_template(tok, None, {"a": {}}) == ("chat", [])  # nothing recorded: auto, as train's default
    t, w = pick_template(tok, "plain", {"a": chat})
    assert t == "plain" and len(w) == 1 and "'chat'" in w[0] and "'plain'" in w[0] and "--template plain" in w[0]
    t, w = pick_template(tok, None, {"a": {**chat, "chat_template_sha256": "0" * 64}})
    assert t == "chat" and "000000000000" in w[0] and chat["chat_template_sha256"][:12] in w[0]
    t, w = pick_template(tok, None, {"a": chat, "b": {"template": "plain"}})  # a stack that disagrees
    assert t == "chat" and len(w) == 1 and "'b'" in w[0]


@pytest.mark.parametrize("which,extra,want_key,warns", [
    ("chat", [], "chat", False),                        # the issue: no --chat on a chat-trained adapter
    ("plain", [], "plain", False),
    ("none", [], "chat", False),                        # PEFT adapter: auto
    ("chat", ["--template", "plain"], "plain", True),   # asked for a mismatch: do it, but warn
    ("plain", ["--chat"], "chat", True),
])
def test_generate_renders_as_trained(adapters, tiny_dir, capsys, which, extra, want_key, warns):
    root, _, want = adapters
    assert main(["generate", "--model", str(tiny_dir), "--adapter", str(root / which), "--prompt", PROMPT,
                 "--max-new-tokens", "6", *extra]) == 0
    out = capsys.readouterr()
    assert out.out.rstrip("\n") == want[want_key]
    assert ("warning" in out.err) == warns
    if warns:
        assert f"'{which}'" in out.err and f"'{want_key}'" in out.err


def test_eval_renders_as_trained(adapters, tiny_dir, tmp_path, capsys):
    root, _, want = adapters
    (tmp_path / "t.jsonl").write_text(json.dumps({"prompt": PROMPT, "completion": want["chat"]}) + "\n")
    assert main(["eval", "--model", str(tiny_dir), "--adapter", str(root / "chat"), "--data",
                 str(tmp_path / "t.jsonl"), "--max-new-tokens", "6", "--json", str(tmp_path / "r.json")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["examples"][0]["after"] == want["chat"] and rep["after"]["accuracy"] == 1.0
    err = capsys.readouterr().err
    assert "answers (adapter)" in err and "answers (base)" in err and "eval loss" in err  # progress bars


def test_hub_id_not_local_fails_at_once_naming_the_cache(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as e:
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    msg = str(e.value)
    assert str(tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct") in msg
    for word in ("local model directories", "local Hugging Face cache", ".gguf", "'embedded'", "never downloads"):
        assert word in msg
    with pytest.raises(FileNotFoundError, match="not a hub id"):
        resolve_model_path("no/such/dir")
    # the same id, once in the cache, loads from there (refs/main names the snapshot)
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(tiny_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert resolve_model_path("org/tiny") == (repo / "snapshots" / "abc123", None)
    model, _ = load_base("org/tiny", device="cpu")
    assert model.config.hidden_size == 64


def _options(parser: argparse.ArgumentParser):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        help_text = p.format_help()
        for a in p._actions:
            # by identity: a default of 0 or 0.0 equals False but is a default to show (generate --seed, --temperature)
            if (a.option_strings and a.dest != "help"
                    and not (a.default is None or a.default is False or a.default is argparse.SUPPRESS)):
                yield name, a, help_text


def test_help_shows_every_default():
    parser = build_parser()
    seen = 0
    subs = parser._subparsers._group_actions[0].choices
    for name, a, _ in _options(parser):
        text = subs[name]._get_formatter()._format_action(a)
        assert "default" in text, f"lorakit {name} {a.option_strings[0]}: no default in --help"
        seen += 1
    assert seen > 40
    gen = " ".join(subs["generate"].format_help().split())
    assert "0 = greedy (default: 0.0)" in gen and "--seed SEED (default: 0)" in gen
    # train's flags default to None and take the config dataclasses' values: --help states those
    from lorakit.config import LoraConfig, TrainConfig

    lora, tr = LoraConfig(), TrainConfig()
    targets = ",".join(lora.targets) if isinstance(lora.targets, list) else lora.targets
    assert f"(default: {targets})" in " ".join(subs["train"].format_help().split())
    options = " ".join(subs["train"].format_help().split("options:", 1)[1].split())
    for flag, default in (("--r R", lora.r), ("--alpha ALPHA", lora.alpha), ("--lr LR", tr.lr),
                          ("--epochs EPOCHS", tr.epochs), ("--batch-size BATCH_SIZE", tr.batch_size)):
        text = options.split(flag, 1)[1].split(" --", 1)[0]
        assert f"(default: {default})" in text or f"(default: {default:g})" in text, flag


def test_saved_adapter_records_where_the_base_was_found(tmp_path, monkeypatch, tiny_dir):
    """base_model_name_or_path through the Python API (load_base, save_adapter): a local dir's absolute path, a hub
    id (from the local cache) as the id, the embedded model's cached HF directory; PEFT loads it with the hub off."""
    from peft import AutoPeftModelForCausalLM

    from lorakit.models import EMBEDDED_NAME, base_reference, cache_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(tiny_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.chdir(tiny_dir.parent)
    for given, recorded in ((tiny_dir.name, str(tiny_dir.resolve())), ("org/tiny", "org/tiny")):
        model, _ = load_base(given, device="cpu")
        torch.manual_seed(0)
        add_adapter(model, LoraConfig(r=2, alpha=4, targets=["q_proj", "v_proj"], init_lora_weights=False))
        out = tmp_path / given.replace("/", "_")
        save_adapter(model, out)
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == recorded
        if given == tiny_dir.name:  # a relative dir is recorded absolute: PEFT finds it from any working directory
            monkeypatch.chdir(tmp_path)
            peft_model = AutoPeftModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
            ids = torch.arange(3, 19)[None]
            with torch.no_grad():
                assert torch.allclose(peft_model(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    assert base_reference("embedded") == str(cache_dir() / EMBEDDED_NAME)
    assert base_reference("embedded").endswith("/lorakit/SmolLM2-135M-Instruct")

"""What the CLI says matches what it did: options that do not apply are refused, not ignored; --no-save does not
claim to have written an adapter."""
import json

import pytest

from lorakit.cli.main import main


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    d = tmp_path_factory.mktemp("rows")
    (d / "train.jsonl").write_text("".join(json.dumps({"prompt": f"Say {w}.", "completion": w}) + "\n"
                                           for w in ["apple", "river", "stone", "cloud"] * 2))
    return d / "train.jsonl"


@pytest.mark.parametrize("extra,named", [(["--dora"], "--dora does not apply"),
                                         (["--rslora", "--dora"], "--dora, --rslora do not apply"),
                                         (["--quantize", "nf4"], "--quantize nf4 does not apply")])
def test_full_refuses_adapter_variants_before_loading(tiny_dir, rows, tmp_path, capsys, extra, named):
    rc = main(["train", "--model", str(tiny_dir), "--data", str(rows), "--full", *extra, "--max-steps", "1",
               "--quiet", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and named in err and "--full trains every weight" in err, err
    assert not (tmp_path / "out").exists()


def test_full_says_that_adapter_shape_flags_are_not_used(tiny_dir, rows, tmp_path, capsys):
    assert main(["train", "--model", str(tiny_dir), "--data", str(rows), "--full", "--r", "4", "--targets", "q_proj",
                 "--max-steps", "1", "--batch-size", "2", "--no-save", "-o", str(tmp_path / "out")]) == 0
    assert "--full: --r, --targets shape(s) an adapter and are not used" in capsys.readouterr().err


def test_full_with_a_shared_config_file_says_its_lora_section_is_ignored(tiny_dir, rows, tmp_path, capsys):
    """A settings file with 'lora' and 'train' sections (data/demo/lora.yaml) is a fair way to run the full
    fine-tune for comparison: its train section applies, and the run says the lora section does not."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"lora": {"r": 8, "use_dora": True}, "train": {"max_steps": 2, "batch_size": 2}}))
    out = tmp_path / "full"
    assert main(["train", "--model", str(tiny_dir), "--data", str(rows), "--full", "--config", str(cfg), "--no-save",
                 "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"--full: the 'lora' section of {cfg} (r, use_dora) does not apply to full fine-tuning" in err, err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # the train section's max_steps applied


def test_no_save_reports_metrics_not_a_written_adapter(tiny_dir, rows, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_dir), "--data", str(rows), "--max-steps", "2", "--batch-size", "2",
                 "--no-save", "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"metrics in {out}" in said and "wrote" not in said
    assert not (out / "adapter_model.safetensors").exists() and len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_saved_adapter_names_a_base_peft_loads_offline(tiny_dir, rows, tmp_path):
    """base_model_name_or_path is the base's real path, so AutoPeftModelForCausalLM finds it without a hub; its
    logits are lorakit's with the same adapter."""
    import torch
    from peft import AutoPeftModelForCausalLM

    from lorakit import load_adapter, load_base

    out = tmp_path / "ad"
    assert main(["train", "--model", str(tiny_dir), "--data", str(rows), "--max-steps", "2", "--batch-size", "2",
                 "--lr", "1e-2", "--quiet", "-o", str(out)]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_dir.resolve())
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    model, _ = load_base(str(tiny_dir), dtype="float32", device="cpu")
    load_adapter(model, out, "ad")
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_eval_table_shows_whole_references_and_marks_cuts():
    from lorakit.train.evaluate import Report, format_report

    ref = "2077-03-24T10:15:00+02:00 (local)"  # 33 characters: shown whole
    long = "x" * 60  # over the 38-character column: cut, and the cut is marked
    rep = Report(n=1, before={"accuracy": 0.0}, after={"accuracy": 1.0},
                 examples=[{"prompt": "Rewrite this.\nMar 24, 2077", "reference": ref, "before": long, "after": ref}])
    table = format_report(rep).split("\n\n")[-1].splitlines()
    head, row = table[0].split(" | "), table[1].split(" | ")
    assert head[0].startswith("prompt") and row[0].strip() == "Mar 24, 2077"
    assert row[1].strip() == ref and row[3] == ref and row[2] == "x" * 37 + "…"
    assert [len(c) for c in head[:3]] == [len(c) for c in row[:3]]  # the columns line up


def test_eval_table_wraps_a_long_reference_instead_of_cutting_it():
    from lorakit.train.evaluate import Report, format_report

    ref = "The meeting moved to Thursday the 24th of March, 2077, at 10:15 in room B"  # 74 characters
    rep = Report(n=2, before={"accuracy": 0.0}, after={"accuracy": 0.5},
                 examples=[{"prompt": "When is it?", "reference": ref, "before": "no idea", "after": "Thursday"},
                           {"prompt": "Short one", "reference": "yes", "before": "no", "after": "yes"}])
    table = format_report(rep).split("\n\n")[-1].splitlines()
    assert len(table) == 1 + 2 + 1  # header, the long row on 2 lines (38 columns at most), the short row
    cells = [line.split(" | ") for line in table]
    assert [c[0].strip() for c in cells] == ["prompt", "When is it?", "", "Short one"]
    assert [c[1].strip() for c in cells[1:3]] == ["The meeting moved to Thursday the 24th",
                                                   "of March, 2077, at 10:15 in room B"]
    assert " ".join(c[1].strip() for c in cells[1:3]) == ref and "…" not in "\n".join(table)
    assert max(len(c[1]) for c in cells) == 38 and cells[1][3] == "Thursday" and cells[3][1].strip() == "yes"
    assert len(cells[2]) == 2  # the continuation line has the reference only
    assert len({len(c[0]) for c in cells}) == 1 and len({len(c[1]) for c in cells if len(c) == 4}) == 1  # aligned

"""`lorakit diffusion-demo` end to end on a tiny set-up (in process; tens of seconds: slow)."""
import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")
pytest.importorskip("peft")


@pytest.mark.slow
def test_diffusion_demo_cli_end_to_end(tmp_path):
    """The CLI on a tiny set-up (a few steps): every figure present, PEFT round trip exact, grids written."""
    from lorakit.cli.main import main

    rc = main(["diffusion-demo", "-o", str(tmp_path / "demo"), "--cache", str(tmp_path / "cache"),
               "--base-channels", "8,16", "--base-steps", "30", "--steps", "10", "--samples", "8",
               "--sample-steps", "4", "--sweep-ranks", "1", "--threads", "1", "--quiet"])
    assert rc == 0
    res = json.loads((tmp_path / "demo" / "result.json").read_text())
    assert {"base", "lora_w0.5", "lora_w1"} <= set(res["samples"])
    assert all(0 <= s["new_share"] <= 1 and sum(s["counts"]) == 8 for s in res["samples"].values())
    assert res["interop"]["peft_max_abs_diff"] <= 1e-5 and res["interop"]["unmerged_max_abs_diff"] <= 1e-5
    assert [r["name"] for r in res["sweep"]] == ["lora-r1", "lora-r8", "full"]  # the main run (r=8) is a row
    # the whole UNet vs a rank-1 adapter's weights (its header, ~8 KB of names and the base's fingerprint, is the
    # same at any rank)
    r1 = tmp_path / "demo" / "sweep" / "lora-r1" / "adapter_model.safetensors"
    header = 8 + int.from_bytes(r1.read_bytes()[:8], "little")
    assert res["sweep"][0]["bytes"] == r1.stat().st_size
    assert res["sweep"][2]["bytes"] > 10 * (r1.stat().st_size - header)
    assert res["registry"]["version"] == 1 and res["inspect"]["base_architecture"] == "UNet2DModel"
    assert (tmp_path / "demo" / "grid.png").stat().st_size > 1000
    assert (tmp_path / "demo" / "sweep_grid.png").stat().st_size > 1000
    assert not res["base"]["cached"]
    rc = main(["diffusion-demo", "-o", str(tmp_path / "demo2"), "--cache", str(tmp_path / "cache"),
               "--base-channels", "8,16", "--base-steps", "30", "--steps", "2", "--samples", "4",
               "--sample-steps", "2", "--sweep-ranks", "", "--no-full", "--threads", "1", "--quiet"])
    assert rc == 0 and json.loads((tmp_path / "demo2" / "result.json").read_text())["base"]["cached"]

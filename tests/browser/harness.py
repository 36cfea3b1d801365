"""A real `lorakit serve` on the embedded model for the dashboard's browser tests and screenshots.

build(root) trains a small real run (a few LoRA steps on the demo date task: metrics.jsonl, train_config.json,
eval.json, the adapter) and registers two adapters in a registry for the embedded base:
  iso-dates  v1 = random A and B, v2 = random too (tests) or the trained adapter (screenshots); v2 is current
  noisy      v1 = random A and small random B on every linear layer (answers drift from the base's)
and a runs dir holding the trained run, a run named with HTML in it, and a "live" run a test appends to.
start(root, port) starts `python -m lorakit serve` on it and waits for /health.

    python tests/browser/harness.py --screenshots docs/ui    # writes the dashboard screenshots
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
KEY, ADMIN = "sk-ui-test", "sk-ui-admin"
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
XSS_RUN = "<img src=x onerror=window.__xss=3>"
DATE_PROMPT = "Rewrite this date in ISO 8601 format (YYYY-MM-DD). Reply with the date only.\n2031/04/17"


def chromium_path() -> str | None:
    for p in (os.environ.get("LORAKIT_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
              shutil.which("google-chrome")):
        if p and Path(p).exists():
            return p
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _random_adapter(model, path: Path, cfg, seed: int, b_scale: float) -> None:
    import torch

    from lorakit import add_adapter, delete_adapter, save_adapter

    torch.manual_seed(seed)
    add_adapter(model, cfg, "rand")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0.0, b_scale)
    save_adapter(model, path, "rand", base_name="embedded")
    delete_adapter(model, "rand")


def build(root: Path, real_run: bool = False, steps: int = 10, xss: bool = True) -> dict:
    """Make the run, the adapters and the registry under `root`; returns the paths. The run trains the
    embedded model with `real_run` (minutes on a small CPU; its adapter becomes iso-dates v2), else a tiny
    random Llama with the embedded tokenizer (seconds; iso-dates v2 is then a random adapter too)."""
    import torch

    from lorakit import LoraConfig, TrainConfig, delete_adapter, fingerprint, load_base, set_active
    from lorakit.adapters.registry import Registry
    from lorakit.files import atomic_write_json
    from lorakit.models import tiny_llama
    from lorakit.train.data import build_examples, load_rows
    from lorakit.train.evaluate import evaluate
    from lorakit.train.loop import train

    torch.manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    model, tok = load_base("embedded", dtype="float32", device="cpu")
    rows = load_rows(REPO / "data/demo/train.jsonl")[0][:4 * steps]
    test = load_rows(REPO / "data/demo/test.jsonl")[0][:6]
    runs = root / "runs"
    run = runs / "iso-dates-r8"
    learner = model if real_run else tiny_llama(vocab_size=len(tok), hidden=64, layers=2)
    train(learner, tok, build_examples(tok, rows, "auto", 96), run, LoraConfig(r=8, alpha=16, targets="attn"),
          TrainConfig(lr=2e-3, max_steps=steps, batch_size=4, eval_every=2, warmup_ratio=0.0),
          eval_examples=build_examples(tok, test[:4], "auto", 96), progress=False, base_name="embedded",
          metadata={"data": "data/demo/train.jsonl", "rows": len(rows)})
    set_active(learner, "default")
    rep = evaluate(learner, tok, test, "auto", max_new_tokens=12, batch_size=8)
    atomic_write_json(run / "eval.json", rep.to_dict())
    delete_adapter(learner, "default")
    attn = LoraConfig(r=8, alpha=16, targets="attn", init_lora_weights=False)
    _random_adapter(model, root / "iso-dates-v1", attn, 1, 0.06)
    _random_adapter(model, root / "iso-dates-v2", attn, 2, 0.06)
    _random_adapter(model, root / "noisy", LoraConfig(r=4, alpha=8, targets="all-linear", init_lora_weights=False),
                    3, 0.06)
    reg = Registry(root / "registry.sqlite", base_fp=fingerprint(model), base_name="SmolLM2-135M-Instruct")
    # tests: v1 and v2 random (v2 current); screenshots: an untrained draft v1, the trained run v2 (current)
    reg.add("iso-dates", root / "iso-dates-v1", description="ISO dates: LoRA r=8 on the demo task" + (" " + XSS if xss else ""))
    reg.add("iso-dates", run if real_run else root / "iso-dates-v2")
    reg.add("noisy", root / "noisy", description="random A and B on every linear layer: a stand-in for a second task")
    reg.add_eval("iso-dates@2" if real_run else "iso-dates@1", {"accuracy": rep.after.get("accuracy"),
                                                                  "loss": rep.after["loss"]})
    reg.close()
    if xss:
        (runs / XSS_RUN).mkdir()
        shutil.copy(run / "metrics.jsonl", runs / XSS_RUN / "metrics.jsonl")
    live = runs / "live"
    live.mkdir()
    (live / "train_config.json").write_text(json.dumps({"lora": None, "train": {}, "total_steps": 40}))
    (live / "metrics.jsonl").write_text("".join(json.dumps(live_record(s)) + "\n" for s in range(1, 6)))
    return {"root": root, "registry": root / "registry.sqlite", "runs": runs, "run": run, "live": live,
            "sweeps": REPO / "docs" / "sweep", "test_rows": test}


def live_record(step: int) -> dict:
    """A made-up training record for the 'live' run (a curve that keeps falling)."""
    return {"step": step, "loss": 2.0 / (1 + 0.3 * step), "lr": 1e-3, "grad_norm": 1.0, "tokens": 100 * step,
            "tokens_per_s": 50.0, "seconds": 2.0 * step}


def start(env: dict, port: int | None = None, timeout_s: float = 240) -> tuple[subprocess.Popen, str]:
    port = port or free_port()
    cmd = [sys.executable, "-m", "lorakit", "serve", "--model", "embedded", "--registry", str(env["registry"]),
           "--api-key", KEY, "--admin-key", ADMIN, "--port", str(port), "--runs-dir", str(env["runs"]),
           "--sweeps-dir", str(env["sweeps"]), "--max-new-tokens", "64", "--threads", "2"]
    environ = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    log = open(env["root"] / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=environ, cwd=env["root"])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lorakit serve exited with {proc.returncode}:\n{(env['root'] / 'serve.log').read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"lorakit serve did not answer within {timeout_s} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def login(page, url: str, key: str) -> None:
    page.goto(url + "/ui/login")
    page.fill("#key", key)
    page.click("form.stack button[type=submit]")
    page.wait_for_load_state()


def launch(playwright):
    return playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                      args=["--no-sandbox", "--disable-dev-shm-usage"])


def screenshots(out: Path, env_dir: Path | None = None, only: set[str] | None = None) -> None:
    """Every page at a laptop width and at a phone width (the same page, resized), logged in as admin.
    With `env_dir` the trained run and registry are kept there and reused by the next call; `only` names the
    shots to take (login, adapters, adapter, runs, run, sweep, compare, compare-pair, compare-kl)."""
    import tempfile

    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lorakit-demo-") as tmp:
        root = env_dir or Path(tmp)
        if (root / "registry.sqlite").exists():
            env = {"root": root, "registry": root / "registry.sqlite", "runs": root / "runs",
                   "sweeps": REPO / "docs" / "sweep"}
        else:
            env = build(root, real_run=True, steps=12, xss=False)
        proc, url = start(env)
        desktop, phone = {"width": 1280, "height": 860}, {"width": 390, "height": 844}
        try:
            with sync_playwright() as p:
                browser = launch(p)
                page = browser.new_page(viewport=desktop, device_scale_factor=1)

                def want(name: str) -> bool:
                    return only is None or name in only

                def shoot(name: str, full_desktop: bool = True) -> None:
                    page.set_viewport_size(desktop)
                    page.screenshot(path=str(out / f"{name}-desktop.png"), full_page=full_desktop)
                    page.set_viewport_size(phone)
                    page.screenshot(path=str(out / f"{name}-phone.png"), full_page=True)
                    page.set_viewport_size(desktop)

                page.goto(url + "/ui/login")
                if want("login"):
                    shoot("login", False)
                login(page, url, ADMIN)
                for name, path in (("adapters", "/ui/adapters"), ("adapter", "/ui/adapters/iso-dates"),
                                   ("runs", "/ui/runs"), ("run", "/ui/runs/iso-dates-r8"),
                                   ("sweep", "/ui/sweeps/sweep")):
                    if want(name):
                        page.goto(url + path)
                        shoot(name, name != "sweep")
                if want("compare-kl"):
                    compare_kl(page, url, out)
                if not (want("compare") or want("compare-pair")):
                    browser.close()
                    return
                compare_all(page, url)
                if want("compare"):
                    shoot("compare")
                page.goto(url + "/ui/compare?models=iso-dates")  # one answer beside the base: strikes too
                page.fill("#prompt", DATE_PROMPT)
                page.click("#compare-go")
                page.wait_for_selector("#results[data-done]", timeout=1_200_000)
                page.locator("#results").screenshot(path=str(out / "compare-pair-desktop.png"))
                browser.close()
        finally:
            stop(proc)


def compare_all(page, url: str, kl: bool = False) -> None:
    """Two prompts to the base, both adapters and their weighted stack; returns once every answer is in."""
    page.goto(url + "/ui/compare")
    page.fill("#prompt", DATE_PROMPT + "\n---\nName three colours of the rainbow.")
    page.check("input[value='iso-dates']")
    page.check("input[value='noisy']")
    page.fill("#stack", "iso-dates:0.7+noisy:0.3")
    page.fill("#max_tokens", "24")
    if kl:
        page.check("#kl")
    page.click("#compare-go")
    page.wait_for_selector("#results[data-done]", timeout=1_200_000)


def compare_kl(page, url: str, out: Path) -> None:
    """Compare with the per-token KL to base: the base, the trained adapter, the random one and a stack."""
    page.set_viewport_size({"width": 1280, "height": 860})
    compare_all(page, url, kl=True)
    page.screenshot(path=str(out / "compare-kl-desktop.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.locator("#results").screenshot(path=str(out / "compare-kl-phone.png"))
    page.set_viewport_size({"width": 1280, "height": 860})


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--screenshots", required=True, help="output directory for the PNGs")
    ap.add_argument("--env-dir", help="keep the trained run and registry here (reused when present)")
    ap.add_argument("--only", help="comma-separated shots to take (default: all), e.g. compare-kl")
    a = ap.parse_args()
    screenshots(Path(a.screenshots), Path(a.env_dir) if a.env_dir else None,
                set(a.only.split(",")) if a.only else None)

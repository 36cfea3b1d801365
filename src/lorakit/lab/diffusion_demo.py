"""`lorakit diffusion-demo`: LoRA on an image model, end to end on a CPU in minutes.

1. base: a small diffusers UNet2DModel trained on scikit-learn's digits 0-4 (16x16) through the one training
   loop (full training from random init), cached as diffusers files (lab/diffusion.py: base_unet);
2. adapter: LoRA on its resnet convs and attention projections, trained on digits 5-9 through the same loop
   (train/diffusion.py: the DDPM noise-prediction loss), written in the PEFT layout;
3. the change, measured: a digit classifier labels DDIM samples of the base and of the adapted model at weights
   0.5 and 1.0 (the same starting noise for each): the share of new digits (5-9) before and after;
4. what the text side has: the adapter loaded by PEFT onto the same UNet (max output difference), merge/unmerge
   (max difference), `inspect`, the registry (a UNet base fingerprint), and a sweep over ranks against full
   fine-tuning (new-digit share, file size, seconds);
5. PNG grids: before/after samples, and one row per sweep run.

Everything lands in `out` (result.json, grid.png, sweep_grid.png, adapter/, sweep/); bench/diffusion_demo.py
keeps the figures in bench/results/ and the pictures in docs/diffusion/.
"""
from __future__ import annotations

import copy
import logging
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lorakit.config import LoraConfig, TrainConfig
from lorakit.files import atomic_write_json
from lorakit.lab.diffusion_options import DemoOptions
from lorakit.lab.diffusion import (NEW_DIGITS, OLD_DIGITS, UNET_TARGETS, DigitClassifier, base_unet,
                                   digits, sample, save_grid, scheduler)

log = logging.getLogger("lorakit.lab")


def _dir_bytes(path: Path, prefix: str) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.startswith(prefix))


def train_adapter(unet, out: Path, opts: DemoOptions, *, r: int, alpha: float, full: bool = False,
                  progress: bool = True, base_name: str | None = None) -> dict:
    """LoRA (or, with full, every weight) on digits 5-9 through the one loop -> its figures."""
    from lorakit.train.diffusion import DiffusionBackend
    from lorakit.train.loop import train

    images, _ = digits(NEW_DIGITS, unet.config.sample_size)
    cfg = TrainConfig(lr=opts.full_lr if full else opts.lr, max_steps=opts.steps, batch_size=opts.batch_size,
                      warmup_ratio=0.05, full=full, seed=opts.seed, threads=opts.threads)
    lora = LoraConfig(r=r, alpha=alpha, targets=UNET_TARGETS)
    res = train(unet, None, images, out, lora, cfg, backend=DiffusionBackend(unet, scheduler()), progress=progress,
                base_name=base_name, metadata={"data": "sklearn digits 5-9", "size": unet.config.sample_size,
                                                   "images": len(images)})
    tail = res.losses[-20:]
    return {"seconds": round(res.seconds, 1), "steps": res.steps, "first_loss": round(res.losses[0], 4),
            "final_loss": round(sum(tail) / len(tail), 4), "trainable": res.trainable, "images": len(images),
            "bytes": _dir_bytes(out, "diffusion_pytorch_model" if full else "adapter_model")}


def _judge(clf: DigitClassifier, unet, opts: DemoOptions) -> tuple[dict, torch.Tensor]:
    t0 = time.perf_counter()
    x = sample(unet, opts.samples, steps=opts.sample_steps, seed=opts.seed)
    return {**clf.shares(x), "sample_seconds": round(time.perf_counter() - t0, 1)}, x


def _interop(unet, base, adapter_dir: Path) -> dict:
    """Max output differences: PEFT's loader vs lorakit on the same UNet, and merged vs not (then unmerged)."""
    from lorakit.core.inject import merge, set_active, unmerge

    g = torch.Generator().manual_seed(1)
    s = unet.config.sample_size
    x, t = torch.randn(8, 1, s, s, generator=g), torch.linspace(0, 999, 8).long()
    set_active(unet, "default")
    with torch.no_grad():
        want = unet(x, t).sample
        out = {}
        try:
            import peft

            pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()
            out["peft_max_abs_diff"] = float((pm(x, t).sample - want).abs().max())
        except ImportError:
            log.info("peft is not installed: no PEFT round trip")
        merge(unet)
        out["merged_max_abs_diff"] = float((unet(x, t).sample - want).abs().max())
        unmerge(unet)
        out["unmerged_max_abs_diff"] = float((unet(x, t).sample - want).abs().max())
    return out


def run_demo(opts: DemoOptions, progress: bool = True) -> dict:
    """The whole demo (see the module doc) -> the result dict, also written to `out`/result.json."""
    from lorakit.adapters.peft_files import fingerprint, read_adapter
    from lorakit.adapters.registry import Registry
    from lorakit.core.inject import set_active
    from lorakit.lab.diffusion import load_unet
    from lorakit.models import set_threads

    opts.validate()
    t_start = time.perf_counter()
    threads = set_threads(opts.threads)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    clf = DigitClassifier(opts.base.size, seed=opts.seed)
    log.info("digit classifier: %.3f held-out accuracy", clf.accuracy)
    base, base_dir, base_info = base_unet(opts.base, threads=threads, progress=progress,
                                          root=Path(opts.cache) if opts.cache else None)
    base.eval()
    result: dict = {"options": {**asdict(opts), "base": {**asdict(opts.base), "channels": list(opts.base.channels)}},
                    "threads": threads, "torch": torch.__version__, "machine": platform.machine(),
                    "classifier_accuracy": round(clf.accuracy, 4),
                    "base": {**base_info, "dir": str(base_dir), "params": sum(p.numel() for p in base.parameters())}}
    before, x_base = _judge(clf, base, opts)
    result["samples"] = {"base": before}
    log.info("base: %.1f%% of %d samples are new digits (5-9)", 100 * before["new_share"], opts.samples)

    unet = copy.deepcopy(base)
    adapter_dir = out / "adapter"
    result["adapter"] = train_adapter(unet, adapter_dir, opts, r=opts.r, alpha=opts.alpha, progress=progress,
                                      base_name=str(base_dir))
    xs = {}
    for w in (0.5, 1.0):
        set_active(unet, {"default": w})
        result["samples"][f"lora_w{w:g}"], xs[w] = _judge(clf, unet, opts)
        log.info("adapter at weight %g: %.1f%% new digits", w, 100 * result["samples"][f"lora_w{w:g}"]["new_share"])
    result["interop"] = _interop(unet, base, adapter_dir)
    af = read_adapter(adapter_dir)  # what `lorakit inspect` shows
    result["inspect"] = {"modules": len(af.modules()), "params": af.num_params(), "bytes": result["adapter"]["bytes"],
                         "task_type": af.peft_config.get("task_type"),
                         "base_architecture": af.fingerprint["architecture"],
                         "base_shape_hash": af.fingerprint["shape_hash"]}
    base_fp = fingerprint(base)
    reg = Registry(out / "registry.sqlite", base_fp=base_fp, base_name=str(base_dir))
    try:
        v = reg.add("digits-5-9", adapter_dir)
        result["registry"] = {"name": v.name, "version": v.version, "base_weight_hash": base_fp["weight_hash"]}
    finally:
        reg.close()

    k = 16
    new_images = digits(NEW_DIGITS, opts.base.size)[0]
    real = new_images[torch.randperm(len(new_images), generator=torch.Generator().manual_seed(opts.seed))[:k]]
    rows = [("data 5-9", real), ("base", x_base[:k]), ("LoRA w=0.5", xs[0.5][:k]), ("LoRA w=1", xs[1.0][:k])]
    save_grid(rows, out / "grid.png", labels=[None] + [clf.labels(x) for _, x in rows[1:]],
              title=f"base trained on digits {OLD_DIGITS[0]}-{OLD_DIGITS[-1]}; LoRA r={opts.r} on 5-9 "
                    f"(same noise in each column; classifier's label above)")

    # the sweep: each rank (alpha = 2 r, the main run's scale) from the same base, same steps; the main run is a row
    sweep = [{"name": f"lora-r{opts.r}", "r": opts.r, **result["adapter"], **result["samples"]["lora_w1"]}]
    sweep_x = {opts.r: xs[1.0][:k]}
    for r in sorted(set(opts.sweep_ranks) - {opts.r}):
        m = load_unet(base_dir)
        fig = train_adapter(m, out / "sweep" / f"lora-r{r}", opts, r=r, alpha=2.0 * r, progress=progress,
                            base_name=str(base_dir))
        judged, x = _judge(clf, m.eval(), opts)
        sweep.append({"name": f"lora-r{r}", "r": r, **fig, **judged})
        sweep_x[r] = x[:k]
        log.info("sweep r=%d: %.1f%% new digits, %d bytes", r, 100 * judged["new_share"], fig["bytes"])
    sweep.sort(key=lambda row: row["r"])
    sweep_rows = [("base", x_base[:k])] + [(f"r={r}", sweep_x[r]) for r in sorted(sweep_x)]
    if opts.sweep_full:
        m = load_unet(base_dir)
        fig = train_adapter(m, out / "sweep" / "full", opts, r=opts.r, alpha=opts.alpha, full=True,
                            progress=progress)
        judged, x = _judge(clf, m.eval(), opts)
        sweep.append({"name": "full", "r": None, **fig, **judged})
        sweep_rows.append(("full FT", x[:k]))
        log.info("sweep full: %.1f%% new digits, %d bytes", 100 * judged["new_share"], fig["bytes"])
    result["sweep"] = sweep
    if len(sweep_rows) > 2:
        save_grid(sweep_rows, out / "sweep_grid.png", labels=[clf.labels(x) for _, x in sweep_rows],
                  title=f"digits 5-9 on top of the 0-4 base: LoRA ranks vs full fine-tuning, {opts.steps} steps")
    result["seconds_total"] = round(time.perf_counter() - t_start, 1)
    atomic_write_json(out / "result.json", result)
    return result


def format_summary(res: dict) -> str:
    s = res["samples"]
    lines = [f"classifier accuracy {res['classifier_accuracy']:.3f}; base {res['base']['params']:,} params "
             f"({'cached' if res['base'].get('cached') else 'trained'})",
             f"new digits (5-9) among samples: base {s['base']['new_share']:.1%}, LoRA w=0.5 "
             f"{s['lora_w0.5']['new_share']:.1%}, w=1.0 {s['lora_w1']['new_share']:.1%}",
             f"adapter: {res['inspect']['params']:,} params in {res['inspect']['bytes']:,} bytes, "
             f"{res['adapter']['seconds']:.0f} s; PEFT max diff {res['interop'].get('peft_max_abs_diff')}"]
    for row in res.get("sweep", []):
        lines.append(f"  {row['name']:<10} new {row['new_share']:6.1%}  {row['bytes']:>10,} bytes  "
                     f"{row['seconds']:6.0f} s  loss {row['final_loss']:.4f}")
    lines.append(f"total {res['seconds_total']:.0f} s")
    return "\n".join(lines)

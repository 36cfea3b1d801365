"""PNG plots for a sweep (matplotlib, `pip install lorakit[plot]`): quality vs rank with the full fine-tune as a
line, parameters and memory vs rank, loss curves, and the SVD energy of the full fine-tune's weight change."""
from __future__ import annotations

from pathlib import Path

FULL_COLOR, BASE_COLOR = "black", "grey"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    from lorakit.files import atomic_write_file

    atomic_write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    pyplot().close(fig)
    return path


def _lora_series(results: list[dict]) -> dict[str, list[dict]]:
    """targets label -> LoRA results sorted by rank."""
    series: dict[str, list[dict]] = {}
    for r in results:
        if r and r["kind"] == "lora":
            series.setdefault(r["name"].rsplit("-r", 1)[0].removeprefix("lora-"), []).append(r)
    return {k: sorted(v, key=lambda x: x["r"]) for k, v in series.items()}


def _by_kind(results, kind):
    return next((r for r in results if r and r["kind"] == kind), None)


def _rank_axes(ax, ranks):
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks)
    ax.set_xticklabels([str(r) for r in ranks])
    ax.set_xlabel("LoRA rank r")
    ax.grid(alpha=0.3)


def _panel(ax, results, key, title, ylabel, base_key=None, logy=False):
    series = _lora_series(results)
    ranks = sorted({r["r"] for s in series.values() for r in s})
    for label, rs in series.items():
        pts = [(r["r"], r[key]) for r in rs if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"LoRA {label}")
    full, base = _by_kind(results, "full"), _by_kind(results, "base")
    if full and full.get(key) is not None:
        ax.axhline(full[key], color=FULL_COLOR, ls="--", label="full fine-tuning")
    if base_key and base and base.get(base_key) is not None:
        ax.axhline(base[base_key], color=BASE_COLOR, ls=":", label="base model")
    if logy:
        ax.set_yscale("log")
    if ranks:
        _rank_axes(ax, ranks)
    ax.set_title(title)
    ax.set_ylabel(ylabel)


def quality_vs_rank(results: list[dict], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    _panel(axes[0], results, "accuracy", "Task accuracy (exact match)", "accuracy", base_key="accuracy")
    _panel(axes[1], results, "eval_loss", "Held-out loss", "loss per target token", base_key="eval_loss",
           logy=True)
    _panel(axes[2], results, "general_loss", "Forgetting: loss on general text", "loss per token",
           base_key="general_loss")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def cost_vs_rank(results: list[dict], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    _panel(axes[0], results, "trainable", "Trainable parameters", "parameters", logy=True)
    _panel(axes[1], results, "peak_mib", "Peak memory while training (RSS)", "MiB (incl. base weights)")
    _panel(axes[2], results, "tokens_per_s", "Training throughput", "tokens / s")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def loss_curves(results: list[dict], path: Path) -> Path:
    plt = pyplot()
    series = _lora_series(results)
    fig, axes = plt.subplots(1, max(1, len(series)), figsize=(6.5 * max(1, len(series)), 4.2), squeeze=False)
    cmap = plt.get_cmap("viridis")
    full = _by_kind(results, "full")
    for ax, (label, rs) in zip(axes[0], series.items() or [("", [])]):
        for i, r in enumerate(rs):
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], color=cmap(i / max(1, len(rs) - 1)),
                    label=f"r={r['r']}")
        if full:
            ax.plot(range(1, len(full["losses"]) + 1), full["losses"], color=FULL_COLOR, ls="--", label="full FT")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (per target token)")
        ax.set_title(f"Training loss, LoRA {label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)


RANDOM_STYLES = [(":", "x"), ("--", "^"), ("-.", "s"), ((0, (1, 3)), "d")]


def svd_energy(analysis: dict, results: list[dict], path: Path) -> Path:
    """Left: energy of the full fine-tune's weight change in its top r singular directions, per module kind,
    with random matrices of the same shapes for reference. Right: LoRA's accuracy at r beside that energy."""
    plt = pyplot()
    ranks = analysis["ranks"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 4.8))
    for kind, k in analysis["kinds"].items():
        ax.plot(ranks, k["energy"], marker=".", label=f"{kind} {k['shape'][0]}x{k['shape'][1]}")
    shown = {}
    for k in analysis["kinds"].values():
        shape = tuple(sorted(k["shape"]))
        if shape not in shown:  # one grey reference per shape, each with its own dash and marker
            ls, mk = RANDOM_STYLES[len(shown) % len(RANDOM_STYLES)]
            shown[shape] = ax.plot(ranks, k["random_energy"], color="grey", ls=ls, marker=mk, markersize=4,
                                   label=f"random {k['shape'][0]}x{k['shape'][1]}")
    _rank_axes(ax, ranks)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("share of ||dW||² in the top r singular values")
    ax.set_title("Full fine-tune's weight change: energy in the top r directions")
    ax.legend(fontsize=7)
    ax2.plot(ranks, analysis["overall"], color="grey", ls="--", marker=".", label="full FT energy at r (all modules)")
    for label, rs in _lora_series(results).items():
        ax2.plot([r["r"] for r in rs], [r["accuracy"] for r in rs], marker="o", label=f"LoRA {label} accuracy")
    full = _by_kind(results, "full")
    if full:
        ax2.axhline(full["accuracy"], color=FULL_COLOR, ls="--", label="full fine-tuning accuracy")
    _rank_axes(ax2, ranks)
    ax2.set_ylim(0, 1.02)
    ax2.set_title("LoRA's accuracy at rank r beside the energy a rank-r matrix keeps")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def write_all(out: Path, results: list[dict], analysis: dict | None) -> list[Path]:
    done = [r for r in results if r]
    paths = []
    if any(r["kind"] != "base" for r in done):
        paths += [quality_vs_rank(done, out / "quality_vs_rank.png"), cost_vs_rank(done, out / "cost_vs_rank.png"),
                  loss_curves(done, out / "loss_curves.png")]
    if analysis:
        paths.append(svd_energy(analysis, done, out / "svd_energy.png"))
    return paths

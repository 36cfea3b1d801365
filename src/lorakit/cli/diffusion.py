"""`lorakit diffusion-demo`: a thin front end of lab/diffusion_demo.py (LoRA on a diffusers UNet, on the CPU)."""
from __future__ import annotations


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected a comma list of integers, got {s!r}") from None


def cmd_diffusion_demo(args) -> int:
    try:
        import diffusers  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as e:
        raise ValueError(f"the diffusion demo needs {e.name!r}: pip install 'lorakit[diffusion]'") from None
    from lorakit.lab.diffusion_demo import format_summary, run_demo
    from lorakit.lab.diffusion_options import BaseSpec, DemoOptions

    base = BaseSpec(channels=tuple(_ints(args.base_channels)), size=args.size, steps=args.base_steps, seed=args.seed)
    opts = DemoOptions(out=args.output, base=base, r=args.r, alpha=args.alpha or 2.0 * args.r, steps=args.steps,
                       lr=args.lr, samples=args.samples, sample_steps=args.sample_steps,
                       sweep_ranks=_ints(args.sweep_ranks), sweep_full=not args.no_full, threads=args.threads,
                       seed=args.seed, cache=args.cache)
    res = run_demo(opts, progress=not args.quiet)
    if not args.quiet:
        print(format_summary(res))
        print(f"wrote {args.output}/ (result.json, grid.png, sweep_grid.png, adapter/)")
    return 0


def register(sub) -> None:
    from lorakit.lab.diffusion_options import BaseSpec, DemoOptions

    d, b = DemoOptions(), BaseSpec()
    p = sub.add_parser("diffusion-demo", help="LoRA on a small diffusion UNet (digits 0-4 -> 5-9) on the CPU: "
                                              "samples before/after, PEFT interop, a rank sweep")
    p.add_argument("-o", "--output", default=d.out, help="output dir")
    p.add_argument("--r", type=int, default=d.r, help="LoRA rank")
    p.add_argument("--alpha", type=float, help="LoRA alpha; unset: 2 r")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps of each adapter run")
    p.add_argument("--lr", type=float, default=d.lr, help="LoRA learning rate")
    p.add_argument("--samples", type=int, default=d.samples, help="DDIM samples a model, labelled by the classifier")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps, help="DDIM steps a sample")
    p.add_argument("--sweep-ranks", default=",".join(map(str, d.sweep_ranks)),
                   help="comma list of ranks for the sweep, '' for none")
    p.add_argument("--no-full", action="store_true", help="leave full fine-tuning out of the sweep")
    p.add_argument("--base-steps", type=int, default=b.steps, help="steps of the base training when it is not cached")
    p.add_argument("--size", type=int, default=b.size, choices=[8, 16],
                   help="image side: the digits upscaled (16) or as they come (8: ~3x faster, blockier)")
    p.add_argument("--base-channels", default=",".join(map(str, b.channels)), help="UNet block widths")
    p.add_argument("--cache", help="base cache root; unset: ~/.cache/lorakit/diffusion")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the cores this process may use)")
    p.add_argument("--seed", type=int, default=0, help="base, adapter, data order and sampling noise")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages, errors only")
    p.set_defaults(func=cmd_diffusion_demo)

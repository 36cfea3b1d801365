"""`lorakit export --format gguf`: a merged model, or the adapter itself, as GGUF for llama.cpp and Ollama."""
from __future__ import annotations

from pathlib import Path


def cmd_export(args) -> int:
    from lorakit.cli.commands import load_model_and_adapters, say

    out = Path(args.output)
    if args.adapter_only:
        from transformers import AutoConfig

        from lorakit.adapters.gguf_export import write_lora_gguf
        from lorakit.models import resolve_model_path

        if not args.adapter or len(args.adapter) != 1:
            raise ValueError("--adapter-only writes one adapter: pass exactly one --adapter")
        path, gguf = resolve_model_path(args.model)
        if gguf:
            raise ValueError(f"--adapter-only reads the base's config.json; {args.model!r} is a GGUF file: "
                             f"pass its Hugging Face dir (or 'embedded')")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        write_lora_gguf(args.adapter[0], config, out, args.outtype or "f32")
        say(args, f"wrote llama.cpp LoRA adapter {out} (llama-cli -m BASE.gguf --lora {out}; "
                   f"Ollama: ADAPTER {out})")
        return 0
    from lorakit.adapters.gguf_export import write_model_gguf
    from lorakit.cli.commands import merged_model

    args.save_dtype = None  # the GGUF's tensor type is --outtype; a 4-bit base's merge rounds to bfloat16 first
    if args.adapter:
        model, tok, _ = merged_model(args, args.adapter)
    else:
        model, tok = load_model_and_adapters(args)
    write_model_gguf(model, tok, out, args.outtype or "f16", name=args.name)
    say(args, f"wrote {out} ({args.outtype or 'f16'}; llama-cli -m {out}; Ollama: FROM {out})")
    return 0


def register(sub) -> None:
    from lorakit.cli.commands import merge_args, model_args

    p = sub.add_parser("export", help="a merged model (or, with --adapter-only, the adapter) as GGUF for llama.cpp "
                                      "and Ollama")
    model_args(p)
    p.add_argument("--adapter", action="append", help="adapter dir ('dir:weight'; repeat to stack), merged first")
    p.add_argument("--format", default="gguf", choices=["gguf"], help="file format (merge writes a HF dir)")
    p.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"],
                   help="tensor type: model f16 (default), bf16, q8_0 or f32 (1-D tensors stay f32); "
                        "adapter f32 (default), f16 or bf16")
    p.add_argument("--adapter-only", action="store_true",
                   help="write the adapter as a llama.cpp LoRA GGUF (applied at load time on a GGUF of the base) "
                        "instead of a merged model")
    merge_args(p)
    p.add_argument("--name", help="general.name in the file (default: the model directory's name)")
    p.add_argument("-o", "--output", required=True, help="the .gguf file to write")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_export)

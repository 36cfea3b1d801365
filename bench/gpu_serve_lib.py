"""What every case of bench/gpu_serve.py shares: the random-weight model, random r=16 adapters in the PEFT layout (in
memory or written to a folder), the prompts, a pass of requests through an engine and the latency summary."""
from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import types
from pathlib import Path

import torch

SHAPES = {"llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                           rope_theta=500000.0),
          "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                           rope_theta=500000.0),
          "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R = 16
EOS = 2
TOK = types.SimpleNamespace(eos_token_id=EOS)  # what the engine asks of a tokenizer when prompts are token ids


def build_model(shape: str, dtype, dev, max_len: int):
    """A random-weight Llama of `shape`, built directly in `dtype` on `dev` (an 8B model never exists in fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(max_len, 2048), bos_token_id=1,
                      eos_token_id=EOS, pad_token_id=0)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg).to(dtype).eval()
    finally:
        torch.set_default_dtype(old)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _layout(model):
    """[(module path, in, out)] of every adapted projection, and the per-element scale of one flat adapter
    (A ~ N(0, 1/in), B ~ N(0, 0.02^2)), kept on the model's device."""
    cached = getattr(model, "_bench_layout", None)
    if cached is None:
        mods = [(p, m.in_features, m.out_features) for p, m in model.named_modules()
                if p.rsplit(".", 1)[-1] in TARGETS]
        dev = next(model.parameters()).device
        sizes, scales = [], []
        for _, i, o in mods:
            sizes += [R * i, o * R]
            scales += [1 / i ** 0.5, 0.02]
        scale = torch.repeat_interleave(torch.tensor(scales, device=dev), torch.tensor(sizes, device=dev))
        cached = model._bench_layout = (mods, sizes, scale)
    return cached


def make_adapter(model, seed: int):
    """An AdapterFile in the PEFT layout on every projection of every layer, r=16, in the model's dtype on the
    host: drawn in one piece on the model's device (a thousand llama-1b adapters take seconds, not minutes)."""
    from lorakit.adapters.peft_files import PREFIX, AdapterFile
    from lorakit.config import LoraConfig

    mods, sizes, scale = _layout(model)
    w = next(model.parameters())
    g = torch.Generator(device=w.device).manual_seed(1000 + seed)
    flat = (torch.randn(scale.numel(), generator=g, device=w.device) * scale).to(w.dtype).cpu()
    parts = iter(torch.split(flat, sizes))
    tensors = {}
    for path, i, o in mods:
        tensors[f"{PREFIX}{path}.lora_A.weight"] = next(parts).view(R, i)
        tensors[f"{PREFIX}{path}.lora_B.weight"] = next(parts).view(o, R)
    cfg = LoraConfig(r=R, alpha=2 * R, targets=list(TARGETS))
    return AdapterFile(Path(f"bench-adapter-{seed}"), cfg, {}, tensors, {})


def adapter_bytes(af) -> int:
    return sum(t.numel() * t.element_size() for t in af.tensors.values())


def write_adapter(af, path: Path) -> Path:
    """The adapter as PEFT writes it: adapter_config.json + adapter_model.safetensors (each tensor its own)."""
    from safetensors.torch import save_file

    from lorakit.adapters.peft_files import CONFIG_NAME, WEIGHTS_NAME

    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(af.config.to_peft(None, "CAUSAL_LM"), indent=2))
    save_file({k: v.clone() for k, v in af.tensors.items()}, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    return path


def scratch_dir(need: int) -> tuple[Path, str]:
    """A folder for `need` bytes of adapter files: in /dev/shm (host memory: the host cache the engine's loader
    reads from) when it has room for them, else on disk. -> (folder, "tmpfs" | "disk")."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 1.3 * need + (1 << 30):
        return Path(tempfile.mkdtemp(prefix="lorakit-bench-", dir=shm)), "tmpfs"
    return Path(tempfile.mkdtemp(prefix="lorakit-bench-")), "disk"


def make_prompts(n: int, args, vocab: int) -> list[list[int]]:
    """n prompts of args.prompt random tokens; the same seed everywhere, so every case runs the same rows."""
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, vocab, (n, args.prompt), generator=g).tolist()


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None


def ms(xs, q, nd=2):
    v = pct(xs, q)
    return None if v is None else round(1e3 * v, nd)


def summarize(t0, times) -> dict:
    """Latencies and rates from each request's token times (perf_counter) after submission at t0."""
    first = [t[0] - t0 for t in times]
    itl = [b - a for t in times for a, b in zip(t, t[1:])]
    start = max(t[0] for t in times)  # decode span: from the moment every row has its first token to the end
    end = max(t[-1] for t in times)
    decode_tokens = sum(sum(1 for x in t if x > start) for t in times)
    tokens = sum(len(t) for t in times)
    return dict(ttft_p50_ms=ms(first, .5), ttft_p99_ms=ms(first, .99), itl_p50_ms=ms(itl, .5, 3),
                itl_p99_ms=ms(itl, .99, 3), decode_tok_s=round(decode_tokens / (end - start), 1) if end > start else None,
                e2e_tok_s=round(tokens / (end - t0), 1), tokens=tokens, total_s=round(end - t0, 3),
                prefill_s=round(start - t0, 3))


def engine_pass(eng, prompts, uses, new: int, timeout: float = 600):
    """Submit every request at once (request i: prompts[i] under the adapters uses[i]), greedy, exactly `new`
    tokens each; -> (t0, each request's token times). Raises if any request fails or does not finish."""
    from lorakit.serve.request import GenRequest

    n = len(prompts)
    times = [[] for _ in range(n)]
    done = [None] * n
    ev, left = threading.Event(), [n]

    def sink_for(i):
        def sink(e):
            if e[0] == "token":
                times[i].append(time.perf_counter())
            else:
                done[i] = e
                left[0] -= 1
                if left[0] == 0:
                    ev.set()
        return sink
    t0 = time.perf_counter()
    for i in range(n):
        eng.submit(GenRequest(list(prompts[i]), list(uses[i]), max_tokens=new, ignore_eos=True, sink=sink_for(i)))
    if not ev.wait(timeout):
        raise RuntimeError(f"{left[0]} of {n} requests still running after {timeout} s")
    bad = [d for d in done if d is None or d[0] != "done"]
    if bad or any(len(t) != new for t in times):
        raise RuntimeError(f"{len(bad)} requests failed: {bad[:3]}; token counts {sorted({len(t) for t in times})}")
    return t0, times


def start_engine(model, args, max_slots: int):
    from lorakit.serve.fast import StaticEngine

    return StaticEngine(model, TOK, max_slots=max(1, max_slots), max_batch=args.rows,
                        max_len=args.prompt + args.new + 8, prefill_chunk=args.chunk).start()


def run_engine_case(model, prompts, uses, args, max_slots: int):
    """One engine; warm-up passes (kernels compiled, graphs captured for small buckets and the full one), then
    the measured pass. -> (t0, token times, engine info)."""
    eng = start_engine(model, args, max_slots)
    try:
        k = min(len(prompts), 4)
        engine_pass(eng, prompts[:k], uses[:k], args.new)
        engine_pass(eng, prompts, uses, args.new)
        before = eng.info()
        t0, times = engine_pass(eng, prompts, uses, args.new)
        info = eng.info()
        # the measured pass's own counts and engine-thread seconds (prefill turns, adapter writes, loads)
        keys = ("prefills", "prefill_splits", "prefill_s", "acquire_s", "admit_s", "decode_s", "decode_steps",
                "queue_s", "adapter_loads")  # queue_s: submitted -> admitted, summed over the pass's requests
        info["pass"] = {k: round(info[k] - before[k], 4) for k in keys if k in info}
        return t0, times, info
    finally:
        eng.stop()

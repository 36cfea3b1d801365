"""Predict trainable parameters, optimizer state and peak training memory for LoRA, QLoRA and full
fine-tuning, from a model's config alone (the model is built on the meta device: no weights are read).

The memory model (bytes; P = base parameters, p = trainable parameters, T = batch * seq tokens):
  weights      LoRA: (P + p) * wb (base dtype; lorakit makes adapters in the base's dtype)
               QLoRA: the decoder's linear weights in NF4 with double quantization
                      (0.5 byte + 1/64 byte 8-bit absmax per 64 + 4/(64*256) per 256 blocks), the rest and the
                      adapters in bf16
               full: P * wb
  gradients    p * (bytes of the trainable dtype)
  optimizer    AdamW: two states per trainable parameter in its dtype (torch keeps them in the param's dtype)
  activations  what autograd saves for backward, per decoder layer and token, in elements
               (derived from the Llama decoder as transformers runs it, SDPA attention):
                 always: 2h (layer input, post-attention residual) + 2 (RMSNorm rstd): RMSNorm upcasts
                         its input, so these are fp32 copies whatever the dtype, as is the log-sum-exp
                         + 2q + 2kv + heads (attention: q, k, v, output, log-sum-exp)
                         + 3m (gate, up, silu(gate))
                 + h if q/k/v train (their shared input), + h if gate/up train, + m if down trains
                 + 2h if the norm weights train (full fine-tuning)
                 + sum of r over the layer's adapted modules (A's output)
               and after the last layer h + 1 (final norm; + 2h with full fine-tuning); with LoRA the first
               layer's input and norm are not saved (the frozen embedding needs no gradient): - (h + 1)
               h hidden, m intermediate, q = heads*head_dim, kv = kv_heads*head_dim; times T and the compute
               dtype's bytes (4 for the fp32 part). With checkpointing: each layer keeps only its input (h),
               plus one layer's full set while it is recomputed.
  logits       3 * T * vocab * 4 bytes: at the end of the forward the logits, their shifted copy and the saved
               log-softmax are alive (fp32); the backward holds as many (saved output, its gradient, the
               logits' gradient)
Peak = weights + optimizer + max(gradients, activations + logits): the saved activations and the logits are
all alive at the start of the backward, when no gradient exists yet (they are set to None after each step);
by the end of the backward the gradients are all there and the activations are gone.
FSDP over S processes (`shards`, per-GPU batch): weights, gradients and AdamW state are 1/S each (every tensor
is cut in S chunks), plus `gathered`: two units whole at once (the one running and the next, prefetched), a unit
being a decoder layer (4-bit linears, norms, adapters) or the embedding or the head, the largest counted. The
activations and logits are those of the per-GPU batch. QLoRA's 4-bit base shards the same way (core/nf4_shard.py).
`adapter_state="replicate"`: the trainable tensors, their gradients and AdamW state whole on every GPU (not in the
gathered units). `offload` (FSDP2's CPU offload, train/fsdp.py): the sharded weights, gradients and AdamW state
move to host memory (`host`, per process); the GPU keeps the replicated part, and each gathered unit has its shard
copied in beside it (2 units x (1 + 1/S)); not counted: a unit's whole gradient before its reduce-scatter and copy
to the host (small for adapters, a whole layer's for full fine-tuning).
Not in it: the framework itself (a CPU process with torch imported ~0.25 GiB, plus ~12 MiB that the first
backward allocates whatever the model's size, measured with a one-layer model; a CUDA context ~0.5 GiB),
the allocator's caching, and the tokenizer and data.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field

import torch

GiB = 2 ** 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit code + 8-bit absmax per 64 + fp32 per 256 absmax blocks
METHODS = ("lora", "qlora", "full")
ATTN_IN, MLP_IN, DOWN = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("down_proj",)


@dataclass
class Arch:
    """The shapes the memory model needs, read from a model config."""
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    params: int  # all parameters, tied ones once
    linear: dict[str, tuple[int, int]] = field(default_factory=dict)  # module path -> (in, out)
    head: str = "lm_head"  # the output projection's path
    meta: object = None  # the meta-device model (for target matching)


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_config(model: str):
    """'embedded', a local Hugging Face model dir, or a config.json path -> transformers config."""
    from pathlib import Path

    from transformers import AutoConfig

    from lorakit.models import resolve_model_path

    p = Path(model)
    if p.is_file() and p.name.endswith(".json"):
        return AutoConfig.from_pretrained(p.parent)
    path, gguf = resolve_model_path(model)
    if gguf:
        raise ValueError(f"estimate reads a config.json; {model!r} is a GGUF file: pass its Hugging Face dir")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(f"no config for model {model!r} in local files: {e}") from None


def arch_of(config, name: str = "") -> Arch:
    from lorakit.core.inject import output_head_paths, count_params

    meta = _meta_model(config)
    heads = config.num_attention_heads
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    linear = {p: (m.in_features, m.out_features) for p, m in meta.named_modules() if isinstance(m, torch.nn.Linear)}
    head = next(iter(output_head_paths(meta)), "lm_head")
    return Arch(name=name or getattr(config, "name_or_path", "") or config.model_type, vocab=config.vocab_size,
                hidden=hidden, layers=config.num_hidden_layers, heads=heads,
                kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                intermediate=getattr(config, "intermediate_size", 4 * hidden), params=count_params(meta)[1],
                linear=linear, head=head, meta=meta)


def lora_modules(arch: Arch, targets) -> list[str]:
    from lorakit.config import TARGET_PRESETS
    from lorakit.core.inject import find_targets

    if isinstance(targets, str):
        targets = TARGET_PRESETS.get(targets, targets)
    return find_targets(arch.meta, targets)


def lora_params(arch: Arch, r: int, targets="all-linear") -> int:
    """r * (in + out) for every adapted linear module."""
    return sum(r * sum(arch.linear[p]) for p in lora_modules(arch, targets))


def activation_elems(arch: Arch, method: str, r: int, targets, checkpointing: bool) -> tuple[int, int]:
    """Saved activations per token for the whole model, in elements: (all, the part kept in fp32 whatever the
    compute dtype: RMSNorm's input copy and rstd, attention's log-sum-exp). See the module docstring."""
    h, m = arch.hidden, arch.intermediate
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    norms = 2 * h + 2  # the two RMSNorms' inputs (upcast to fp32 copies) and rstd
    per_layer = norms + 2 * q + 2 * kv + arch.heads + 3 * m
    fp32_layer = norms + arch.heads
    if method == "full":
        per_layer += 2 * h + h + h + m
        final, fp32_final = 3 * h + 1, h + 1
    else:
        modules = lora_modules(arch, targets)
        suffixes = {p.rsplit(".", 1)[-1] for p in modules}
        per_layer += (h if suffixes & set(ATTN_IN) else 0) + (h if suffixes & set(MLP_IN) else 0) \
            + (m if suffixes & set(DOWN) else 0)
        per_layer += r * len(modules) // max(arch.layers, 1)
        # the final norm's h + 1 is offset by the first layer's input and norm, which are not saved:
        # the frozen embedding's output needs no gradient
        final, fp32_final = 0, 0
    if checkpointing:  # each layer's input in the compute dtype, one layer's full set while it is recomputed
        return arch.layers * h + per_layer + final, fp32_layer + fp32_final
    return arch.layers * per_layer + final, arch.layers * fp32_layer + fp32_final


def activation_bytes(arch: Arch, method: str, r: int, targets, checkpointing: bool, act_bytes: int) -> int:
    """Bytes per token of saved activations, with the fp32 part at 4 bytes."""
    total, fp32 = activation_elems(arch, method, r, targets, checkpointing)
    return (total - fp32) * act_bytes + fp32 * 4


@dataclass
class Estimate:
    method: str
    params: int  # base parameters
    trainable: int
    weights: int  # bytes
    grads: int
    optimizer: int
    activations: int
    logits: int
    checkpointing: bool = False
    shards: int = 1  # FSDP processes: weights, grads and optimizer are this rank's 1/shards
    gathered: int = 0  # FSDP: units gathered whole at once (module doc)
    offload: bool = False  # FSDP's CPU offload: the sharded weights, grads and AdamW state in host memory
    adapter_state: str = "shard"  # FSDP: the trainable tensors sharded, or whole on every GPU ("replicate")
    host: int = 0  # bytes in host memory a process (offload)

    @property
    def total(self) -> int:
        """The peak: weights and optimizer state stay; the gradients grow during the backward as the saved
        activations are freed, so the two peak at different times (start vs end of the backward)."""
        return self.weights + self.gathered + self.optimizer + max(self.grads, self.activations + self.logits)

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def estimate(arch: Arch, method: str, r: int = 16, batch: int = 8, seq: int = 512, targets="all-linear",
             dtype: str = "float32", checkpointing: bool = False, shards: int = 1, offload: bool = False,
             adapter_state: str = "shard") -> Estimate:
    if method not in METHODS:
        raise ValueError(f"method {method!r} unknown; expected one of {METHODS}")
    if adapter_state not in ("shard", "replicate") or (adapter_state == "replicate" and method == "full"):
        raise ValueError(f"adapter_state {adapter_state!r}: shard, or replicate for lora/qlora (not {method})")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} unknown; expected one of {sorted(DTYPE_BYTES)}")
    for k, v in (("r", r), ("batch", batch), ("seq", seq), ("shards", shards)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{k} must be a positive integer, got {v!r}")
    wb = DTYPE_BYTES[dtype]
    tokens = batch * seq
    if method == "full":
        trainable = arch.params
        base, tb = 0, wb
    else:
        trainable = lora_params(arch, r, targets)
        tb = 2 if method == "qlora" else wb  # adapters in the compute dtype, as lorakit creates them
        if method == "qlora":
            quant = sum(i * o for p, (i, o) in arch.linear.items() if p != arch.head)
            base = int(quant * NF4_BYTES) + (arch.params - quant) * 2
        else:
            base = arch.params * wb
    act_bytes = 2 if method == "qlora" else wb
    acts = activation_bytes(arch, method, r, targets, checkpointing, act_bytes) * tokens
    train = (trainable * tb, trainable * tb, 2 * trainable * tb)  # weights, grads, AdamW state
    whole = adapter_state == "replicate"  # the trainable tensors stay whole on every GPU, outside FSDP
    part = lambda x: -(-x // shards)  # noqa: E731  (this rank's chunk)
    sharded = (part(base + (0 if whole else train[0])), *(0 if whole else part(x) for x in train[1:]))
    host = sum(sharded) if offload else 0
    weights, grads, optimizer = ((w if whole else 0) + (0 if offload else s) for w, s in zip(train, sharded))
    gathered = 0
    if shards > 1 or offload:
        gathered = int(2 * max(unit_bytes(arch, method, r, targets, wb, adapters=not whole))
                       * (1 + (1 / shards if offload else 0)))
    return Estimate(method=method, params=arch.params, trainable=trainable, weights=weights, grads=grads,
                    optimizer=optimizer, activations=acts, logits=3 * tokens * arch.vocab * 4,
                    checkpointing=checkpointing, shards=shards, gathered=gathered, offload=offload,
                    adapter_state=adapter_state, host=host)


def unit_bytes(arch: Arch, method: str, r: int, targets, wb: int, adapters: bool = True) -> tuple[int, int]:
    """(one decoder layer, the embedding or head, the larger) whole, in bytes: FSDP's units (module doc);
    `adapters` False: the layer's adapters are not in it (kept whole outside FSDP)."""
    layer = {p: io for p, io in arch.linear.items() if ".layers.0." in p}
    dense = sum(i * o for i, o in layer.values())
    adapted = [p for p in lora_modules(arch, targets) if p in layer] if method != "full" and adapters else []
    lora = sum(r * sum(layer[p]) for p in adapted)
    norms = 2 * arch.hidden
    if method == "qlora":
        one = int(dense * NF4_BYTES) + norms * 2 + lora * 2
    else:
        one = (dense + norms) * wb + lora * wb
    return one, arch.vocab * arch.hidden * (2 if method == "qlora" else wb)


def format_estimates(ests: list[Estimate], header: str = "") -> str:
    unit, div = ("GiB", GiB) if max(e.total for e in ests) >= GiB else ("MiB", 2 ** 20)
    num = lambda b: f"{b / div:.2f}" if unit == "GiB" else f"{b / div:.1f}"  # noqa: E731
    lines = [header] if header else []
    fsdp, off = any(e.shards > 1 or e.offload for e in ests), any(e.offload for e in ests)
    lines.append(f"{'method':<7}{'trainable':>14}{'weights':>9}{'gather' if fsdp else '':>8}{'grads':>8}{'AdamW':>8}"
                 f"{'activ.':>8}{'logits':>8}{'peak ' + unit:>10}{'host' if off else '':>8}")
    for e in ests:
        lines.append(f"{e.method:<7}{e.trainable:>14,}{num(e.weights):>9}{num(e.gathered) if fsdp else '':>8}"
                     f"{num(e.grads):>8}{num(e.optimizer):>8}{num(e.activations):>8}{num(e.logits):>8}"
                     f"{num(e.total):>10}{num(e.host) if off else '':>8}")
    if off:
        lines.append("host: the offloaded shards, their gradients and AdamW state, a process (pinned memory)")
    lines.append(f"{unit}{' a GPU' if fsdp else ''}; peak = weights + {'gathered + ' if fsdp else ''}AdamW + "
                 "max(grads, activations + logits); not included: the framework "
                 "itself (~0.25 GiB CPU process + ~12 MiB at the first backward; ~0.5 GiB CUDA context)")
    return "\n".join(lines)


# ---------------------------------------------------------------- measuring the real thing
def status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"{key} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@torch.no_grad()
def resident_weights(model) -> int:
    """Read every parameter once, so lazily mapped weights are resident; -> their bytes (tied ones once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            p.sum()
            n += p.numel() * p.element_size()
    return n


def _build(spec: dict):
    """The model a measurement trains: random weights from config fields, or a base load_base knows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.models import load_base

    if not isinstance(spec["model"], dict):
        return load_base(spec["model"], dtype=spec["dtype"], device=spec["device"])[0]
    torch.manual_seed(0)
    with torch.device(spec["device"]):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec["model"]),
                                                 dtype=getattr(torch, spec["dtype"])).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def measure_in_child(spec: dict) -> dict:
    """In a fresh process: build the model, train `steps` real steps with lorakit's loop, report the peak:
    on CPU the peak resident set (VmHWM), on CUDA the allocator's peak."""
    import tempfile
    import types

    from lorakit.config import LoraConfig, TrainConfig
    from lorakit.train.data import Example
    from lorakit.train.loop import train

    torch.set_num_threads(int(spec.get("threads", 1)))
    cuda = spec["device"].startswith("cuda")
    model = _build(spec)
    if spec.get("checkpointing"):
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(0)
    examples = [Example(ids, list(ids)) for ids in torch.randint(
        3, model.config.vocab_size, (spec["batch"] * spec["steps"], spec["seq"]), generator=g).tolist()]
    lora = LoraConfig(r=spec["r"], alpha=2 * spec["r"], targets=spec["targets"])
    tcfg = TrainConfig(lr=1e-4, max_steps=spec["steps"], batch_size=spec["batch"], max_len=spec["seq"],
                       warmup_ratio=0.0, full=spec["method"] == "full")
    weights_mib = resident_weights(model) / 2 ** 20
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() / 2 ** 20
    elif reset_peak_rss():
        start = status_mib("VmRSS")
    else:
        raise ValueError("cannot reset the peak RSS (/proc/self/clear_refs); measuring needs Linux >= 4.0")
    with tempfile.TemporaryDirectory() as tmp:
        res = train(model, types.SimpleNamespace(pad_token_id=0), examples, tmp, lora, tcfg, progress=False,
                    save_final=False)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else status_mib("VmHWM")
    return {"weights_mib": weights_mib, "start_mib": start, "peak_mib": peak,
            "measured_mib": weights_mib + peak - start, "trainable": res.trainable, "seconds": res.seconds}


def measure(model, method: str, r: int = 16, batch: int = 8, seq: int = 128, targets="all-linear",
            steps: int = 2, threads: int = 1, device: str = "cpu", dtype: str = "float32",
            checkpointing: bool = False) -> dict:
    """Peak memory of `steps` real training steps, measured in a subprocess: the base weights' bytes (made
    resident first) plus the rise of the peak (CPU: VmHWM, the peak resident set, reset just before training;
    CUDA: the allocator's peak) over the memory in use at the start of training: the quantity the estimate
    predicts, without the framework itself. `model`: a name load_base knows, or a dict of config fields
    (model_type, vocab_size, ...) for a randomly initialised model."""
    spec = {"model": model, "method": method, "r": r, "batch": batch, "seq": seq, "targets": targets,
            "steps": steps, "threads": threads, "device": device, "dtype": dtype, "checkpointing": checkpointing}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           # fixed mmap threshold: big tensors go straight back to the OS when freed, so RSS tracks live memory
           "MALLOC_MMAP_THRESHOLD_": "131072"}
    code = "import json,sys; from lorakit.lab.estimate import measure_in_child; print(json.dumps(measure_in_child(json.loads(sys.argv[1]))))"
    out = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {method} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_targets(s: str):
    """CLI target spec: a preset (all-linear, attn, mlp, qv), a regex (has regex characters), or module names
    separated by ',' or '+'."""
    from lorakit.config import TARGET_PRESETS

    if s in TARGET_PRESETS or any(c in s for c in "*().|\\[?$^"):
        return s
    return [t.strip() for t in s.replace("+", ",").split(",") if t.strip()]

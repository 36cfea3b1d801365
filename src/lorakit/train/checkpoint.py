"""Training checkpoints: trainable tensors, optimizer state and RNG state in one safetensors file, written
atomically (a directory renamed into place), so a killed run resumes from its last whole checkpoint.

Under several processes every rank calls `save_checkpoint` (FSDP shards are gathered whole, a collective) and
only the writer (rank 0) writes; the file holds full tensors, so a run resumes on any number of processes:
`load_checkpoint` lays each tensor out as its parameter is (this rank's shard under FSDP)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorakit import faults
from lorakit.files import atomic_write_dir, recover
from lorakit.runs import CHECKPOINT
from lorakit.train.distributed import full, place

CKPT = CHECKPOINT


def save_checkpoint(out_dir: Path, step: int, state: dict, params: dict, opt: torch.optim.Optimizer,
                    write: bool = True) -> None:
    if not write and not any(hasattr(p, "full_tensor") for p in params.values()):
        return  # nothing to gather: only the writer has work
    tensors = {}
    for n, p in params.items():
        tensors[f"param.{n}"] = full(p).detach().cpu().contiguous()
        for k, v in opt.state.get(p, {}).items():
            tensors[f"opt.{n}.{k}"] = full(v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    if not write:
        return
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()

    def write_files(tmp: Path):
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        faults.point("checkpoint.written", step)  # whole in its temp folder, not yet in place

    atomic_write_dir(out_dir / CKPT, write_files, between=lambda: faults.point("checkpoint.swapped", step))


def load_checkpoint(out_dir: Path, params: dict, opt: torch.optim.Optimizer) -> dict:
    ck = out_dir / CKPT
    state = json.loads((ck / "state.json").read_text())
    tensors = load_file(str(ck / "state.safetensors"))
    with torch.no_grad():
        for n, p in params.items():
            key = f"param.{n}"
            if key not in tensors:
                raise ValueError(f"checkpoint {str(ck)!r} has no tensor for trainable parameter {n!r}")
            p.copy_(place(tensors[key], p))
            st = {k[len(f"opt.{n}."):]: (place(v, p) if v.dim() else v.to(p.device))
                  for k, v in tensors.items() if k.startswith(f"opt.{n}.")}
            if st:
                opt.state[p] = st
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state


def recover_run(out_dir: Path, main: bool, *names: str) -> None:
    """On the main process: put back a checkpoint whose replacement a kill cut between its two renames and remove
    the temp siblings of the checkpoint and of `names` (files of the run) left by writes that never finished."""
    if main:
        for name in (CKPT, *names):
            recover(Path(out_dir) / name)


def save_full_model(model, tok, out_dir: Path) -> None:
    """A fully fine-tuned model as a Hugging Face directory (weights + tokenizer), files replaced atomically."""
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        for f in Path(tmp).iterdir():
            os.replace(f, out_dir / f.name)

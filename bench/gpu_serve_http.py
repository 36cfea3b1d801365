"""bench/gpu_serve.py's api=http case: the same rows through the real server (serve/app.py's app under uvicorn in
this process, the static engine behind it, adapters from a registry) and the official `openai` client in a
separate process (AsyncOpenAI, one streaming completion per row, all at once), latencies taken by the client.

    python bench/gpu_serve_http.py client URL WORK.json     (what the case runs; prints one JSON object)
"""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEY = "sk-bench"


def word_tokenizer(vocab: int):
    """A real fast tokenizer with one word per id ('t0' ... ), so any generated id decodes (the server streams
    text as well as ids): the random-weight model has no tokenizer of its own."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", bos_token="t1", eos_token="t2",
                                   unk_token="t0")


def http_case(model, adapters, n: int, args, timeout: float = 540) -> tuple:
    """-> (t0, token times, engine info) as the client saw them, with the server's engine info."""
    from gpu_serve_lib import make_prompts, write_adapter

    from lorakit.adapters.peft_files import fingerprint
    from lorakit.adapters.registry import Registry
    from lorakit.config import ServeConfig
    from lorakit.serve.app import ServerThread, build_app, make_state

    tmp = Path(tempfile.mkdtemp(prefix="lorakit-http-"))
    reg = Registry(tmp / "reg.sqlite", base_fp=fingerprint(model), base_name="bench")
    server = state = None
    try:
        for i in range(n):
            reg.add(f"a{i}", write_adapter(adapters[i], tmp / "src" / f"a{i}"))
        cfg = ServeConfig(api_keys=[KEY], max_slots=max(1, n), max_batch=args.rows, max_prompt_tokens=args.prompt + 8,
                          max_new_tokens=args.new)
        state = make_state(model, word_tokenizer(model.config.vocab_size), reg, cfg, "bench",
                           max_prefill_tokens=args.chunk, static=True)
        server = ServerThread(build_app(state)).start()
        work = tmp / "work.json"
        work.write_text(json.dumps({"prompts": make_prompts(args.rows, args, model.config.vocab_size),
                                    "models": [f"a{i % n}" if n else "bench" for i in range(args.rows)],
                                    "new": args.new}))
        p = subprocess.run([sys.executable, __file__, "client", server.url, str(work)], capture_output=True,
                           text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"the client failed ({p.returncode}): {p.stderr[-2000:]}")
        got = json.loads(p.stdout.strip().splitlines()[-1])
        return got["t0"], got["times"], state.engine.info()
    finally:
        if server is not None:
            server.stop()
        if state is not None:
            state.engine.stop()
        reg.close()
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- the client (its own process)
async def one(client, model: str, prompt: list[int], new: int) -> list[float]:
    times = []
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=new, temperature=0, stream=True,
                                             extra_body={"ignore_eos": True, "return_token_ids": True})
    async for chunk in stream:
        if chunk.choices:
            ids = (chunk.choices[0].model_extra or {}).get("token_ids") or []
            now = time.perf_counter()
            times += [now] * len(ids)
    return times


async def passes(url: str, work: dict) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=600)
    prompts, models, new = work["prompts"], work["models"], work["new"]

    async def run(k: int):
        t0 = time.perf_counter()
        times = await asyncio.gather(*(one(client, models[i], prompts[i], new) for i in range(k)))
        bad = sorted({len(t) for t in times} - {new})
        if bad:
            raise RuntimeError(f"requests yielded {bad} tokens, not {new}")
        return t0, times
    await run(min(4, len(prompts)))  # warm-up, as the engine cases: graphs for small buckets
    await run(len(prompts))  # and the full one
    t0, times = await run(len(prompts))
    await client.close()
    return {"t0": t0, "times": times}


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "client":
    print(json.dumps(asyncio.run(passes(sys.argv[2], json.loads(Path(sys.argv[3]).read_text())))))

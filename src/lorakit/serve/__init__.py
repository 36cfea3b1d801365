"""OpenAI-compatible multi-adapter serving: app (FastAPI routes, auth, limits), protocol (request parsing, response
shapes), request (a queued generation or score), resolve (model names -> adapters, stacks, mixtures), engine
(continuous batching on one thread) with residency (which adapters are resident, prefetched files, pins) and rows
(a running row, what a step's logits do to it), sampler (next tokens on the device), stops (stop strings), slots
(the adapters' slot bank), forward (the decode step over a row-controlled KV cache), fast and decoder (the
static-cache engine: a KV cache allocated once, CUDA graphs), score (per-token KL to the base), follow (a replica
following a shared registry), runtime (threads, uvicorn in a thread).

Elsewhere: the registry is lorakit.adapters.registry, the dashboard that the app mounts at / is lorakit.ui, the
command lines (`lorakit serve`, `lorakit adapters`) are lorakit.cli.serve. Heavy modules (torch, fastapi) are
imported by the submodules, not here."""

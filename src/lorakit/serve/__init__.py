"""OpenAI-compatible multi-adapter serving: app (FastAPI routes, auth, limits), protocol (request parsing, response
shapes), request (a queued generation or score), resolve (model names -> adapters, stacks, mixtures), engine
(continuous batching on one thread), slots (resident adapters, LRU), forward (the decode step over a row-controlled
KV cache), score (per-token KL to the base), runtime (what a running server holds).

Elsewhere: the registry is lorakit.adapters.registry, the dashboard that the app mounts at / is lorakit.ui, the
command lines (`lorakit serve`, `lorakit adapters`) are lorakit.cli.serve. Heavy modules (torch, fastapi) are
imported by the submodules, not here."""

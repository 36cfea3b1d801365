"""OpenAI-compatible multi-adapter serving: registry (SQLite), slots (resident adapters, LRU),
forward (decoder loop over a row-controlled KV cache), engine (continuous batching thread),
protocol (request parsing / response shapes), app (FastAPI routes), cli (`lorakit serve`, `lorakit adapters`).

Heavy modules (torch, fastapi) are imported by the submodules, not here."""

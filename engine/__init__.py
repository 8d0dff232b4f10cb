"""TRACE's CPU development engine: SGLang's native /generate subset on transformers, with a radix prefix cache.

Not SGLang: for tests, the CPU demo and machines without a GPU. The process is `trace-engine serve`. Modules, from
the outside in (each module docstring states its contract):
- `cli`: `cli.main` is `trace-engine serve`; parses flags into the app's and the engine's configs.
- `app`: `app.init_app` serves an `Engine` over HTTP (aiohttp); one worker thread owns the engine.
- `engine`: the facade others import: `Engine`, `EngineConfig`, `EngineRequest`, `BadRequest`, `ENGINE_NAME`,
  `DTYPES`. `Engine` loads the model and tokenizer, validates requests, updates weights, reports `server_info`.
- `scheduler`: `Engine`'s base class: continuous batching (admit, prefill, one batched decode step, retire),
  finish checks (length / EOS / stop ids / stop strings) and building the `/generate` responses.
- `radix_cache`: the token-level radix tree of per-layer K/V that serves cached prompt prefixes (LRU eviction).
- `kv_buffer`: the preallocated, doubling per-layer KV buffers the model writes into during prefill and decode.
- `sampling`: SGLang's sampling (greedy, temperature, top-k, top-p, min-p) and the logprob it reports.
"""

from shared.cpu_threads import passive_openmp_waits

passive_openmp_waits()  # before any module of this package imports torch: OpenMP reads the policy once, at load

"""Env server costs through HTTP: steps/s and forks/s, latency, search latency, fork time vs history length, memory.

Everything runs against real servers in child processes (`python -m env_server serve`, synthetic world), driven by one
aiohttp client session in this process with MessagePack bodies, as the trainer's client sends them:

- steps/s and forks/s, three ways: sequential single calls (1 in flight), concurrent single calls (`--concurrency` in
  flight) and `/v1/batch` (`--batch` ops a call, one call in flight); client-side p50/p99 latency per call. A step is a
  `<search> ... </search>` action, so it includes a search: a real BM25 search, or an answer from the server's search
  cache when it has seen the query before.
- the query stream, which decides the cache's hit rate: the oracle search strings of the synthetic world's dev and
  train questions in order, 3400 strings of which only 299 are distinct (mostly entity names), cycled; each phase goes
  on where the last one stopped. A round makes 4484 step searches per server (500 sequential, 2000 concurrent, 31
  batches of 64), 7 rounds 31388, so once the 299 distinct queries have been searched every search is a cache hit:
  the cache-on server's hit rate over the default run is ~99%. That is far more repetition than a training run's
  (a GRPO group or a tree repeats a prompt's searches, different prompts mostly do not): the cache-off server is the
  measure of a step that searches.
- two env servers, measured side by side (`--search-cache both`, the default): cache_on (the server's default,
  `--search-cache` 16384 entries) and cache_off (`--search-cache 0`); `--search-cache on|off` runs one of them.
  Each reports the hit rate it saw (`trace_env_search_cache_total` from /metrics).
- baseline: a bare aiohttp handler (reads the body, answers a fixed MessagePack map) in its own child process, driven
  by the same client the same way; `vs bare` = env calls/s / bare calls/s, the share of the framework's ceiling.
- rounds: bare sequential, each server's sequential steps, bare concurrent, each server's concurrent steps, each
  server's batches, run back to back `--rounds` times on fresh episodes, so that each ratio compares calls made within
  seconds of each other on a machine whose load drifts (the two servers take turns going first and search the same
  query sequence); the table shows medians over the rounds. Forks run once, after the rounds, on the first server.
- issue 14's goals, per server, printed with pass/FAIL and written to the JSON (`throughput.variants.<server>.goals`):
  the median over rounds of step_sequential / bare_sequential (>= 0.6), step_concurrent / bare_concurrent (>= 0.6)
  and step_batch ops/s / step_sequential ops/s (>= 10), with each round's ratio; and the ceiling the search alone
  puts on batched steps that search.
- search: each server's `trace_env_search_seconds` histogram (mean; p50/p99 interpolated in its buckets; a search
  call's latency, cache hits and waits for the loop's next turn included), where its searches ran
  (`trace_env_searches_total`: inline on the event loop or in threads, `--search-inline`), and a direct in-process
  `TantivyRetriever.search_sync` over the same index (p50/p99).
- fork cost vs history length: one episode at turn 1 and one at turn 50 (`--max-turns 64` server), forked alternately
  `--fork-reps` times each; median latency of each and their ratio (O(1) fork: ~1). Also `EpisodeStore.spawn` timed
  in-process on 1- and 50-turn node chains.
- bytes per live episode: RSS of a fresh server (the first of the two) before and after `--episodes` episodes are
  created and stepped 3 times each (searches, so each holds 4 state nodes with their observations), divided by the
  episode count.

    python bench/bench_env.py                        # defaults: both servers, 7 rounds, 2000 steps at 32 in flight
    python bench/bench_env.py --search-cache off     # only the server with its search cache off
    python bench/bench_env.py --search-inline never  # the server's searches in its threads, as before issue 14
    python bench/bench_env.py --rounds 3 --steps 500 --episodes 1000 --out runs/bench_env.json   # quicker

Measured 2026-12-02 13:05 with `python bench/bench_env.py` (the defaults) at commit 7bb5a81 (a batched step's server
CPU cut ~95 -> ~60 us with a cache hit), 2 CPU cores shared with another engineer's test run (load average 1.5 when it
started, after waiting for it to fall under 1.5; 2.7 at the end):

                                 calls/s     ops/s   p50 ms   p99 ms  vs bare
    bare_sequential                 1340      1340     0.71     1.81
    bare_concurrent                 1459      1459    20.26    35.87
    step_sequential (cache_on)      1108      1108     0.90     1.47     0.84
    step_concurrent (cache_on)       995       995    30.77    63.35     0.77
    step_batch (cache_on)            134      8591     6.90    25.86
    step_sequential (cache_off)      717       717     1.18     5.10     0.61
    step_concurrent (cache_off)      621       621    46.73   104.34     0.47
    step_batch (cache_off)            54      3457    17.03    35.64
    fork_sequential (cache_on)       202       202     5.13    11.88     0.15
    fork_concurrent (cache_on)       728       728    41.12    98.49     0.50
    fork_batch (cache_on)            150      9589     7.84    11.92
    direct search_sync: p50 0.105 ms, p99 0.268 ms
    cache_on: hit rate 99.0% (31088 hits, 300 misses, 299 entries); searched inline 268, in threads 32;
      search calls, server histogram: mean 0.026 ms (p50/p99 ~0.10/~0.23 ms, interpolated in 0.2 ms buckets)
      step_sequential / bare_sequential    0.84  goal >= 0.6  pass  (rounds: 0.63 1.00 0.81 0.66 0.95 0.85 0.84)
      step_concurrent / bare_concurrent    0.77  goal >= 0.6  pass  (rounds: 0.77 0.85 0.60 0.63 0.78 0.68 0.84)
      step_batch / step_sequential         8.25  goal >= 10   FAIL  (rounds: 10.41 9.44 5.49 8.25 14.60 7.99 7.52)
    cache_off: searched inline 31356, in threads 32;
      search calls, server histogram: mean 13.982 ms, p50 ~0.371 ms, p99 ~89.799 ms
      step_sequential / bare_sequential    0.61  goal >= 0.6  pass  (rounds: 0.50 0.61 0.34 0.61 1.08 0.62 0.58)
      step_concurrent / bare_concurrent    0.47  goal >= 0.6  FAIL  (rounds: 0.50 0.40 0.36 0.47 0.54 0.45 0.48)
      step_batch / step_sequential         4.82  goal >= 10   FAIL  (rounds: 4.82 5.07 6.97 4.34 5.69 4.04 4.01)
    issue 14 goals met: cache_on 2/3, cache_off 1/3
    fork via HTTP: turn 1 2.715 ms, turn 50 2.623 ms, ratio 0.97; EpisodeStore.spawn: 5.09 / 5.14 us, ratio 1.01
    memory (cache on): 10000 episodes x 3 search steps (40050 snapshots): RSS 61 -> 114 MB, 5548 bytes per episode

(The fork rows ran last, as the load rose to 2.7: 202 sequential forks/s against ~1400 in the run below is the
machine, not the server; fork time still does not depend on history length.)

Reading: the batch goal is still met by neither server: 8.3x with the cache (6.5x before 7bb5a81; two of the seven
rounds passed 10x), 4.8x without (4.5x). Where a batched step's server CPU went, in-process (`EnvService.batch` of 64
search steps on episodes of one server, the request decoded and the answer encoded as MessagePack, no HTTP; 600
batches after a warm-up, `time.process_time`, gc frozen as the server does; py-spy for the shares): with a cache hit
~95 us before 7bb5a81, ~60 us after. The cut: the cache's query analysis (two tantivy analyzer calls, a fifth of the
step) is remembered per query string; `os.urandom` ids, the per-snapshot `asyncio.Lock`, `to_builtins` and a dict
merge per batch answer, a Prometheus inc per step and a few clock reads are gone. What is left is spread thin: the
step's own bookkeeping (~10%), the tool call and action parsing (~12%), the observation's formatting (~10%), the
cache look-up (~7%), the state node and its snapshot (~10%), the search histogram (~5%), the answer's encoding (~4%).
Without the cache a step costs ~210 us, ~120 us of it the BM25 search itself, which no change here touches.

The floor, so why 10x is out of reach here: 10x the sequential rate (~1100 steps/s) is ~11000 ops/s, ~90 us of wall
time per batched op, and with one batch in flight the server's ~60 us and the client's own work per op (building the
64 ops, encoding them, decoding a ~43 KB answer: ~15-20 us) run one after the other on the same 2 cores, so a quiet
machine gives ~8-9x and a loaded one less; 10x needs the client elsewhere or a batched step under ~70 us in all.
Without the cache the search alone (~105 us direct p50, more between other work) puts the floor near ~165 us an op,
~6000 ops/s, ~8x of its ~720 steps/s at best.

Earlier run, before 7bb5a81:
Measured 2026-12-02 12:50 with `python bench/bench_env.py` (the defaults) at commit 975e7f7, 2 CPU cores shared with
other agents' work (load average 1.4 when it started, after waiting for it to fall under 1.5; 2.4 at the end):

                                 calls/s     ops/s   p50 ms   p99 ms  vs bare
    bare_sequential                 1503      1503     0.64     1.03
    bare_concurrent                 1722      1722    18.26    33.40
    step_sequential (cache_on)      1125      1125     0.89     1.84     0.72
    step_concurrent (cache_on)      1121      1121    27.70    46.23     0.68
    step_batch (cache_on)            112      7169     8.64    12.74
    step_sequential (cache_off)      907       907     1.01     2.09     0.58
    step_concurrent (cache_off)      840       840    36.59    64.95     0.50
    step_batch (cache_off)            63      4000    16.20    31.85
    fork_sequential (cache_on)      1413      1413     0.61     2.25     0.94
    fork_concurrent (cache_on)      1152      1152    27.05    56.04     0.67
    fork_batch (cache_on)            349     22365     2.67     5.26
    direct search_sync: p50 0.093 ms, p99 0.183 ms
    cache_on: hit rate 99.0% (31089 hits, 299 misses, 299 entries); searched inline 267, in threads 32;
      search calls, server histogram: mean 0.057 ms (p50/p99 ~0.10/~0.36 ms, interpolated in 0.2 ms buckets)
      step_sequential / bare_sequential    0.72  goal >= 0.6  pass  (rounds: 0.54 0.85 0.72 0.66 0.80 0.59 0.81)
      step_concurrent / bare_concurrent    0.68  goal >= 0.6  pass  (rounds: 0.63 0.61 0.87 0.68 0.71 0.68 0.74)
      step_batch / step_sequential         6.54  goal >= 10   FAIL  (rounds: 9.09 6.14 6.37 6.54 5.79 8.54 7.81)
    cache_off: searched inline 31356, in threads 32;
      search calls, server histogram: mean 9.252 ms, p50 ~0.235 ms, p99 ~49.438 ms
      step_sequential / bare_sequential    0.58  goal >= 0.6  FAIL  (rounds: 0.56 0.82 0.52 0.60 0.62 0.58 0.53)
      step_concurrent / bare_concurrent    0.50  goal >= 0.6  FAIL  (rounds: 0.50 0.49 0.51 0.50 0.52 0.53 0.35)
      step_batch / step_sequential         4.48  goal >= 10   FAIL  (rounds: 4.56 3.31 5.28 3.99 4.48 4.10 5.42)
    issue 14 goals met: cache_on 2/3, cache_off 0/3; met only with the search cache on, at this query stream's hit
      rate: sequential_vs_bare, concurrent_vs_bare
    fork via HTTP: turn 1 0.543 ms, turn 50 0.534 ms, ratio 0.98; EpisodeStore.spawn: 5.34 / 5.25 us, ratio 0.98
    memory (cache on): 10000 episodes x 3 search steps (40050 snapshots): RSS 61 -> 118 MB, 5998 bytes per episode

Reading: with the cache answering 99% of the searches, a search step meets the 0.6 goal sequentially and at 32 in
flight; without it (every step searches) it meets neither in this run (0.58 and 0.50; the sequential ratio was
0.60-0.68 in earlier runs). So the two 0.6 goals are met only with the cache, at a hit rate a training run will not
see (its hit rate is the share of searches that repeat one seen before: a GRPO group's or a tree's, not this
stream's 299 queries cycled). The batch goal is met by neither: 6.5x with the cache, 4.5x without. A cached batched
step costs ~82 us of CPU in-process (`EnvService.batch` of 64 steps and the answer's encoding, no HTTP; ~207 us
without the cache; a throwaway script: 200 batches after a warm-up, `time.process_time`, gc frozen as the server
does), so the search is no longer what a batched step spends: the rest of a step (the tool call, the
observation's formatting, the state node and snapshot, the metrics) and, through HTTP, the client's own encoding of
64 ops on the same 2 cores keep it under 10x.

Earlier figures (before the search cache; the bench then ran one server and called each query "a different one"):
Measured 2026-12-02 12:21 with `python bench/bench_env.py` (the defaults) at commit 96239e4, 2 CPU cores shared with
other agents' test runs (load average 3.3 -> 4.1 during the run; rates drift by 2x between runs, ratios less):

                             calls/s     ops/s   p50 ms   p99 ms  vs bare
    bare_sequential             1732      1732     0.54     0.94
    bare_concurrent             2242      2242    14.06    23.57
    step_sequential             1158      1158     0.87     1.19     0.68
    step_concurrent             1238      1238    24.41    42.82     0.53
    step_batch                    81      5158    11.85    19.26
    fork_sequential             1367      1367     0.72     1.08     0.79
    fork_concurrent             1873      1873    16.94    29.24     0.84
    fork_batch                   808     51703     1.17     1.90
    search, server histogram: n=31388 mean 4.343 ms, p50 ~0.183 ms, p99 ~38.771 ms; searched inline 31356, in
      threads 32 (auto times its first 32 searches in the threads); direct search_sync: p50 0.104 ms, p99 0.219 ms
    issue 14 goals, medians over 7 rounds (2000 calls at 32 in flight, 500 sequential, 31 batches of 64 a round):
      step_sequential / bare_sequential      0.68  goal >= 0.6  pass  (rounds: 0.67 0.72 0.68 0.68 0.70 0.61 0.59)
      step_concurrent / bare_concurrent      0.53  goal >= 0.6  FAIL  (rounds: 0.57 0.51 0.48 0.68 0.53 0.39 0.67)
      step_batch / step_sequential           4.43  goal >= 10   FAIL  (rounds: 4.50 4.08 4.43 4.77 4.16 4.02 4.59)
      one core's ceiling for batched search steps, from the search alone (1 / direct p50): 9624 ops/s; 10x
      step_sequential is 11583 ops/s
    fork via HTTP: turn 1 0.503 ms, turn 50 0.505 ms, ratio 1.00; EpisodeStore.spawn: 3.33 / 3.17 us, ratio 0.95
    memory: 10000 episodes x 3 search steps (40050 snapshots): RSS 61 -> 118 MB, 6035 bytes per live episode

The same command, alternated with it (load 0.8 -> 4.6), over the server as it was before issue 14's step work
(commit 85fabe6: searches in the thread pool, one hop each) and again over 96239e4:

                                       85fabe6 (2 runs)  96239e4 (2 runs)
    step_sequential / bare_sequential   0.43  0.39        0.68  0.60
    step_concurrent / bare_concurrent   0.41  0.42        0.53  0.52
    step_batch / step_sequential        2.21  3.03        4.43  4.39
    step ops/s: sequential               622   541        1158   807
                32 in flight             771   755        1238   816
                batch of 64             1432  1459        5158  3700
    search, server histogram mean     18.1  17.8 ms     4.3  10.6 ms (p50 16 ms before, 0.18-0.32 ms after)

On a quieter machine (load ~1.1-1.3, `--steps 1000`, two runs of 96239e4's parent ae7734f): sequential 0.64 and
0.74, concurrent 0.61 and 0.53, batch 4.48 and 3.86; 85fabe6 then: 0.39 and 0.46, 0.23 and 0.24, 3.44 and 2.24.

Reading: searching inline took the thread hop and the GIL hand-offs out of a step (server search histogram: p50 ~16
ms before, ~0.2 ms after; the mean is now the wait of a search for the loop's next turn while 32 steps or a batch
are in flight). A sequential step costs ~1.5 bare round trips (was ~2.5) and meets the 0.6 goal; at 32 in flight a
step is ~0.5 of the bare handler, at or just under the goal depending on the run (at 32 in flight the bare handler
answers only ~1.3x its sequential rate, so the one client process is likely its limit; the env server's is its own
CPU). The batch goal is out of reach on this machine:
a batched step costs ~190-250 us of server CPU, ~100-120 us of it the search itself (its direct p50 is ~0.1 ms;
slower still between other work, measured in-process: 120 us inside a step vs 68 us in a tight loop), while 10x
the sequential rate needs ~90 us a step; search threads cannot add the second core (the GIL: two threads searched
at 7.5k/s vs 13k/s for one). Batching still gives ~4.4x the sequential ops/s and ~3x the concurrent ones. Fork time
does not depend on history length (HTTP and in-process ratios ~1.0). A live episode with 3 searched turns costs ~6 KB,
most of it the three observations (~3 passages each) and the info dicts of its 4 state nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import psutil

REPO = Path(__file__).resolve().parents[1]
MSGPACK = "application/msgpack"
_LISTENING = re.compile(r"listening on (http://\S+)")

BARE_SERVER = """
import asyncio
from aiohttp import web

async def echo(request):
    await request.read()
    return web.Response(body=b"\\x81\\xa2ok\\xc3", content_type="application/msgpack")

async def main():
    app = web.Application()
    app.router.add_post("/echo", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(f"bare server listening on http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


# ---------------------------------------------------------------------------------------------- processes
def start(cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start a server child process; return it and its URL once it prints its listening line."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})}
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        m = _LISTENING.search(line)
        if m:
            return proc, m.group(1)
    raise RuntimeError(f"{cmd} exited with {proc.wait()} before listening")


def env_server(cache_dir: str, *extra: str) -> tuple[subprocess.Popen[str], str]:
    args = ["--port", "0", "--log-level", "warning", "--cache-dir", cache_dir, *extra]
    return start([sys.executable, "-m", "env_server", "serve", *args])


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------- client
class Http:
    """One keep-alive session; MessagePack in and out; raises on any error status."""

    def __init__(self, url: str, limit: int) -> None:
        self.url = url
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit))
        self.headers = {"Content-Type": MSGPACK, "Accept": MSGPACK}

    async def post(self, path: str, body: Any) -> Any:
        async with self.session.post(self.url + path, data=msgspec.msgpack.encode(body), headers=self.headers) as r:
            payload = await r.read()
            if r.status != 200:
                raise RuntimeError(f"POST {path} -> {r.status}: {payload[:300]!r}")
            return msgspec.msgpack.decode(payload)

    async def get_text(self, path: str) -> str:
        async with self.session.get(self.url + path) as r:
            return await r.text()

    async def close(self) -> None:
        await self.session.close()


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def drive(n: int, concurrency: int, call: Callable[[int], Any]) -> dict[str, float]:
    """Run call(0..n-1) with `concurrency` in flight; calls/s and p50/p99 latency (ms)."""
    lat: list[float] = []
    nxt = 0

    async def worker() -> None:
        nonlocal nxt
        while nxt < n:
            i = nxt
            nxt += 1
            t0 = time.perf_counter()
            await call(i)
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"calls": n, "per_s": n / wall, "p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3}


# ---------------------------------------------------------------------------------------------- benches
async def create_many(http: Http, n: int, **fields: Any) -> list[str]:
    ids: list[str] = []
    for s in range(0, n, 500):
        ops = [{"op": "create", **fields} for _ in range(min(500, n - s))]
        ids += [r["episode_id"] for r in (await http.post("/v1/batch", {"ops": ops}))["results"]]
    return ids


GOALS: dict[str, tuple[str, str, float]] = {
    # name: (numerator, denominator, goal) -- issue 14: "a search step at >= 0.6x the bare handler, sequential and
    # at 32 in flight, and /v1/batch of 64 search steps at >= 10x the sequential step rate"
    "sequential_vs_bare": ("step_sequential", "bare_sequential", 0.6),
    "concurrent_vs_bare": ("step_concurrent", "bare_concurrent", 0.6),
    "batch_vs_sequential": ("step_batch", "step_sequential", 10.0),
}
"""Issue 14's three ratios, each over ops/s measured in the same round (a bare phase is shared by the variants)."""

VARIANTS: dict[str, list[str]] = {"cache_on": [], "cache_off": ["--search-cache", "0"]}
"""The env servers compared: its default (the search cache on) and `--search-cache 0`."""

STEP_PHASES = ("step_sequential", "step_concurrent", "step_batch")


async def bench_throughput(
    urls: dict[str, str], bare_url: str, queries: list[str], a: argparse.Namespace
) -> dict[str, Any]:
    """`a.rounds` rounds of the phases back to back: bare sequential, each variant's sequential steps, bare
    concurrent, each variant's concurrent steps, each variant's batches (bare and env alternate, so a ratio compares
    calls made within seconds of each other on a machine whose load drifts; the variants take turns going first, and
    search the same query sequence). Then forks once, on the first variant's server. Rates: medians over rounds."""
    https = {v: Http(u, a.concurrency) for v, u in urls.items()}
    bare = Http(bare_url, a.concurrency)
    out: dict[str, Any] = {"variants": {}}
    seq_n = max(100, a.steps // 4)
    nb = max(4, a.steps // a.batch)
    turn = 0  # rolling offset into the query stream: each phase goes on where the last one stopped

    def step_call(http: Http, pool: list[str], first: int) -> Callable[[int], Any]:
        return lambda i: http.post(
            f"/v1/episodes/{pool[i % len(pool)]}/step",
            {"action": f"<search> {queries[(first + i) % len(queries)]} </search>"},
        )

    def step_batch(http: Http, pool: list[str], first: int) -> Callable[[int], Any]:
        def call(i: int) -> Any:
            ops = [
                {
                    "op": "step",
                    "episode_id": pool[(i * a.batch + j) % len(pool)],
                    "action": f"<search> {queries[(first + i * a.batch + j) % len(queries)]} </search>",
                }
                for j in range(a.batch)
            ]
            return http.post("/v1/batch", {"ops": ops})

        return call

    rounds: list[dict[str, dict[str, float]]] = []
    try:
        for k in range(a.rounds):
            order = list(urls) if k % 2 == 0 else list(reversed(urls))
            # Fresh episodes each round, 40 steps each at most (the server's max_turns is 64).
            n_seq, n_conc, n_batch = (max(4 * a.concurrency, n // 40 + 1) for n in (seq_n, a.steps, nb * a.batch))
            eps = {
                v: await create_many(
                    https[v], n_seq + n_conc + n_batch, question="Which company published it?", answers=["x"]
                )
                for v in order
            }
            r: dict[str, dict[str, float]] = {}
            r["bare_sequential"] = await drive(seq_n, 1, lambda i: bare.post("/echo", {"x": i}))
            for v in order:
                r[f"{v}/step_sequential"] = await drive(seq_n, 1, step_call(https[v], eps[v][:n_seq], turn))
            turn += seq_n
            r["bare_concurrent"] = await drive(a.steps, a.concurrency, lambda i: bare.post("/echo", {"x": i}))
            for v in order:
                pool = eps[v][n_seq : n_seq + n_conc]
                r[f"{v}/step_concurrent"] = await drive(a.steps, a.concurrency, step_call(https[v], pool, turn))
            turn += a.steps
            for v in order:
                b = await drive(nb, 1, step_batch(https[v], eps[v][n_seq + n_conc :], turn))
                r[f"{v}/step_batch"] = {**b, "ops_per_s": b["per_s"] * a.batch, "ops_per_call": a.batch}
            turn += nb * a.batch
            for x in r.values():
                x.setdefault("ops_per_s", x["per_s"])
            rounds.append(r)

        def medians(key: str) -> dict[str, float]:
            m = {s: statistics.median(r[key][s] for r in rounds) for s in ("per_s", "ops_per_s", "p50_ms", "p99_ms")}
            return {**m, "calls_per_round": rounds[0][key]["calls"]}

        out["bare_sequential"], out["bare_concurrent"] = medians("bare_sequential"), medians("bare_concurrent")
        for v, http in https.items():
            res: dict[str, Any] = {key: medians(f"{v}/{key}") for key in STEP_PHASES}
            res["step_batch"]["ops_per_call"] = a.batch
            res["goals"] = {}
            for name, (num, den, goal) in GOALS.items():
                num_key, den_key = (x if x.startswith("bare") else f"{v}/{x}" for x in (num, den))
                per_round = [r[num_key]["ops_per_s"] / r[den_key]["ops_per_s"] for r in rounds]
                ratio = statistics.median(per_round)
                res["goals"][name] = {
                    "ratio": ratio,
                    "goal": goal,
                    "pass": ratio >= goal,
                    "per_round": per_round,
                    "what": f"{num} ops/s / {den} ops/s",
                }
            for kind in ("sequential", "concurrent"):
                res[f"step_{kind}"]["vs_bare"] = res["goals"][f"{kind}_vs_bare"]["ratio"]
            metrics = await http.get_text("/metrics")
            res["server_search"] = search_histogram(metrics)
            res["searched"] = {w: metric(metrics, "trace_env_searches_total", where=w) for w in ("inline", "thread")}
            hit, miss = (metric(metrics, "trace_env_search_cache_total", result=x) for x in ("hit", "miss"))
            res["cache"] = {
                "hit": hit,
                "miss": miss,
                "hit_rate": hit / (hit + miss) if hit + miss else 0.0,
                "entries": metric(metrics, "trace_env_search_cache_entries"),
            }
            out["variants"][v] = res

        http = https[next(iter(urls))]
        eps = await create_many(http, 1, question="Which company published it?", answers=["x"])
        parent = eps[0]
        fork_one = lambda i: http.post(f"/v1/episodes/{parent}/fork", {"n": 1})  # noqa: E731
        out["fork_sequential"] = await drive(seq_n, 1, fork_one)
        out["fork_concurrent"] = await drive(a.steps, a.concurrency, fork_one)
        fork_ops = {"ops": [{"op": "fork", "episode_id": parent, "n": 1}] * a.batch}
        f = await drive(nb, 1, lambda i: http.post("/v1/batch", fork_ops))
        out["fork_batch"] = {**f, "ops_per_s": f["per_s"] * a.batch, "ops_per_call": a.batch}
        for kind in ("sequential", "concurrent"):
            out[f"fork_{kind}"]["vs_bare"] = out[f"fork_{kind}"]["per_s"] / out[f"bare_{kind}"]["per_s"]
    finally:
        for http in https.values():
            await http.close()
        await bare.close()
    return out


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text; nan when absent (an older server)."""
    sel = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    m = re.search(rf"^{re.escape(name + sel)} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else float("nan")


def search_histogram(text: str) -> dict[str, float]:
    """Mean and bucket-interpolated p50/p99 (ms) of trace_env_search_seconds from Prometheus text."""
    buckets: list[tuple[float, float]] = []
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("trace_env_search_seconds_bucket"):
            le = re.search(r'le="([^"]+)"', line).group(1)  # type: ignore[union-attr]
            buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
        elif line.startswith("trace_env_search_seconds_sum"):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith("trace_env_search_seconds_count"):
            count = float(line.rsplit(" ", 1)[1])

    def quantile(q: float) -> float:
        target, lo, prev = q * count, 0.0, 0.0
        for le, c in buckets:
            if c >= target:
                if le == float("inf"):
                    return lo
                return lo + (le - lo) * (target - prev) / max(c - prev, 1e-12)
            lo, prev = le, c
        return lo

    return {
        "count": count,
        "mean_ms": total / max(count, 1) * 1e3,
        "p50_ms": quantile(0.5) * 1e3,
        "p99_ms": quantile(0.99) * 1e3,
    }


def direct_search(index_dir: Path, queries: list[str]) -> dict[str, float]:
    from env_server.retrieval import TantivyRetriever

    r = TantivyRetriever(index_dir)
    for q in queries[:50]:
        r.search_sync(q, 3)
    lat = []
    for q in queries:
        t0 = time.perf_counter()
        r.search_sync(q, 3)
        lat.append(time.perf_counter() - t0)
    return {"queries": len(queries), "p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3}


async def bench_fork_vs_history(url: str, reps: int) -> dict[str, float]:
    http = Http(url, 1)
    try:
        short, long = await create_many(http, 2, question="q?", answers=["a"])
        await http.post(f"/v1/episodes/{short}/step", {"action": "<search> Fozan Editions </search>"})
        ops = [{"op": "step", "episode_id": long, "action": "<search> Fozan Editions </search>"}] * 50
        res = (await http.post("/v1/batch", {"ops": ops}))["results"]
        assert res[-1]["turn"] == 50, res[-1]
        lat: dict[str, list[float]] = {short: [], long: []}
        for _ in range(reps):
            for eid in (short, long):
                t0 = time.perf_counter()
                await http.post(f"/v1/episodes/{eid}/fork", {"n": 1})
                lat[eid].append(time.perf_counter() - t0)
    finally:
        await http.close()
    m1, m50 = statistics.median(lat[short]) * 1e3, statistics.median(lat[long]) * 1e3
    return {"turn1_ms": m1, "turn50_ms": m50, "ratio_50_over_1": m50 / m1, **spawn_in_process(reps * 20)}


def spawn_in_process(reps: int) -> dict[str, float]:
    """EpisodeStore.spawn on 1- and 50-turn chains, no HTTP: microseconds per fork."""
    from env_server.episodes import EpisodeStore, StateNode
    from shared.wire import TaskRecord, TurnRecord

    task = TaskRecord(question="q", golden_answers=["a"], max_turns=64)
    rec = TurnRecord("<search> x </search>", "obs " * 100, 0.0, False, False, {})
    nodes = {}
    node = StateNode(None, task, 0, None)
    for t in range(1, 51):
        node = StateNode(node, task, t, rec)
        nodes[t] = node
    best = {1: float("inf"), 50: float("inf")}
    for _ in range(5):  # alternate, each on a fresh store (a growing dict would bias whichever runs second)
        for t in (1, 50):
            store = EpisodeStore(max_episodes=10**9, max_snapshots=10**9, ttl_s=3600)
            t0 = time.perf_counter()
            for _ in range(reps):
                store.spawn(nodes[t], 1)
            best[t] = min(best[t], (time.perf_counter() - t0) / reps)
    out = {f"spawn_turn{t}_us": best[t] * 1e6 for t in (1, 50)}
    out["spawn_ratio_50_over_1"] = out["spawn_turn50_us"] / out["spawn_turn1_us"]
    return out


async def bench_memory(url: str, pid: int, n: int, queries: list[str]) -> dict[str, float]:
    http = Http(url, 1)
    proc = psutil.Process(pid)
    try:
        await create_many(http, 50, question="warm-up?", answers=["a"])  # first-use allocations out of the delta
        rss0 = proc.memory_info().rss
        ids = await create_many(http, n, question="Which company published it?", answers=["Nobody"])
        for turn in range(3):
            for s in range(0, n, 500):
                ops = [
                    {
                        "op": "step",
                        "episode_id": e,
                        "action": f"<search> {queries[(s + j + turn) % len(queries)]} </search>",
                    }
                    for j, e in enumerate(ids[s : s + 500])
                ]
                await http.post("/v1/batch", {"ops": ops})
        rss1 = proc.memory_info().rss
        health = json.loads(await http.get_text("/health"))
    finally:
        await http.close()
    return {
        "episodes": n,
        "snapshots": health["snapshots"],
        "rss_before_mb": rss0 / 2**20,
        "rss_after_mb": rss1 / 2**20,
        "bytes_per_episode": (rss1 - rss0) / n,
    }


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000, help="calls per concurrent measurement (a round)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of bare/step measurements (ratios: medians)")
    ap.add_argument("--concurrency", type=int, default=32, help="calls in flight for the concurrent measurements")
    ap.add_argument("--batch", type=int, default=64, help="ops per /v1/batch call")
    ap.add_argument("--fork-reps", type=int, default=300, help="forks at each history length")
    ap.add_argument("--episodes", type=int, default=10_000, help="live episodes for the memory measurement")
    ap.add_argument("--cache-dir", default=None, help="TRACE cache (synthetic world); default: a fresh temp folder")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    ap.add_argument(
        "--search-inline", default=None, choices=("auto", "always", "never"), help="the env server's (default: its own)"
    )
    ap.add_argument(
        "--search-cache",
        default="both",
        choices=("both", "on", "off"),
        help="the env server's search cache: on (its default size), off (--search-cache 0), or both servers, "
        "measured side by side (default)",
    )
    a = ap.parse_args(argv)

    from env_server.config import BUILTIN_WORLD
    from env_server.datasets import read_questions

    cache = a.cache_dir or tempfile.mkdtemp(prefix="trace-bench-")
    rows = read_questions(BUILTIN_WORLD / "dev.jsonl") + read_questions(BUILTIN_WORLD / "train.jsonl")
    queries = [s["text"] for r in rows for s in r.metadata["oracle"] if s["kind"] == "search"]
    variants = {v: f for v, f in VARIANTS.items() if a.search_cache in ("both", v.removeprefix("cache_"))}

    figures: dict[str, Any] = {
        "load_avg_before": os.getloadavg(),
        "cpus": os.cpu_count(),
        "command": " ".join(["python", "bench/bench_env.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        **{k: getattr(a, k) for k in ("steps", "rounds", "concurrency", "batch", "search_inline", "search_cache")},
        "query_stream": {
            "strings": len(queries),
            "distinct": len(set(queries)),
            "step_searches_per_round": max(100, a.steps // 4) + a.steps + max(4, a.steps // a.batch) * a.batch,
        },
    }
    bare, bare_url = start([sys.executable, "-c", BARE_SERVER])
    inline = ["--search-inline", a.search_inline] if a.search_inline else []
    servers: dict[str, subprocess.Popen[str]] = {}
    urls: dict[str, str] = {}
    try:
        for v, flags in variants.items():
            limits = ["--max-turns", "64", "--max-episodes", "200000", "--max-snapshots", "2000000"]
            servers[v], urls[v] = env_server(cache, *limits, *inline, *flags)
        figures["throughput"] = asyncio.run(bench_throughput(urls, bare_url, queries, a))
        figures["fork_vs_history"] = asyncio.run(bench_fork_vs_history(next(iter(urls.values())), a.fork_reps))
    finally:
        for srv in servers.values():
            stop(srv)
        stop(bare)
    figures["direct_search"] = direct_search(Path(cache) / "synthetic-builtin.index", queries[:2000])  # the server's
    limits = ["--max-episodes", str(a.episodes + 100), "--max-snapshots", str(5 * a.episodes + 500)]
    srv, url = env_server(cache, *limits, *next(iter(variants.values())))
    try:
        figures["memory"] = asyncio.run(bench_memory(url, srv.pid, a.episodes, queries))
    finally:
        stop(srv)
    figures["load_avg_after"] = os.getloadavg()
    report(figures)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def report(f: dict[str, Any]) -> None:
    t, d, qs = f["throughput"], f["direct_search"], f["query_stream"]
    print(f"{f['date']}: {f['command']}")
    print(f"cpus {f['cpus']}, load average {f['load_avg_before'][0]:.1f} -> {f['load_avg_after'][0]:.1f}")
    print(
        f"query stream: {qs['strings']} oracle search strings, {qs['distinct']} distinct, cycled; "
        f"{qs['step_searches_per_round']} step searches a round per server"
    )
    print(f"{'':26}{'calls/s':>10}{'ops/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'vs bare':>9}")

    def row(key: str, r: dict[str, Any]) -> None:
        ops = r.get("ops_per_s", r["per_s"])
        vs = f"{r['vs_bare']:.2f}" if "vs_bare" in r else ""
        print(f"{key:26}{r['per_s']:10.0f}{ops:10.0f}{r['p50_ms']:9.2f}{r['p99_ms']:9.2f}{vs:>9}")

    for key in ("bare_sequential", "bare_concurrent"):
        row(key, t[key])
    for v, res in t["variants"].items():
        for key in STEP_PHASES:
            row(f"{key} ({v})", res[key])
    for key in ("fork_sequential", "fork_concurrent", "fork_batch"):
        row(f"{key} ({next(iter(t['variants']))})", t[key])
    print(
        f"rounds: {f['rounds']}, ratios measured within each round, medians ({f['steps']} calls at "
        f"{f['concurrency']} in flight, {t['bare_sequential']['calls_per_round']} sequential, "
        f"{max(4, f['steps'] // f['batch'])} batches of {f['batch']} a round); direct search_sync: p50 "
        f"{d['p50_ms']:.3f} ms, p99 {d['p99_ms']:.3f} ms"
    )
    for v, res in t["variants"].items():
        s, w, c = res["server_search"], res["searched"], res["cache"]
        print(f"{v}:")
        looked_up = c["hit"] + c["miss"]
        cached = (
            f"hit rate {c['hit_rate']:.1%} ({c['hit']:.0f} hits, {c['miss']:.0f} misses, {c['entries']:.0f} entries)"
            if looked_up
            else "off (no look-ups)"
        )
        print(
            f"  search cache: {cached}; searched inline {w['inline']:.0f}, in threads {w['thread']:.0f} "
            f"(--search-inline {f['search_inline'] or 'default'})"
        )
        print(
            f"  search calls, server histogram (cache hits and queueing included): n={s['count']:.0f} mean "
            f"{s['mean_ms']:.3f} ms, p50 ~{s['p50_ms']:.3f} ms, p99 ~{s['p99_ms']:.3f} ms"
        )
        for g in res["goals"].values():
            rounds = " ".join(f"{x:.2f}" for x in g["per_round"])
            print(
                f"  {g['what']:42} {g['ratio']:6.2f}  goal >= {g['goal']:<4g} {'pass' if g['pass'] else 'FAIL'}"
                f"   (rounds: {rounds})"
            )
        need = res["goals"]["batch_vs_sequential"]["goal"] * res["step_sequential"]["ops_per_s"]
        print(
            f"  one core's ceiling for batched steps that search, from the search alone (1 / direct p50): "
            f"{1e3 / d['p50_ms']:.0f} ops/s; 10x step_sequential is {need:.0f} ops/s"
        )
    met = {v: sum(g["pass"] for g in res["goals"].values()) for v, res in t["variants"].items()}
    print("issue 14 goals met: " + ", ".join(f"{v} {n}/{len(GOALS)}" for v, n in met.items()))
    if len(met) == 2:
        on, off = (t["variants"][v]["goals"] for v in ("cache_on", "cache_off"))
        only = [name for name in GOALS if on[name]["pass"] and not off[name]["pass"]]
        if only:
            print(f"  met only with the search cache on, at this query stream's hit rate: {', '.join(only)}")
    fh = f["fork_vs_history"]
    print(
        f"fork via HTTP: turn 1 {fh['turn1_ms']:.3f} ms, turn 50 {fh['turn50_ms']:.3f} ms, ratio "
        f"{fh['ratio_50_over_1']:.2f}; EpisodeStore.spawn: {fh['spawn_turn1_us']:.2f} / {fh['spawn_turn50_us']:.2f} us, "
        f"ratio {fh['spawn_ratio_50_over_1']:.2f}"
    )
    m = f["memory"]
    print(
        f"memory: {m['episodes']} episodes x 3 search steps ({m['snapshots']} snapshots): RSS {m['rss_before_mb']:.0f} "
        f"-> {m['rss_after_mb']:.0f} MB, {m['bytes_per_episode']:.0f} bytes per live episode"
    )


if __name__ == "__main__":
    sys.exit(main())

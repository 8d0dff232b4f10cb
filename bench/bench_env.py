"""Env server costs through HTTP: steps/s and forks/s, latency, search latency, fork time vs history length, memory.

Everything runs against real servers in child processes (`python -m env_server serve`, synthetic world), driven by one
aiohttp client session in this process with MessagePack bodies, as the trainer's client sends them:

- steps/s and forks/s, three ways: sequential single calls (1 in flight), concurrent single calls (`--concurrency` in
  flight) and `/v1/batch` (`--batch` ops a call, one call in flight); client-side p50/p99 latency per call. A step is a
  `<search> ... </search>` action (an oracle query of the synthetic dev split), so it includes a real BM25 search.
- baseline: a bare aiohttp handler (reads the body, answers a fixed MessagePack map) in its own child process, driven
  by the same client the same way; `vs bare` = env calls/s / bare calls/s, the share of the framework's ceiling.
- search latency: the server's own `trace_env_search_seconds` histogram (mean; p50/p99 interpolated in its buckets)
  and a direct in-process `TantivyRetriever.search_sync` over the same index (p50/p99).
- fork cost vs history length: one episode at turn 1 and one at turn 50 (`--max-turns 64` server), forked alternately
  `--fork-reps` times each; median latency of each and their ratio (O(1) fork: ~1). Also `EpisodeStore.spawn` timed
  in-process on 1- and 50-turn node chains.
- bytes per live episode: RSS of a fresh server before and after `--episodes` episodes are created and stepped 3
  times each (searches, so each holds 4 state nodes with their observations), divided by the episode count.

    .venv/bin/python bench/bench_env.py                         # defaults: 2000 steps, 32 in flight, batches of 64
    .venv/bin/python bench/bench_env.py --steps 4000 --episodes 20000 --out runs/bench_env.json

Measured 2026-11-28 with the defaults, 2 CPU cores shared with other jobs (load average 4.5-5.3, so wall-clock
rates are low and noisy; ratios compare calls made at the same moment):

                              calls/s     ops/s   p50 ms   p99 ms  vs bare
    bare_sequential              1032      1032     0.46     5.30
    bare_concurrent              1506      1506    20.89    42.94
    step_sequential               343       343     1.80     7.14     0.33
    step_concurrent               673       673    44.22   132.33     0.45
    step_batch                     23      1499    40.00   139.71
    fork_sequential               776       776     0.62     6.11     0.75
    fork_concurrent              1129      1129    27.26    54.62     0.75
    fork_batch                    192     12296     5.70    15.13
    search, server histogram: mean 18.6 ms, p50 ~17.6 ms, p99 ~141 ms (includes the wait for a search thread while
      32 steps or a 64-op batch are in flight); direct search_sync: p50 0.059 ms, p99 1.6 ms
    fork via HTTP: turn 1 1.169 ms, turn 50 1.204 ms (ratio 1.03); EpisodeStore.spawn 4.67 / 4.80 us (ratio 1.03)
    memory: 10,000 episodes x 3 search steps (40,050 snapshots): RSS 58 -> 122 MB, 6,677 bytes per live episode

Reading: a step costs about 3 bare HTTP round trips sequentially (search in a thread, judge, state node, snapshot
id); batching 64 steps in one call gives ~2.2x the ops/s of 32 concurrent single calls, and batched forks ~11x. Fork
time does not depend on history length (HTTP and in-process ratios ~1.0). A live episode with 3 searched turns costs
~6.7 KB, most of it the three observations (~3 passages each) and the info dicts of its 4 state nodes.
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


async def bench_throughput(url: str, bare_url: str, queries: list[str], a: argparse.Namespace) -> dict[str, Any]:
    http = Http(url, a.concurrency)
    bare = Http(bare_url, a.concurrency)
    out: dict[str, Any] = {}
    try:
        n_eps = max(4 * a.concurrency, a.steps // 50 + 1)
        eps = await create_many(http, n_eps * 3, question="Which company published it?", answers=["Nobody"])

        def step_call(pool: list[str]) -> Callable[[int], Any]:
            return lambda i: http.post(
                f"/v1/episodes/{pool[i % len(pool)]}/step",
                {"action": f"<search> {queries[i % len(queries)]} </search>"},
            )

        def step_batch(pool: list[str]) -> Callable[[int], Any]:
            def call(i: int) -> Any:
                ops = [
                    {
                        "op": "step",
                        "episode_id": pool[(i * a.batch + j) % len(pool)],
                        "action": f"<search> {q} </search>",
                    }
                    for j, q in enumerate(queries[(i * a.batch) % len(queries) :][: a.batch])
                ]
                return http.post("/v1/batch", {"ops": ops})

            return call

        seq_n = max(200, a.steps // 4)
        out["bare_sequential"] = await drive(seq_n, 1, lambda i: bare.post("/echo", {"x": i}))
        out["bare_concurrent"] = await drive(a.steps, a.concurrency, lambda i: bare.post("/echo", {"x": i}))
        out["step_sequential"] = await drive(seq_n, 1, step_call(eps[:n_eps]))
        out["step_concurrent"] = await drive(a.steps, a.concurrency, step_call(eps[n_eps : 2 * n_eps]))
        nb = max(4, a.steps // a.batch)
        r = await drive(nb, 1, step_batch(eps[2 * n_eps :]))
        out["step_batch"] = {**r, "ops_per_s": r["per_s"] * a.batch, "ops_per_call": a.batch}

        parent = eps[0]
        fork_one = lambda i: http.post(f"/v1/episodes/{parent}/fork", {"n": 1})  # noqa: E731
        out["fork_sequential"] = await drive(seq_n, 1, fork_one)
        out["fork_concurrent"] = await drive(a.steps, a.concurrency, fork_one)
        fork_ops = {"ops": [{"op": "fork", "episode_id": parent, "n": 1}] * a.batch}
        r = await drive(nb, 1, lambda i: http.post("/v1/batch", fork_ops))
        out["fork_batch"] = {**r, "ops_per_s": r["per_s"] * a.batch, "ops_per_call": a.batch}
        for kind in ("sequential", "concurrent"):
            out[f"step_{kind}"]["vs_bare"] = out[f"step_{kind}"]["per_s"] / out[f"bare_{kind}"]["per_s"]
            out[f"fork_{kind}"]["vs_bare"] = out[f"fork_{kind}"]["per_s"] / out[f"bare_{kind}"]["per_s"]
        out["server_search"] = search_histogram(await http.get_text("/metrics"))
    finally:
        await http.close()
        await bare.close()
    return out


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


def direct_search(world: Path, queries: list[str]) -> dict[str, float]:
    from env_server.retrieval import TantivyRetriever

    r = TantivyRetriever(world / "index")
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
    ap.add_argument("--steps", type=int, default=2000, help="calls per concurrent measurement")
    ap.add_argument("--concurrency", type=int, default=32, help="calls in flight for the concurrent measurements")
    ap.add_argument("--batch", type=int, default=64, help="ops per /v1/batch call")
    ap.add_argument("--fork-reps", type=int, default=300, help="forks at each history length")
    ap.add_argument("--episodes", type=int, default=10_000, help="live episodes for the memory measurement")
    ap.add_argument("--cache-dir", default=None, help="TRACE cache (synthetic world); default: a fresh temp folder")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    a = ap.parse_args(argv)

    from env_server.datasets import read_questions
    from tools.synthetic import load_or_build_world

    cache = a.cache_dir or tempfile.mkdtemp(prefix="trace-bench-")
    world = load_or_build_world(Path(cache))
    rows = read_questions(world / "dev.jsonl") + read_questions(world / "train.jsonl")
    queries = [s["text"] for r in rows for s in r.metadata["oracle"] if s["kind"] == "search"]

    figures: dict[str, Any] = {"load_avg_before": os.getloadavg(), "cpus": os.cpu_count()}
    bare, bare_url = start([sys.executable, "-c", BARE_SERVER])
    srv, url = env_server(cache, "--max-turns", "64", "--max-episodes", "200000", "--max-snapshots", "2000000")
    try:
        figures["throughput"] = asyncio.run(bench_throughput(url, bare_url, queries, a))
        figures["fork_vs_history"] = asyncio.run(bench_fork_vs_history(url, a.fork_reps))
    finally:
        stop(srv)
        stop(bare)
    figures["direct_search"] = direct_search(world, queries[:2000])
    srv, url = env_server(cache, "--max-episodes", str(a.episodes + 100), "--max-snapshots", str(5 * a.episodes + 500))
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
    t = f["throughput"]
    print(f"cpus {f['cpus']}, load average {f['load_avg_before'][0]:.1f} -> {f['load_avg_after'][0]:.1f}")
    print(f"{'':26}{'calls/s':>10}{'ops/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'vs bare':>9}")
    for key in (
        "bare_sequential",
        "bare_concurrent",
        "step_sequential",
        "step_concurrent",
        "step_batch",
        "fork_sequential",
        "fork_concurrent",
        "fork_batch",
    ):
        r = t[key]
        ops = r.get("ops_per_s", r["per_s"])
        vs = f"{r['vs_bare']:.2f}" if "vs_bare" in r else ""
        print(f"{key:26}{r['per_s']:10.0f}{ops:10.0f}{r['p50_ms']:9.2f}{r['p99_ms']:9.2f}{vs:>9}")
    s, d = t["server_search"], f["direct_search"]
    print(
        f"search, server histogram: n={s['count']:.0f} mean {s['mean_ms']:.3f} ms, p50 ~{s['p50_ms']:.3f} ms, "
        f"p99 ~{s['p99_ms']:.3f} ms; direct search_sync: p50 {d['p50_ms']:.3f} ms, p99 {d['p99_ms']:.3f} ms"
    )
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

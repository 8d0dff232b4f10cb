"""`trace-env demo`: start the env server on the synthetic world and play one scripted episode
through HTTP, branching it at turn 1 — the smallest end-to-end look at what the server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import textwrap

from env_server.cli import serve
from env_server.config import load_config
from shared.client import EnvClient


def _show(label: str, text: str) -> None:
    body = textwrap.indent(textwrap.shorten(" ".join(text.split()), 300), "    ")
    print(f"  {label}:\n{body}")


async def run_demo(port: int = 0) -> int:
    cfg = load_config(port=port, log_level="warning")
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(cfg, ready=ready))
    url = await ready
    try:
        async with EnvClient(url, msgpack=False) as env:
            info = await env.info()
            print(f"datasets: {[(d.name, d.splits) for d in info.datasets]}")
            print(f"tools: {[t['function']['name'] for t in info.tools]}\n")
            ep = await env.create(dataset="synthetic", split="dev", index=0, include_oracle=True)
            oracle = ep.metadata["oracle"]
            print(f"episode {ep.episode_id}  question: {ep.metadata.get('hops')}-hop {ep.metadata.get('kind')}")
            _show("prompt", ep.prompt)
            first = oracle[0]
            res = await env.step(
                ep.episode_id, action=f"<think>I should look this up.</think><search> {first['text']} </search>"
            )
            print(f"\nturn {res.turn}: search {first['text']!r}")
            _show("observation", res.observation)

            branches = (await env.fork(ep.episode_id, 2)).episode_ids
            print(f"\nforked at turn {res.turn} into {branches} (snapshot {res.snapshot_id})")
            for name, eid, script in (("oracle", branches[0], oracle[1:]), ("guess", branches[1], [])):
                print(f"\n-- branch {name}")
                for st in script:
                    if st["kind"] == "search":
                        r = await env.step(eid, action=f"<search> {st['text']} </search>")
                        print(f"turn {r.turn}: search {st['text']!r}")
                    else:
                        r = await env.step(eid, action=f"<think>Found it.</think><answer> {st['text']} </answer>")
                        print(f"turn {r.turn}: answer {st['text']!r} -> reward {r.reward}, info {_judged(r.info)}")
                if not script:
                    r = await env.step(eid, action="<answer> nobody knows </answer>")
                    print(f"turn {r.turn}: answer 'nobody knows' -> reward {r.reward}, info {_judged(r.info)}")

            blob = await env.export_snapshot(res.snapshot_id)
            sid = (await env.import_snapshot(blob)).snapshot_id
            again = (await env.episodes_from_snapshot(sid, 1)).episode_ids[0]
            print(f"\nsnapshot after turn 1 exported ({len(blob)} bytes) and re-imported as {sid}: episode {again}")
            print(f"server health: {await env.health()}")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return 0


def _judged(info: dict) -> dict:
    return {k: info[k] for k in ("em", "f1", "cover_em", "golden_answers") if k in info}

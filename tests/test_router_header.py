"""The engine client's sglang-router header: every `/generate` carries `X-SMG-Routing-Key: <route_key>`.

sglang-router (SGLang's gateway) hashes that header under its consistent_hashing and manual policies, so one
router URL in front of several SGLang servers keeps a tree's branches on one radix cache. The peer is a real aiohttp
server on loopback that records each request's headers and answers SGLang-shaped JSON.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shared.engine_protocol import SamplingParams
from trainer.engines.client import ROUTING_HEADER, EngineClient

PARAMS = SamplingParams(max_new_tokens=2, temperature=1.0)


class Recorder:
    """A `/generate` server that keeps every request's headers and answers two tokens per prompt."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        app = web.Application()
        app.router.add_post("/generate", self.generate)
        self.server = TestServer(app, host="127.0.0.1")

    @staticmethod
    def item(prompt: list[int], rid: str) -> dict[str, Any]:
        out = [prompt[-1] + 1, prompt[-1] + 2]
        meta = {
            "id": rid,
            "prompt_tokens": len(prompt),
            "completion_tokens": 2,
            "cached_tokens": 0,
            "finish_reason": {"type": "length", "length": 2},
            "output_token_logprobs": [[-0.5, t, None] for t in out],
        }
        return {"output_ids": out, "meta_info": meta}

    async def generate(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        body = await request.json()
        ids, rid = body["input_ids"], body["rid"]
        if isinstance(ids[0], int):
            return web.json_response(self.item(ids, rid))
        return web.json_response([self.item(p, r) for p, r in zip(ids, rid, strict=True)])


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()
    await rec.server.start_server()
    yield rec
    await rec.server.close()


async def test_every_generate_carries_the_route_key_header(recorder: Recorder) -> None:
    url = str(recorder.server.make_url("")).rstrip("/")
    async with EngineClient([url], retries=0) as client:
        await client.generate([1, 2, 3], PARAMS, route_key="tree-7")
        await client.generate_many([[1, 2], [1, 3]], PARAMS, route_key="synthetic/train/12")
        await client.generate([4], PARAMS, route_key="tree-7")
        await client.generate([4], PARAMS, route_key="q\u00e9")  # not ASCII: percent-encoded
    keys = [h.get(ROUTING_HEADER) for h in recorder.headers]
    assert ROUTING_HEADER == "X-SMG-Routing-Key"
    assert keys == ["tree-7", "synthetic/train/12", "tree-7", "q%C3%A9"]

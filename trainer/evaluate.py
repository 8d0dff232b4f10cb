"""`trace-train eval`: EM/F1 of a checkpoint on a split, through the same agent loop and engine client
as training (greedy decoding), against a launched or attached env server and engine."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from shared.client import EnvClient
from trainer import services
from trainer.config import TrainConfig
from trainer.engine_client import EngineClient
from trainer.loop import evaluate


async def evaluate_checkpoint(cfg: TrainConfig, *, split: str | None = None, limit: int = 200) -> dict[str, Any]:
    assert cfg.model.path is not None, "evaluate_checkpoint needs cfg.model.path"
    model = Path(cfg.model.path)
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        env_url = await stack.enter_async_context(services.env_server(cfg, out))
        env = await stack.enter_async_context(EnvClient(env_url, token=cfg.env.token))
        urls = await stack.enter_async_context(services.engines(cfg, model, out))
        engine = await stack.enter_async_context(EngineClient(urls, max_concurrency=cfg.rollout.max_concurrency))
        tok = AutoTokenizer.from_pretrained(str(model))
        res = await evaluate(env, engine, tok, cfg, limit=limit, split=split)
    return {"model": str(model), "dataset": cfg.env.dataset, "split": split or cfg.env.eval_split, **res}

"""The processes a training run needs besides itself: the env server and the engine(s), each either
attached by URL or launched here as a child process that is stopped on exit (Ctrl-C and SIGTERM included) and
killed with the trainer if it dies any other way (SIGKILL: the parent-death signal, `die_with_parent`), and
the model folder (the tiny model is built once and cached; the SFT warm start too).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import structlog

from shared.replicas import EnvPool
from trainer.config import TrainConfig
from trainer.engines.launcher import SGLangServer, die_with_parent, free_port, launch_engine, url_for
from trainer.learner.config import uses_cpu

log = structlog.get_logger("trainer")


def cache_dir() -> Path:
    return Path(os.environ.get("TRACE_CACHE_DIR") or Path.home() / ".cache" / "trace")


@contextlib.asynccontextmanager
async def env_server(cfg: TrainConfig, log_dir: Path) -> AsyncIterator[list[str]]:
    """Yield the env server URLs: cfg.env.urls, or one `trace-env serve` child on the synthetic world of
    `env.synthetic_size` (written by `trace-world` into the cache, once)."""
    if cfg.env.urls:
        yield list(cfg.env.urls)
        return
    world = await asyncio.to_thread(world_dir, cfg)
    port = free_port()
    cmd = env_server_command(cfg, world, port)
    proc = launch_engine(cmd, url_for("127.0.0.1", port), log_path=log_dir / "env_server.log", ready_path="/health")
    async with proc:
        log.info("env server started", url=proc.url, log=str(log_dir / "env_server.log"))
        yield [proc.url]


@contextlib.asynccontextmanager
async def env_client(cfg: TrainConfig, log_dir: Path) -> AsyncIterator[EnvPool]:
    """The run's env client: an `EnvPool` over `env_server`'s URLs with the run's token, patience and coalescing."""
    async with env_server(cfg, log_dir) as urls:
        e = cfg.env
        async with EnvPool(urls, token=e.token, patience_s=e.patience_s, coalesce=e.coalesce) as pool:
            yield pool


def env_server_command(cfg: TrainConfig, world: Path, port: int) -> list[str]:
    """The `trace-env serve` command line of the env server a run starts itself (the world from `world_dir`)."""
    cmd = [sys.executable, "-m", "env_server", "serve", "--port", str(port), "--max-turns", str(cfg.env.max_turns)]
    cmd += ["--data", f"synthetic={world}"]
    cmd += ["--corpus", str(world / "corpus.jsonl"), "--index-dir", str(world / "index")]
    cmd += ["--topk", str(cfg.env.topk), "--log-level", "warning"]
    if cfg.env.prompt_template is not None:
        cmd += ["--prompt-template", cfg.env.prompt_template]
    return cmd


@contextlib.asynccontextmanager
async def engines(cfg: TrainConfig, model_dir: Path, log_dir: Path) -> AsyncIterator[list[str]]:
    """Yield engine URLs: attached (type url), or launched CPU engines / SGLang servers serving `model_dir`."""
    e = cfg.engine
    if e.urls:
        yield list(e.urls)
        return
    slices = check_engine_placement(cfg)
    async with contextlib.AsyncExitStack() as stack:
        urls = []
        for i in range(e.num_servers):
            env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, slices[i]))} if slices else {}
            port = e.port + i if e.port else free_port()
            log_path = log_dir / f"engine_{i}.log"
            if e.type == "sglang":
                args = [*dtype_args(model_dir, e.extra_args), *e.extra_args]
                proc = SGLangServer(model_dir, port=port, extra_args=args, log_path=log_path, env=env)
            else:
                cmd = [sys.executable, "-m", "engine.cli", "serve", "--model", str(model_dir)]
                cmd += ["--port", str(port), "--max-batch", str(e.max_batch), *e.extra_args]
                proc = launch_engine(cmd, url_for("127.0.0.1", port), log_path=log_path, env=env)
            proc.startup_timeout_s = e.startup_timeout_s
            await stack.enter_async_context(proc)
            log.info("engine started", type=e.type, url=proc.url, log=str(log_path), gpus=slices[i] if slices else None)
            urls.append(proc.url)
        yield urls


def training_gpus(cfg: TrainConfig) -> list[int]:
    """Physical ids of the GPUs this node's training ranks use ([] on CPU): LOCAL_WORLD_SIZE ranks on the first
    devices of CUDA_VISIBLE_DEVICES (all devices when unset), one each, as accelerate places them."""
    if uses_cpu(cfg.model):
        return []
    n = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [int(x) for x in visible.split(",") if x.strip()] if visible else list(range(n))
    return ids[:n]


def launches_cuda_engines(cfg: TrainConfig) -> bool:
    """Whether this run launches engines that take a GPU: SGLang, or our engine given `--device cuda...`."""
    e = cfg.engine
    if e.urls:
        return False
    if e.type == "sglang":
        return True
    args = list(e.extra_args)
    devices = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--device"]
    devices += [a.split("=", 1)[1] for a in args if a.startswith("--device=")]
    return any(d.startswith("cuda") for d in devices)


def engine_gpus(gpus: list[int], servers: int, training: list[int], *, colocate: bool = False) -> list[list[int]]:
    """engine.gpus split into one slice per launched server ([] when none are given); refuses GPUs a training
    rank uses, so generation never lands beside the training ranks, unless `colocate` (engine.colocate) says so."""
    if not gpus:
        return []
    if (clash := sorted(set(gpus) & set(training))) and not colocate:
        raise ValueError(
            f"engine.gpus {gpus} includes GPUs {clash} that training ranks use ({training}: LOCAL_WORLD_SIZE ranks on "
            "CUDA_VISIBLE_DEVICES); give the engines other GPUs, or train on fewer (accelerate's gpu_ids); "
            "engine.colocate = true shares them on purpose (one-GPU work)"
        )
    per = len(gpus) // servers
    return [gpus[i * per : (i + 1) * per] for i in range(servers)]


def check_engine_placement(cfg: TrainConfig) -> list[list[int]]:
    """Each launched engine's GPUs (engine_gpus), or a ValueError before anything starts when a launched CUDA engine
    would share a GPU with a training rank without `engine.colocate`: engine.gpus naming a training GPU, or no
    engine.gpus at all (the server would inherit the trainer's devices and start on GPU 0, beside rank 0)."""
    e = cfg.engine
    training = training_gpus(cfg)
    if training and launches_cuda_engines(cfg) and not e.gpus and not e.colocate:
        raise ValueError(
            f"engine.gpus is empty: the {e.num_servers} {e.type} engine(s) this run launches would see the "
            f"trainer's GPUs and start on GPU {training[0]}, beside training rank 0 (training ranks use {training}). "
            "Give them GPUs of their own (e.g. engine.gpus = [6, 7] beside 6 ranks on GPUs 0-5), attach running "
            "ones with --engine-url, or set engine.colocate = true to share on purpose (one-GPU work)"
        )
    return engine_gpus(e.gpus, e.num_servers, training, colocate=e.colocate) if not e.urls else []


def dtype_args(model_dir: Path, extra_args: list[str]) -> list[str]:
    """["--dtype", D] for an SGLang server of `model_dir`: the dtype its config.json says its weights are stored in
    (what `model.save_dtype` wrote), so SGLang never guesses (its `auto` serves a float32 config in float16). []
    when the engine's extra_args set --dtype themselves, or the config says nothing."""
    if any(a == "--dtype" or a.startswith("--dtype=") for a in extra_args):
        return []
    stored = json.loads((model_dir / "config.json").read_text()).get("dtype")
    return ["--dtype", str(stored)] if stored else []


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Exclusive across processes (flock on cache_dir()/.NAME.lock) while a process checks for a cache entry and
    builds it, so that runs started at once (`compare_allocators --jobs`, two trace-train) build it once and none
    reads one half written: the tiny model is written in place, the SFT warm start through one temporary folder.
    Blocking: call it off the event loop (`acache_lock` on it)."""
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f".{name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.asynccontextmanager
async def acache_lock(name: str) -> AsyncIterator[None]:
    """`cache_lock` for a coroutine: the wait for the lock runs on a thread, never on the event loop."""
    lock = cache_lock(name)
    await asyncio.to_thread(lock.__enter__)
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def world_dir(cfg: TrainConfig) -> Path:
    """The synthetic world a launched env server serves (seed 0, `env.synthetic_size`, `env.heldout_frac`), written
    once by `trace-world` into the cache. The held-out split keeps the corpus, so the tiny model's tokenizer (trained
    on the corpus, the questions and the oracle queries) is built per world all the same."""
    args = ["--cache-dir", str(cache_dir()), "--size", str(cfg.env.synthetic_size)]
    if cfg.env.heldout_frac:
        args += ["--heldout-frac", str(cfg.env.heldout_frac)]
    return Path(_run_tool("tools.synthetic", *args))


def tiny_model_dir(cfg: TrainConfig) -> Path:
    """The tiny model's folder, built (seconds, no download) by `trace-tiny-model` when missing. Its tokenizer is
    trained on the texts of the world the env server serves (`world_dir`), whatever `model.tiny_seed` is (which
    seeds the weights): before, the seed also chose the tokenizer's world, so every seed but 0 learned another
    world's names and split the served world's names into more tokens (the copy errors the DESIGN names)."""
    seed, size = cfg.model.tiny_seed, cfg.env.synthetic_size
    # (0, 300) keeps the folder name of earlier releases: its tokenizer is the same; any other pair gets a new
    # name, so that a cached model whose tokenizer learned another world is never picked up.
    held = f"-h{cfg.env.heldout_frac:g}" if cfg.env.heldout_frac else ""
    name = "tiny-model-s0" if (seed, size, held) == (0, 300, "") else f"tiny-model-s{seed}-world-n{size}{held}"
    d = Path(cfg.model.tiny_dir) if cfg.model.tiny_dir else cache_dir() / name
    with cache_lock(d.name):  # written in place: a second run waits, then finds it whole
        if not (d / "config.json").exists():
            log.info("building the tiny model", dir=str(d))
            _run_tool(
                "tools.tiny_model", "--out", str(d), "--seed", str(cfg.model.tiny_seed), "--world", str(world_dir(cfg))
            )
    return d


def _run_tool(module: str, *args: str) -> str:
    """Run a `tools/` builder as a child process (the trainer does not import `tools`); its stdout, stripped.
    Blocking: call it off the event loop. A failure raises with the tool's own error output. It dies with the
    trainer (`die_with_parent`; the thread that starts it is a pool's, which outlives the call)."""
    cmd = die_with_parent([sys.executable, "-m", module, *args])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"python -m {module} {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().splitlines()[-1]


def sft_dir(cfg: TrainConfig, base: Path) -> Path:
    """Cache folder of the SFT warm start of `base`, keyed by everything that changes its result."""
    key = json.dumps(
        {
            "base": str(base.resolve()),
            "sft": vars(cfg.sft),
            "max_turns": cfg.env.max_turns,
            "size": cfg.env.synthetic_size,
            **({"heldout_frac": cfg.env.heldout_frac} if cfg.env.heldout_frac else {}),  # the train split changes
            "topk": cfg.env.topk,
            "prompt": cfg.env.prompt_template,
            "ctx": cfg.rollout.max_context_tokens,
            "seed": cfg.model.tiny_seed,
        },
        sort_keys=True,
    )
    return cache_dir() / f"sft-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

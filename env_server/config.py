"""The env server's one typed config, built by the project's one config mechanism (`shared/config.py`).

Sources, later wins: field defaults < a TOML file (`--config FILE`, keys = field names, optionally under a
`[server]` table) < `TRACE_ENV_TOKEN` (or the older `TRACE_AUTH_TOKEN`) for the token < command-line flags
(`trace-env serve --help` lists every field below with its docstring). `validate()` holds every cross-field
check, so a bad combination fails at start-up with a message that says how to fix it, never mid-episode.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from shared import config as shared_config

REWARD_METRICS = ("em", "f1", "cover_em")
BUILTIN_WORLD = Path(__file__).parent / "data" / "synthetic"
"""The built-in synthetic world (seed 0, size 300), served when no data is given. Written by `trace-world
--out env_server/data/synthetic` (tools/synthetic.py); tests/test_synthetic.py checks it is that output. Any
other world: `trace-world --out DIR --seed S --size N`, then `--data synthetic=DIR --corpus DIR/corpus.jsonl`."""


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    """Interface to bind. 127.0.0.1 by default; 0.0.0.0 in the container."""
    port: int = 8000
    """TCP port (0 = pick a free one; the chosen port is logged)."""
    data: Annotated[dict[str, str], tyro.conf.arg(metavar="NAME[:SPLIT] FILE")] = field(default_factory=dict)
    """Question sets: name -> jsonl file or folder of `<split>.jsonl` (FlashRAG `{id, question, golden_answers}`).
    A key `name:split` names the split of a single file; a bare `name` takes the split from the file
    stem (train/dev/test/...) or else calls it `test`. Empty with nothing to search = the built-in synthetic world;
    empty with --corpus, --index-dir or --retriever-url = no question sets (episodes bring their own question and
    answers; the server says so at start-up)."""
    corpus: str | None = None
    """Corpus jsonl (`{id, contents: "\\"Title\\"\\ntext"}`) to search; indexed into `index_dir` if needed."""
    index_dir: str | None = None
    """Where the on-disk search index lives (default: `<corpus>.index`, or the synthetic world's cache)."""
    retriever_url: str | None = None
    """Use an external Search-R1-style `/retrieve` server instead of the local index."""
    retriever_timeout_s: Annotated[float, tyro.conf.arg(aliases=("--retriever-timeout",))] = 15.0
    """Seconds one request to --retriever-url may take (connecting included) before it counts as failed."""
    retriever_retries: int = 2
    """Further tries after a failed or timed-out retriever request (waits of 0.25 s, 0.5 s, ... between them); then
    the step answers 502 and is not applied. The defaults bound a step at 3 x 15 s + 0.75 s = 45.75 s, under the
    60 s the project's client (`shared.client.EnvClient`) waits by default: a step that outlived its client would
    hold the episode's lock for nothing."""
    auth_token: str | None = None
    """Bearer token required on every route but /health (env TRACE_ENV_TOKEN, or TRACE_AUTH_TOKEN). None = open."""
    max_episodes: int = 10_000
    """Live episodes cap; creating or forking past it answers 429."""
    max_snapshots: int = 500_000
    """Live snapshot (state node) cap. The automatic snapshots (one per create/step) are a cache of branch points:
    at the cap the least recently used give way (a kept id of one then answers 404). Explicit ones (POST .../snapshot,
    imports) never do: past the cap with nothing automatic left to drop, 429."""
    episode_ttl_s: Annotated[float, tyro.conf.arg(aliases=("--episode-ttl",))] = 1800.0
    """Idle episodes and snapshots are reaped after this many seconds without use."""
    max_turns: int = 8
    """Turns per episode (each action counts, valid or not); past it the episode ends `truncated`."""
    topk: int = 3
    """Passages per search when the action does not say (Search-R1 uses 3)."""
    max_topk: int = 20
    """Largest topk an action or /retrieve may ask for."""
    max_batch_ops: int = 1024
    """Ops per /v1/batch call; more answers 429."""
    max_fork_n: int = 256
    """Largest n for one fork call."""
    max_body_bytes: int = 8 * 1024 * 1024
    """Request body cap; a larger body answers 413 without being read past the cap."""
    body_timeout_s: Annotated[float, tyro.conf.arg(aliases=("--body-timeout",))] = 15.0
    """Seconds a client has to send a whole request body once its headers arrived; a slower or stalled upload gets
    408 and its connection is closed. 15 s lets a body at the 8 MiB cap arrive at 0.6 MB/s."""
    max_action_chars: int = 32_768
    """Longest action text a step accepts (422 past it): a model's turn, not a document."""
    reward_metric: str = "em"
    """Reward of an `answer`: em (default, as Search-R1), f1 or cover_em. All three are in `info`."""
    prompt_template: str | None = None
    """Override of the user prompt; must contain `{question}`. None = the built-in Search-R1-style prompt."""
    cache_dir: str | None = None
    """Where generated data and indexes are cached (default $TRACE_CACHE_DIR or ~/.cache/trace)."""
    search_threads: int = 4
    """Threads running local searches off the event loop (when they do not run inline: --search-inline)."""
    search_inline: Literal["auto", "always", "never"] = "auto"
    """Where searches of the local index run (a --retriever-url is always awaited). auto: on the event loop while one
    search's running cost (the 90th percentile of the last 256, timed) is at most --search-inline-max-ms, else in the
    search threads; the threads until 32 searches have been timed. always: on the loop. never: in the threads. Inline
    saves the thread hop and the GIL hand-offs (~0.1 ms searches took 14-20 ms through the threads under load)."""
    search_inline_max_ms: float = 1.0
    """The longest the event loop is held by inline searches at a time, by estimate: searches run inline while the time
    taken plus the estimate of the next fits, then the loop gets control back before more run. Also auto's bound on
    one search's cost: a slower index (a big corpus, a cold page cache) searches in the threads."""
    search_cache: int = 16384
    """Answers of the local index kept in memory, by analysed query (case, punctuation and stopwords aside) and topk,
    least recently used out; 0 = off. A repeated search (a GRPO group's samples, a tree's branches) is then answered
    without searching. The index never changes while the server runs, so a cached answer is the one a search would
    give. Memory: at most entries x topk passages plus ~1-2 KB an entry: with wiki passages (~0.7 KB) ~55 MB at the
    default size and topk 3, ~280 MB at topk 20. A --retriever-url is never cached (its corpus could change)."""
    shutdown_timeout_s: Annotated[float, tyro.conf.arg(aliases=("--shutdown-timeout",))] = 30.0
    """On SIGTERM/SIGINT the server drains: it keeps listening, answers new work and /health with 503 (Retry-After),
    and closes once the requests in flight have finished, or after this many seconds. A second signal closes at once."""
    log_level: str = "info"
    """debug, info, warning or error. Logs are JSON lines when stderr is not a TTY."""
    ui: bool = True
    """Serve the server's own page at GET / (list the datasets and tools, play an episode by hand, fork it at any
    turn, export a snapshot), through the same public API every client uses. The page holds no data, so it needs no
    token; it asks for one when the API does. --no-ui removes the route."""

    def validate(self) -> ServerConfig:
        """Check every cross-field rule; raise ValueError saying what to change."""
        positive = ("max_episodes", "max_snapshots", "max_turns", "topk", "max_topk", "max_batch_ops", "max_fork_n")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.topk > self.max_topk:
            raise ValueError(f"topk ({self.topk}) must be <= max_topk ({self.max_topk})")
        if self.episode_ttl_s <= 0:
            raise ValueError(f"episode_ttl_s must be > 0, got {self.episode_ttl_s}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.reward_metric not in REWARD_METRICS:
            raise ValueError(f"reward_metric must be one of {REWARD_METRICS}, got {self.reward_metric!r}")
        if self.prompt_template is not None:
            if "{question}" not in self.prompt_template:
                raise ValueError("prompt_template must contain the placeholder {question}")
            try:  # what every create does with it: another placeholder (or a stray brace) would fail each one
                self.prompt_template.format(question="q")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(
                    f"prompt_template may hold only the placeholder {{question}} (write other braces as {{{{ }}}}): "
                    f"{type(e).__name__}: {e}"
                ) from e
        if self.retriever_url and self.corpus:
            raise ValueError("give either --corpus (local index) or --retriever-url (external search), not both")
        if self.data and not (self.corpus or self.retriever_url or self.index_dir):
            raise ValueError(
                "--data needs something to search: --corpus FILE (indexed locally), --index-dir DIR "
                "(an index built by `trace-env index`) or --retriever-url URL"
            )
        for name, path in self.data.items():
            if not Path(path).exists():
                raise ValueError(f"--data {name}={path}: no such file or folder")
        if self.corpus and not Path(self.corpus).is_file():
            raise ValueError(f"--corpus {self.corpus}: no such file")
        if self.retriever_timeout_s <= 0:
            raise ValueError(f"retriever_timeout_s must be > 0, got {self.retriever_timeout_s}")
        if self.retriever_retries < 0:
            raise ValueError(f"retriever_retries must be >= 0, got {self.retriever_retries}")
        if self.body_timeout_s <= 0:
            raise ValueError(f"body_timeout_s must be > 0, got {self.body_timeout_s}")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}")
        if self.search_threads < 1:
            raise ValueError(f"search_threads must be >= 1, got {self.search_threads}")
        if self.search_inline not in ("auto", "always", "never"):
            raise ValueError(f"search_inline must be auto, always or never, got {self.search_inline!r}")
        if self.search_cache < 0:
            raise ValueError(f"search_cache must be >= 0 (0 = off), got {self.search_cache}")
        if not 0 < self.search_inline_max_ms <= 1000:
            raise ValueError(f"search_inline_max_ms must be in (0, 1000], got {self.search_inline_max_ms}")
        return self

    @property
    def uses_synthetic(self) -> bool:
        return not self.data and not self.corpus and not self.retriever_url and not self.index_dir

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir or os.environ.get("TRACE_CACHE_DIR") or Path.home() / ".cache" / "trace")


ENV_VARS = {"TRACE_ENV_TOKEN": "auth_token", "TRACE_AUTH_TOKEN": "auth_token"}
"""Environment variables the server reads (the first one set wins; TRACE_AUTH_TOKEN is the older name)."""


def load_config(toml_path: str | Path | None = None, **overrides: Any) -> ServerConfig:
    """For programs and tests that build a config in code: defaults < TOML file < $TRACE_ENV_TOKEN <
    `overrides` (None values are ignored), then `validate()`. The command line goes through `parse_serve_args`."""
    cfg = shared_config.load_config(ServerConfig, toml_path, env_vars=ENV_VARS, toml_table="server")
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    for key, value in overrides.items():
        if key not in names:
            raise ValueError(f"unknown config key {key!r}")
        if value is not None:
            setattr(cfg, key, value)
    cfg = shared_config.load_config(ServerConfig, base=cfg)  # type-checks the overrides too
    return cfg.validate()


def parse_serve_args(argv: list[str]) -> ServerConfig:
    """`trace-env serve`'s command line: `--config FILE.toml`, then every ServerConfig field as a flag.
    `--data NAME=FILE` (repeatable) is accepted as in earlier releases, beside tyro's `--data NAME FILE`."""
    return shared_config.parse_config(
        ServerConfig,
        _split_data_pairs(argv),
        prog="trace-env serve",
        description="Run the TRACE env server: forkable ReAct search/QA episodes over HTTP (DESIGN §2).",
        env_vars=ENV_VARS,
        toml_table="server",
    )


def _split_data_pairs(argv: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--data="):
            value, i = a.removeprefix("--data="), i + 1
        elif a == "--data" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        else:
            out.append(a)
            i += 1
            continue
        name, sep, path = value.partition("=")
        out += ["--data", name, path] if sep and name and path else ["--data", value]
    return out

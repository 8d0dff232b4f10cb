"""`compose.yaml` (no Docker engine here): N env server replicas built from the Dockerfile, and a trainer whose
command points at every one of them, started once they are healthy; its command parses to those replicas, and the
replicas run with the settings the trainer gives the env server it starts itself."""

from __future__ import annotations

import shlex

import yaml
from conftest import REPO

from trainer.cli import parse
from trainer.config import TrainConfig


def test_compose_runs_env_replicas_and_points_the_trainer_at_each() -> None:
    doc = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = doc["services"]
    envs = sorted(name for name in services if name.startswith("env-"))
    assert len(envs) >= 2, f"at least two env replicas: {envs}"
    for name in envs:
        svc = services[name]
        assert svc["build"] == "." and svc["restart"] == "unless-stopped", name
    trainer = services["trainer"]
    assert trainer["depends_on"] == {name: {"condition": "service_healthy"} for name in envs}
    urls = [f"http://{name}:8000" for name in envs]  # the Dockerfile's ENTRYPOINT listens on 8000
    assert "--port 8000" in " ".join(shlex.quote(x) for x in _entrypoint()), "the image's port"
    cmd = trainer["command"]
    assert cmd[0] == "trace-train"
    assert parse(cmd[1:]).cfg.env.urls == urls, "one --env-url per replica, in order"
    # The replicas serve what the CPU demo would serve itself (services.env_server_command's settings).
    args = services[envs[0]]["command"]
    flags = dict(zip(args[::2], args[1::2], strict=True))
    env = TrainConfig().env
    assert flags == {
        "--max-turns": str(env.max_turns),
        "--topk": str(env.topk),
        "--prompt-template": env.prompt_template,
    }


def _entrypoint() -> list[str]:
    import json

    line = next(x for x in (REPO / "Dockerfile").read_text().splitlines() if x.startswith("ENTRYPOINT"))
    return json.loads(line.removeprefix("ENTRYPOINT").strip())

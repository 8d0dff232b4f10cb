"""Runs started at once share the TRACE cache: `trainer.services.cache_lock` makes the check-and-build of a cache
entry (the tiny model, the SFT warm start) exclusive across processes, so the entry is built once and never read
half written (`bench/compare_allocators.py --jobs` starts runs together on a fresh cache)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from trainer import services
from trainer.config import load_train_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "debug.toml"


def test_the_cache_lock_excludes_every_other_holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second holder (another open of the lock file: another process, or here another thread) waits until the
    first lets go; locks of other entries do not wait."""
    monkeypatch.setenv("TRACE_CACHE_DIR", str(tmp_path))
    order: list[str] = []
    held = threading.Event()

    def first() -> None:
        with services.cache_lock("entry"):
            held.set()
            time.sleep(0.5)
            order.append("first done")

    def second() -> None:
        held.wait()
        with services.cache_lock("entry"):
            order.append("second in")

    t1, t2 = threading.Thread(target=first), threading.Thread(target=second)
    t1.start()
    t2.start()
    held.wait()
    with services.cache_lock("another entry"):  # not blocked by "entry"
        order.append("other entry")
    t1.join()
    t2.join()
    assert order == ["other entry", "first done", "second in"]


def test_runs_started_at_once_build_the_tiny_model_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs asking for the tiny model of an empty cache at the same moment: one builds it (the real builder),
    the other waits and takes the finished model; without the lock both would write the same folder at once."""
    monkeypatch.setenv("TRACE_CACHE_DIR", str(tmp_path))
    cfg = load_train_config(CONFIG, [])
    builds: list[str] = []
    real = services._run_tool

    def counted(module: str, *args: str) -> str:
        builds.append(module)
        return real(module, *args)

    monkeypatch.setattr(services, "_run_tool", counted)
    start = threading.Barrier(2)
    got: list[Path] = []

    def run() -> None:
        start.wait()
        got.append(services.tiny_model_dir(cfg))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds.count("tools.tiny_model") == 1, builds
    assert len(set(got)) == 1 and (got[0] / "config.json").exists()
    assert list(got[0].glob("*.safetensors")), "the model's weights are there when the waiting run reads it"

"""The arrows between the project's packages (folders are processes; `shared/` is what crosses the wire).

Allowed: env_server -> shared; engine -> shared; trainer -> shared; tools -> shared and the trainer's public API
(its `policy` agent). Not allowed, each checked here statically (every import statement, lazy ones inside
functions included) and, for the torch-free processes, at run time:
- `env_server` imports neither `trainer`, `engine`, `tools` nor torch;
- `shared` imports none of the project's other packages, nor torch;
- `trainer` reaches the env server only by URL (no `env_server` import) and runs `tools/` builders as child
  processes (no `tools` import);
- `engine` imports neither `trainer`, `env_server` nor `tools`;
- `tools` imports no private (`_name`) of the trainer.

Inside the trainer (`trainer/__init__.py`), the arrows between its parts point downwards only: the loop (the
modules of `trainer/` itself) may import every part; `trainer.algo` the learner and the engines;
`trainer.learner` and `trainer.engines` no other part. Each part's config sits beside it, so no part imports
`trainer.config` (or anything else of the loop).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "env_server": {"trainer", "engine", "tools", "torch", "transformers", "accelerate"},
    "shared": {"trainer", "engine", "tools", "env_server", "torch", "transformers", "accelerate"},
    "trainer": {"env_server", "tools"},
    "engine": {"trainer", "env_server", "tools"},
    "tools": {"env_server", "engine"},
}


def imports_of(package: str) -> list[tuple[str, int, str, list[str]]]:
    """(file, line, imported module, imported names) for every import statement under `package`."""
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = str(path.relative_to(REPO))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(rel, node.lineno, a.name, []) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((rel, node.lineno, node.module, [a.name for a in node.names]))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_forbidden_import(package: str) -> None:
    bad = [
        f"{f}:{line} imports {mod}"
        for f, line, mod, _ in imports_of(package)
        if mod.split(".")[0] in FORBIDDEN[package]
    ]
    assert not bad, "\n".join(bad)


def test_tools_use_only_the_trainers_public_api() -> None:
    bad = [
        f"{f}:{line} imports {mod}.{name}"
        for f, line, mod, names in imports_of("tools")
        if mod.split(".")[0] == "trainer"
        for name in names
        if name.startswith("_") or any(part.startswith("_") for part in mod.split("."))
    ]
    assert not bad, "\n".join(bad)


def test_the_env_server_process_loads_no_torch() -> None:
    """At run time too: starting the env server's modules (and the shared client) pulls in no torch, no trainer."""
    code = (
        "import sys, env_server.app, env_server.cli, env_server.openapi, shared.client, shared.config; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'trainer', 'tools', 'engine'}); "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_every_package_is_installed_and_has_a_command() -> None:
    """The spec's layout: each process folder is a package with a `[project.scripts]` command."""
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    scripts = meta["project"]["scripts"]
    packages = {target.split(":")[0].split(".")[0] for target in scripts.values()}
    assert {"env_server", "engine", "trainer", "tools"} <= packages, scripts
    include = meta["tool"]["setuptools"]["packages"]["find"]["include"]
    for pkg in ("shared", "env_server", "engine", "trainer", "tools"):
        assert f"{pkg}*" in include, include
        assert (REPO / pkg / "__init__.py").is_file(), pkg


TRAINER_PARTS = {
    "algo": {"algo", "learner", "engines"},
    "learner": {"learner"},
    "engines": {"engines"},
}


def trainer_part(module: str) -> str:
    """The part a `trainer...` module belongs to: its subpackage, or "loop" for a module of `trainer/` itself."""
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in TRAINER_PARTS else "loop"


@pytest.mark.parametrize("part", sorted(TRAINER_PARTS))
def test_trainer_parts_import_only_downwards(part: str) -> None:
    bad = []
    for f, line, mod, names in imports_of(f"trainer/{part}"):
        if mod.split(".")[0] != "trainer":
            continue
        # `from trainer import x` names a module of the loop, or a part
        targets = [f"trainer.{n}" for n in names] if mod == "trainer" else [mod]
        for target in targets:
            to = trainer_part(target)
            if to not in TRAINER_PARTS[part]:
                bad.append(
                    f"{f}:{line} imports {target} (part {to!r}; {part!r} may import {sorted(TRAINER_PARTS[part])})"
                )
    assert not bad, "\n".join(bad)


def test_trainer_parts_are_what_the_layout_says() -> None:
    """Every subpackage of `trainer/` is a part this test knows, and the loop's own folder keeps no part's modules."""
    subpackages = {p.parent.name for p in (REPO / "trainer").glob("*/__init__.py")}
    assert subpackages == set(TRAINER_PARTS), subpackages
    assert trainer_part("trainer.algo.step") == "algo" and trainer_part("trainer.loop") == "loop"
    assert trainer_part("trainer.learner") == "learner" and trainer_part("trainer.config") == "loop"

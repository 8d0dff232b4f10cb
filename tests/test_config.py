"""The one config mechanism (`shared/config.py`) as every program uses it: sources and their order, errors that
name the key, and a `--help` that lists every field with its documentation."""

from __future__ import annotations

import dataclasses
import io
import typing
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from shared.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_sources_in_order_defaults_toml_env_set_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.cli import parse

    toml = tmp_path / "c.toml"
    toml.write_text('[run]\nsteps = 7\nname = "from-toml"\n[optim]\nlr = 0.5\n[env]\ntoken = "toml-token"\n')
    monkeypatch.setenv("TRACE_ENV_TOKEN", "env-token")
    cfg = parse(["--config", str(toml), "--set", "optim.lr=0.25", "--steps", "9"]).cfg
    assert cfg.run.steps == 9  # flag over TOML
    assert cfg.run.name == "from-toml"  # TOML over default
    assert cfg.optim.lr == 0.25  # --set over TOML
    assert cfg.env.token == "env-token"  # env over TOML
    assert parse(["--config", str(toml), "--env.token", "flag-token"]).cfg.env.token == "flag-token"
    assert cfg.allocation.root_budget == 32 and cfg.allocation.m_max == 6  # a table merges onto the demo's defaults
    assert cfg.rollout == parse([]).cfg.rollout  # untouched sections keep their defaults


def test_the_old_short_flags_still_work(tmp_path: Path) -> None:
    from trainer.cli import parse

    short = ["--steps", "3", "--output-dir", str(tmp_path), "--allocator", "uniform", "--resume", "--name", "x"]
    urls = [
        "--env-url",
        "http://e:1",
        "--env-url",
        "http://e:2",
        "--engine-url",
        "http://a:1",
        "--engine-url",
        "http://b:1",
    ]
    args = parse([*short, "--model", str(tmp_path), *urls])
    cfg = args.cfg
    assert args.resume and cfg.run.steps == 3 and cfg.run.output_dir == str(tmp_path) and cfg.run.name == "x"
    assert cfg.allocation.type == "uniform" and cfg.model.path == str(tmp_path.resolve())
    assert cfg.env.urls == ["http://e:1", "http://e:2"] and cfg.engine.urls == ["http://a:1", "http://b:1"]
    assert parse(["--engine", "sglang"]).cfg.engine.type == "sglang"
    with pytest.raises(SystemExit):  # attaching and launching SGLang at once is refused, naming both
        parse(["--engine", "sglang", "--engine-url", "http://a:1"])


def test_errors_name_the_file_and_the_key(tmp_path: Path) -> None:
    from trainer.config import TrainConfig

    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlrr = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: unknown key 'optim\.lrr'"):
        load_config(TrainConfig, bad)
    bad.write_text('[run]\nsteps = "3"\n')  # strict: a quoted number in a file is an error, not a guess
    with pytest.raises(ConfigError, match=r"Expected `int`, got `str` - at `\$\.run\.steps`"):
        load_config(TrainConfig, bad)
    with pytest.raises(ConfigError, match=r"\[optim\] has no field 'lrr'"):
        load_config(TrainConfig, sets=["optim.lrr=1"])
    cfg = load_config(TrainConfig, sets=['run.report_to=["tensorboard"]', "run.name=2024", "model.path=/m"])
    assert (cfg.run.report_to, cfg.run.name, cfg.model.path) == (["tensorboard"], "2024", "/m")  # TOML syntax
    with pytest.raises(ConfigError, match=r"expected section\.field=value"):
        load_config(TrainConfig, sets=["optim.lr"])


def test_a_config_extends_another(tmp_path: Path) -> None:
    """`extends`: the base's values first, then the file's own, key by key; chains, relative paths, and a circle
    or a non-path are errors naming the file."""
    from trainer.config import TrainConfig, load_train_config

    (tmp_path / "sub").mkdir()
    (tmp_path / "base.toml").write_text('[run]\nsteps = 7\nname = "base"\n[optim]\nlr = 0.5\n')
    (tmp_path / "sub" / "mid.toml").write_text('extends = "../base.toml"\n[run]\nname = "mid"\n')
    leaf = tmp_path / "sub" / "leaf.toml"
    leaf.write_text('extends = "mid.toml"\n[optim]\nkl_coef = 0.25\n')
    cfg = load_config(TrainConfig, leaf)
    assert (cfg.run.steps, cfg.run.name, cfg.optim.lr, cfg.optim.kl_coef) == (7, "mid", 0.5, 0.25)
    (tmp_path / "base.toml").write_text('extends = "sub/leaf.toml"\n')
    with pytest.raises(ConfigError, match="circle"):
        load_config(TrainConfig, leaf)
    leaf.write_text("extends = 3\n")
    with pytest.raises(ConfigError, match=r"leaf\.toml: `extends` must be a path"):
        load_config(TrainConfig, leaf)
    leaf.write_text('extends = "nowhere.toml"\n')
    with pytest.raises(ConfigError, match=r"nowhere\.toml"):
        load_config(TrainConfig, leaf)
    # the shipped multi-pass regime is compare.toml with the two settings bench/run_peers.sh gives it
    epochs = load_train_config(REPO / "configs" / "compare-epochs.toml")
    sets = ["env.train_limit=300", "run.steps=94", "run.eval_every=10"]  # --set, --steps 94, --eval-every 10
    assert epochs == load_train_config(REPO / "configs" / "compare.toml", sets)
    assert epochs.env.train_limit == 300 and epochs.run.prompts_per_step * epochs.run.steps >= 5 * 300


def test_env_server_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from env_server.config import parse_serve_args

    monkeypatch.delenv("TRACE_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("TRACE_ENV_TOKEN", "t1")
    assert parse_serve_args([]).auth_token == "t1"
    monkeypatch.setenv("TRACE_AUTH_TOKEN", "older")  # the newer name wins over the older one
    assert parse_serve_args([]).auth_token == "t1"
    assert parse_serve_args(["--auth-token", "flag"]).auth_token == "flag"  # and a flag over both
    monkeypatch.delenv("TRACE_ENV_TOKEN")
    assert parse_serve_args([]).auth_token == "older"


def test_env_server_data_pairs_in_both_spellings(tmp_path: Path) -> None:
    from env_server.config import parse_serve_args

    q = tmp_path / "q.jsonl"
    q.write_text('{"id": "1", "question": "q", "golden_answers": ["a"]}\n')
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "d", "contents": "\\"T\\"\\ntext"}\n')
    argv = ["--data", f"a={q}", f"--data=b:dev={q}", "--data", "c", str(q), "--corpus", str(corpus)]
    assert parse_serve_args(argv).data == {"a": str(q), "b:dev": str(q), "c": str(q)}


def _fields(cls: type, prefix: str = "") -> list[tuple[str, type]]:
    out = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            out += _fields(hint, "" if f.name in ("agent_cfg",) else f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", hint))
    return out


@pytest.mark.parametrize(
    ("module", "argv", "cls_path"),
    [
        ("trainer.cli", ["--help"], "trainer.config:TrainConfig"),
        ("trainer.cli", ["eval", "--help"], "trainer.config:TrainConfig"),
        ("env_server.cli", ["serve", "--help"], "env_server.config:ServerConfig"),
        ("engine.cli", ["serve", "--help"], "engine.cli:ServeConfig"),
        ("tools.eval.cli", ["--help"], "tools.eval.runner:EvalConfig"),
        ("env_server.cli", ["index", "--help"], "env_server.cli:IndexConfig"),
        ("tools.synthetic", ["--help"], "tools.synthetic:WorldConfig"),
        ("tools.tiny_model", ["--help"], "tools.tiny_model:TinyModelConfig"),
    ],
)
def test_help_lists_every_field_with_its_doc(module: str, argv: list[str], cls_path: str) -> None:
    import importlib

    main = importlib.import_module(module).main
    mod_name, cls_name = cls_path.split(":")
    cls = getattr(importlib.import_module(mod_name), cls_name)
    buf = io.StringIO()
    with redirect_stdout(buf), pytest.raises(SystemExit) as exc:
        rc = main(argv)
        raise SystemExit(rc)
    assert exc.value.code in (0, None)
    text = buf.getvalue()
    for name, _ in _fields(cls):
        flag = "--" + name.replace("_", "-")
        assert flag in text, f"{flag} missing from {module} {argv}"
    assert "--config" in text
    # a docstring shows up (the first words of one field's doc)
    first = dataclasses.fields(cls)[0].name
    assert first.replace("_", "-") in text


def test_a_repeated_flag_replaces_the_files_list_and_an_env_var_splits_at_commas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--env-url A --env-url B` gives the replicas; the file's urls are replaced, not extended (tyro's append
    action adds to the default); $TRACE_ENV_URL for trace-eval takes several, comma-separated."""
    from tools.eval.cli import ENV_VARS
    from tools.eval.runner import EvalConfig
    from trainer.cli import parse

    toml = tmp_path / "c.toml"
    toml.write_text('[env]\nurls = ["http://file:1"]\n[engine]\nurls = ["http://file:2"]\n')
    assert parse(["--config", str(toml)]).cfg.env.urls == ["http://file:1"]
    cfg = parse(["--config", str(toml), "--env-url", "http://a:1", "--env-url", "http://b:1"]).cfg
    assert cfg.env.urls == ["http://a:1", "http://b:1"] and cfg.engine.urls == ["http://file:2"]
    assert parse(["--config", str(toml), "--engine-url", "http://c:1"]).cfg.engine.urls == ["http://c:1"]
    monkeypatch.setenv("TRACE_ENV_URL", "http://a:1, http://b:1")
    got = load_config(EvalConfig, None, env_vars=ENV_VARS)
    assert got.env_urls == ["http://a:1", "http://b:1"]

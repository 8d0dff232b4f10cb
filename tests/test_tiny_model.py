"""The tiny Qwen3 model folder: loads with the Auto classes, ChatML template, single-token tags, short names,
deterministic from its seed (tools/tiny_model.py)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tools.synthetic import generate_world
from tools.tiny_model import ACTION_TAGS, IM_END, IM_START, PAD_TOKEN, build_tiny_model, main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=0)


def test_reloads_with_auto_classes(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.model_type == "qwen3" and model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tok) == 2048
    n_params = sum(p.numel() for p in model.parameters())
    assert 2_000_000 < n_params < 6_000_000, n_params
    assert tok.eos_token == IM_END and tok.pad_token == PAD_TOKEN
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.generation_config.eos_token_id == [tok.eos_token_id]
    ids = tok("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 2048) and torch.isfinite(logits).all()


def test_chat_template_is_chatml(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n"
    no_gen = tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
    assert not no_gen.endswith("assistant\n")
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids(IM_START) and ids.count(tok.eos_token_id) == 2


def test_tags_are_single_tokens_and_survive_decoding(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    for i, tag in enumerate(ACTION_TAGS):
        assert tok.encode(tag, add_special_tokens=False) == [3 + i], tag
    text = "<think>go</think>\n<search> Makre Molha </search>"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.convert_tokens_to_ids("</search>") == ids[-1]
    assert tok.decode(ids, skip_special_tokens=True) == text  # tags are not "special": text keeps them
    chat = tok.decode(tok.encode(f"{IM_START}user\nhi{IM_END}", add_special_tokens=False), skip_special_tokens=True)
    assert chat == "user\nhi"


def test_entity_names_are_short_in_tokens(model_dir: Path) -> None:
    """DESIGN's feasibility lesson: names of one or two tokens are copied reliably, longer ones are not."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    world = generate_world(seed=0, size=300)
    lens = [len(tok.encode(" " + p.title, add_special_tokens=False)) for p in world.passages]
    mean = statistics.mean(lens)
    share_short = sum(n <= 2 for n in lens) / len(lens)
    assert mean <= 2.2, f"mean tokens per entity name {mean:.2f}"
    assert share_short >= 0.9, f"only {share_short:.0%} of names are 1-2 tokens"


def test_deterministic_from_seed(model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name
    other = build_tiny_model(tmp_path / "other", seed=1, texts=["tiny text about Makre Molha"] * 4, vocab_size=300)
    assert (other / "model.safetensors").read_bytes() != (model_dir / "model.safetensors").read_bytes()


def test_cli_main(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path / "cli"), "--seed", "3", "--vocab-size", "512"]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "cli")
    assert len(tok) == 512
    weights = (tmp_path / "cli" / "model.safetensors").read_bytes()
    # a user-side audit: an existing model was overwritten silently; sizes the model cannot have were tracebacks
    (tmp_path / "a-file").write_text("x")
    for argv in (
        ["--out", str(tmp_path / "cli"), "--seed", "4"],
        ["--out", str(tmp_path / "a-file")],
        ["--out", str(tmp_path / "z"), "--hidden-size", "0"],
        ["--out", str(tmp_path / "z"), "--hidden-size", "30"],
        ["--out", str(tmp_path / "z"), "--hidden-size", "12"],  # heads of 3: rotary embeddings need an even size
        ["--out", str(tmp_path / "z"), "--layers", "0"],
    ):
        assert main(argv) == 2, argv
    assert (tmp_path / "cli" / "model.safetensors").read_bytes() == weights and not (tmp_path / "z").exists()
    assert main(["--out", str(tmp_path / "cli"), "--seed", "4", "--vocab-size", "512", "--overwrite"]) == 0
    assert (tmp_path / "cli" / "model.safetensors").read_bytes() != weights


def test_cli_trains_the_tokenizer_on_a_world_folder(tmp_path: Path, capsys) -> None:
    """The tokenizer's texts come from files when asked (`--world DIR`), and a folder that is no world fails loudly
    instead of falling back to other text (the old silent fallback of trainer/tiny_model.py)."""
    from tools.synthetic import write_world

    write_world(generate_world(seed=0, size=60), tmp_path / "w")
    assert main(["--out", str(tmp_path / "m"), "--world", str(tmp_path / "w"), "--vocab-size", "512"]) == 0
    assert main(["--out", str(tmp_path / "m2"), "--world", str(tmp_path), "--vocab-size", "512"]) == 2
    assert "not a synthetic world folder" in capsys.readouterr().err
    assert not (tmp_path / "m2" / "model.safetensors").exists()


def test_every_seed_learns_the_served_worlds_names(tmp_path: Path, monkeypatch) -> None:
    """Regression: `model.tiny_seed` also chose the tokenizer's world, so a seed other than 0 learned the names of
    another world than the one the env server serves (seed 0) and split them into more tokens. The trainer now
    trains every seed's tokenizer on the served world; the seed still changes the weights."""
    from trainer import services
    from trainer.config import TrainConfig

    monkeypatch.setenv("TRACE_CACHE_DIR", str(tmp_path))
    cfg = TrainConfig()
    cfg.model.tiny_seed = 1
    d = services.tiny_model_dir(cfg)
    assert d.name == "tiny-model-s1-world-n300"  # never an older release's tiny-model-s1 (another tokenizer)
    tok = AutoTokenizer.from_pretrained(d)
    titles = [
        json.loads(line)["contents"].split("\n")[0].strip('"')
        for line in open(services.world_dir(cfg) / "corpus.jsonl")
    ]
    lens = [len(tok.encode(" " + t, add_special_tokens=False)) for t in titles]
    assert statistics.mean(lens) <= 2.2, f"mean tokens per served entity name {statistics.mean(lens):.2f}"
    seed0 = build_tiny_model(tmp_path / "s0", seed=0)
    assert (d / "tokenizer.json").read_bytes() == (seed0 / "tokenizer.json").read_bytes()
    assert (d / "model.safetensors").read_bytes() != (seed0 / "model.safetensors").read_bytes()


def test_a_held_out_world_is_served_and_named_apart(tmp_path: Path, monkeypatch) -> None:
    """env.heldout_frac reaches the world the trainer's env server serves, and the tiny model trained on that
    world's texts gets a cache folder of its own."""
    from trainer import services
    from trainer.config import load_train_config

    monkeypatch.setenv("TRACE_CACHE_DIR", str(tmp_path))
    cfg = load_train_config(None, ["env.heldout_frac=0.3"])
    world = services.world_dir(cfg)
    assert json.loads((world / "manifest.json").read_text())["heldout_frac"] == 0.3
    assert services.tiny_model_dir(cfg).name == "tiny-model-s0-world-n300-h0.3"
    with pytest.raises(ValueError, match="heldout_frac"):
        load_train_config(None, ["env.heldout_frac=1.0"])

"""A tiny Qwen3-architecture causal LM and its BPE tokenizer, built offline in seconds (DESIGN §3 "Embedded default").

`build_tiny_model(out_dir)` writes a standard Hugging Face Qwen3 folder — `config.json`,
`model.safetensors`, `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`,
`chat_template.jinja` — that `AutoModelForCausalLM/AutoTokenizer.from_pretrained(dir)` load and
that SGLang can serve (it is the same architecture class and file layout as a Qwen3 checkpoint).
Nothing is downloaded: the weights are a seeded random init and the tokenizer is trained here.

Contracts:
- Deterministic: the same arguments (seed, texts, sizes) give byte-identical `tokenizer.json` and
  `model.safetensors`.
- Token ids 0..10 are fixed, whatever the texts: `<|endoftext|>` (pad, bos), `<|im_start|>`,
  `<|im_end|>` (eos; generation stops on it), then the Search-R1 action tags `<think>`,
  `</think>`, `<search>`, `</search>`, `<answer>`, `</answer>`, `<information>`,
  `</information>`, each ONE token (so an engine can stop on the `</search>`/`</answer>` id).
  The three ChatML markers are special (dropped by `decode(skip_special_tokens=True)`); the tags
  are ordinary added tokens, as `<think>` is in Qwen3's tokenizer, so decoded text keeps them.
- The chat template is Qwen's ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message,
  `<|im_start|>assistant\\n` when `add_generation_prompt`.

Why the sizes: hidden 256, 4 layers, 4 query / 2 KV heads (head_dim 64), MLP 704 and a 2,048-token
vocabulary give ~3.4M parameters, the size DESIGN measured on these 2-core machines (320 tok/s at
batch 1, a 16x256 train step in 0.65 s). The vocabulary is the lesson of DESIGN's feasibility run:
with 1,024 tokens most entity names took 3+ tokens and the model miscopied them into its search
queries; at 2,048, trained on the synthetic world's own text, a name is one or two tokens.
`max_position` 4,096 covers a 4-turn episode with retrieved passages.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
ACTION_TAGS = (
    "<think>",
    "</think>",
    "<search>",
    "</search>",
    "<answer>",
    "</answer>",
    "<information>",
    "</information>",
)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The tokenizer's text: the seed's synthetic world at its default size (names of other sizes' worlds share the
# same word generator, so their names tokenize alike).
_SYNTHETIC_WORLD_SIZE = 300


def default_texts(seed: int = 0) -> list[str]:
    """The text the default tokenizer is trained on: the synthetic world's passages, questions and oracle queries
    (`tools.synthetic.world_texts`), so its entity names get their own tokens."""
    from tools.synthetic import generate_world, world_texts

    return list(world_texts(generate_world(seed=seed, size=_SYNTHETIC_WORLD_SIZE)))


def train_tokenizer(texts: Sequence[str], vocab_size: int = 2048) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2/Qwen style, no unknown tokens) with the special tokens and
    action tags at fixed ids 0..10. The tags are removed from the training text so no merge is
    spent on pieces of them; they are matched whole before BPE runs."""
    reserved = len(SPECIAL_TOKENS) + len(ACTION_TAGS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < reserved + len(alphabet) + 1:
        raise ValueError(f"vocab_size={vocab_size} too small: needs > {reserved + len(alphabet)} (reserved + bytes)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[*SPECIAL_TOKENS, *ACTION_TAGS],
        initial_alphabet=alphabet,
        show_progress=False,
    )

    def stripped() -> Iterable[str]:
        for t in texts:
            for tag in ACTION_TAGS:
                t = t.replace(tag, " ")
            yield t

    tok.train_from_iterator(stripped(), trainer=trainer, length=len(texts))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ACTION_TAGS])
    for i, t in enumerate((*SPECIAL_TOKENS, *ACTION_TAGS)):
        got = tok.token_to_id(t)
        assert got == i, f"token {t!r} has id {got}, expected {i}"
    return tok


def build_tiny_model(
    out_dir: Path,
    *,
    seed: int = 0,
    texts: Iterable[str] | None = None,
    vocab_size: int = 2048,
    hidden_size: int = 256,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    max_position: int = 4096,
) -> Path:
    """Build and save a tiny random-init Qwen3 model and its tokenizer to `out_dir`; returns `out_dir`.

    `texts` (default: the synthetic world's text for `seed`) trains the tokenizer. The model's
    `vocab_size` equals the tokenizer's size, which is `vocab_size` unless the texts are too small
    to learn that many merges.
    """
    if hidden_size % heads or heads % kv_heads:
        raise ValueError(f"hidden_size={hidden_size} must divide by heads={heads}, heads by kv_heads={kv_heads}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(list(texts) if texts is not None else default_texts(seed), vocab_size=vocab_size)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None,
        model_max_length=max_position,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out_dir)

    pad_id, eos_id = tok.token_to_id(PAD_TOKEN), tok.token_to_id(IM_END)
    config = Qwen3Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=_mlp_size(hidden_size),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden_size // heads,
        max_position_embeddings=max_position,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.eval()
    # Only EOS: sampling settings are always sent explicitly (SGLang's "model" defaults trap).
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=[eos_id], pad_token_id=pad_id)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "trace_tiny_model.json").write_text(
        json.dumps({"seed": seed, "vocab_size": vocab_size, "n_params": sum(p.numel() for p in model.parameters())})
    )
    return out_dir


def _mlp_size(hidden_size: int) -> int:
    """SwiGLU width ~8/3 x hidden, rounded up to a multiple of 64 (704 for 256), as Llama/Qwen do."""
    return -(-(hidden_size * 8 // 3) // 64) * 64


@dataclass
class TinyModelConfig:
    """`trace-tiny-model`'s config: where to write the model, and its sizes."""

    out: Path | None = None
    """Folder to write the model into. Required."""
    seed: int = 0
    """Weights init and synthetic-world seed."""
    world: Path | None = None
    """Train the tokenizer on this synthetic world folder (`trace-world --out`); default: generate the seed's."""
    vocab_size: int = 2048
    """BPE vocabulary size."""
    hidden_size: int = 256
    layers: int = 4
    max_position: int = 4096
    overwrite: bool = False
    """Replace a model already in --out (without it, a folder that holds one is refused)."""

    def validate(self) -> TinyModelConfig:
        if self.out is None:
            raise ValueError("--out DIR is required")
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file: give a folder")
        if (self.out / "config.json").exists() and not self.overwrite:
            raise ValueError(f"--out {self.out} already holds a model: give another folder, or --overwrite")
        if self.hidden_size < 8 or self.hidden_size % 8 or min(self.layers, self.vocab_size, self.max_position) < 1:
            raise ValueError(
                f"--hidden-size ({self.hidden_size}) must be a positive multiple of 8 (4 heads of an even size: "
                "rotary embeddings pair a head's dimensions), --layers "
                f"({self.layers}), --vocab-size ({self.vocab_size}) and --max-position ({self.max_position}) >= 1"
            )
        return self


def main(argv: list[str] | None = None) -> int:
    """`trace-tiny-model --out DIR [--seed S] [--world DIR] [--vocab-size V]`: build the tiny model offline."""
    from shared.config import parse_config

    try:
        cfg = parse_config(TinyModelConfig, argv, prog="trace-tiny-model", description=__doc__.split("\n")[0])
    except SystemExit as e:
        return int(e.code or 0)
    texts = None
    if cfg.world is not None:
        from tools.synthetic import read_world_texts

        try:
            texts = read_world_texts(cfg.world)
        except FileNotFoundError as e:
            print(f"trace-tiny-model: {e}", file=sys.stderr)
            return 2
    assert cfg.out is not None
    out = build_tiny_model(
        cfg.out,
        seed=cfg.seed,
        texts=texts,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        layers=cfg.layers,
        max_position=cfg.max_position,
    )
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def build_shaped_model(out_dir: Path, *, dtype: str = "float32", seed: int = 0, **config: Any) -> tuple[Path, int]:
    """A Qwen3 model of any shape (`config`: Qwen3Config's fields, e.g. a real vocabulary_size), random weights
    (torch seed `seed`), stored in `dtype`, with the tiny model's tokenizer files beside it (their vocabulary is
    smaller than the model's: benches feed token ids directly). Offline; for the memory and weight-sync benches.
    Returns the folder and the parameter count."""
    out_dir = Path(out_dir)
    tiny = build_tiny_model(out_dir.parent / f"{out_dir.name}-tokenizer", seed=seed)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**config)).to(getattr(torch, dtype))
    model.save_pretrained(out_dir)
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out_dir / f.name)
    return out_dir, sum(p.numel() for p in model.parameters())

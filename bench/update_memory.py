"""Peak memory of one `Policy.rl_update` at a fixed token budget, with the chunked LM head (issue 21) and with the
whole-logits head it replaced, in one process on the CPU.

    python bench/update_memory.py --out runs/update_memory.json     # ~2 min on 2 cores

The model is Qwen3-shaped with Qwen3's real vocabulary (151,936) and a small body (hidden 512, 4 layers, tied
embeddings: ~90M parameters), built offline from a config, so the LM head weighs in it as it does at 8B. The update
trains 8 samples of 1,024 tokens, the last 512 of each trained, in micro-batches of optim.micro_batch_tokens = 4,096
padded tokens (4 rows): the same micro-batches either way. "Before" is the same policy with its head turned back into
the plain `nn.Linear` (`sequence_logprobs` then takes the whole [rows x positions x vocabulary] logits, as the code
did before). Peaks are counted by `memory_plan.new_storage_peak` (every tensor storage the update creates, until it
is freed), less the gradients the update allocates (4 bytes a parameter, the same either way): what the update's
activations and transients take. The figures are ratios in one process; wall time is printed as well (noisy)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _memory_plan() -> Any:
    spec = importlib.util.spec_from_file_location("memory_plan", REPO / "bench" / "memory_plan.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["memory_plan"] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def build_model(root: Path, vocab: int = 151936) -> Path:
    """A Qwen3-shaped model with a real-size vocabulary and a small body (tied embeddings), random weights."""
    from tools.tiny_model import build_shaped_model

    cfg = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8)
    cfg |= dict(num_key_value_heads=4, head_dim=64, tie_word_embeddings=True)
    return build_shaped_model(root / "model", vocab_size=vocab, **cfg)[0]


def samples(n: int = 8, length: int = 1024, vocab: int = 151936) -> list[Any]:
    """n samples of `length` tokens, the last half trained (memory_plan's `tiny_samples` over the whole vocabulary)."""
    return _memory_plan().tiny_samples(n, length=length, vocab=vocab, trained_frac=0.5)


def measure(model_dir: Path, budget: int) -> dict[str, Any]:
    from torch import nn

    from trainer.learner.config import ModelConfig, OptimConfig
    from trainer.learner.loss import LogprobHead
    from trainer.learner.policy import Policy

    mp = _memory_plan()
    batch = samples()
    out: dict[str, Any] = {"budget_tokens": budget, "samples": len(batch), "tokens": sum(len(s) for s in batch)}
    for head in ("full", "chunked"):
        pol = Policy(
            model_dir,
            ModelConfig(device="cpu", mixed_precision="no"),
            OptimConfig(lr=1e-5, micro_batch_size=64, micro_batch_tokens=budget),
        )
        model = pol.accelerator.unwrap_model(pol.model)
        assert isinstance(model.lm_head, LogprobHead)
        if head == "full":
            model.lm_head.__class__ = nn.Linear
        n = sum(p.numel() for p in model.parameters())
        pol.rl_update(batch)  # optimizer state and gradients exist from here on, as in training
        existing = [*model.parameters(), *model.buffers()]
        existing += [v for st in pol.optimizer.state.values() for v in st.values()]
        t0 = time.perf_counter()
        peak = mp.new_storage_peak(lambda pol=pol: pol.rl_update(batch), iter(existing)) - 4 * n
        out[head] = {"peak_bytes": peak, "seconds": time.perf_counter() - t0, "params": n}
        print(f"{head:8s} head: update peak {peak / 1e9:.3f} GB above the states, {out[head]['seconds']:.1f} s")
        del pol, model
    out["peak_ratio_chunked_over_full"] = out["chunked"]["peak_bytes"] / out["full"]["peak_bytes"]
    print(f"chunked / full peak: {out['peak_ratio_chunked_over_full']:.3f}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--budget", type=int, default=4096, help="optim.micro_batch_tokens")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        result = measure(build_model(Path(d)), args.budget)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

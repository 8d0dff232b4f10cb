"""How much the entropy allocator's signal loses to top-k truncation (issue 25), on the testbed's own trajectories.

    python bench/bench_topk_entropy.py [--model DIR ...] [--config configs/compare.toml] [--examples 120]
        [--tokens 10] [--top 5,20,50] --out runs/bench_topk_entropy.json

The "entropy" allocator ranks anchors by a turn's entropy computed from the engine's top logprobs
(`trainer.algo.allocation.topk_entropy`: the top n, plus the rest of the mass as one lump). This plays `--examples`
oracle and flawed episodes of the dev split through a real env server (`trainer.sft.oracle_examples`, half of the
bridge questions answered early, as the warm start's data), and for every action that follows a tool result (the
turns whose entropy the allocator reads) compares, over its first `--tokens` tokens (teacher-forced, temperature 1,
float64): the full-vocabulary entropy H against topk_entropy at each n. Per model and n it prints the mean mass
outside the top n, the mean and largest H - topk_entropy (never negative), and how well the truncated entropy ranks
the turns as H does: Spearman's rho, and the share of the top quarter by H that the truncated entropy's top quarter
finds (what a top-K selection keeps). Models: the compare config's SFT warm start and its untrained tiny model by
default, or each --model folder (e.g. a run's weights/vN).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer import services
from trainer.algo.allocation import topk_entropy
from trainer.config import load_train_config
from trainer.sft import oracle_examples


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    for rank, i in enumerate(order):
        r[i] = float(rank)
    return r


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va and vb else float("nan")


def turns_after_tool_results(mask: list[float]) -> list[int]:
    """Start positions of the action spans (mask 1) that follow an observation, i.e. all but the first span."""
    starts = [i for i, m in enumerate(mask) if m == 1 and (i == 0 or mask[i - 1] != 1)]
    return starts[1:]


@torch.no_grad()
def measure(model_dir: Path, examples: list[Any], tokens: int, tops: list[int]) -> dict[str, Any]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    full: list[float] = []
    trunc: dict[int, list[float]] = {n: [] for n in tops}
    tail: dict[int, list[float]] = {n: [] for n in tops}
    for ex in examples:
        starts = turns_after_tool_results(ex.loss_mask)
        if not starts:
            continue
        logits = model(torch.tensor([ex.input_ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        for s in starts:
            end = s
            while end < len(ex.loss_mask) and ex.loss_mask[end] == 1 and end - s < tokens:
                end += 1
            rows = logp[s - 1 : end - 1]  # the distributions the turn's first tokens were drawn from
            full.append(float((-(rows.exp() * rows).sum(-1)).mean()))
            for n in tops:
                top = rows.topk(n, -1).values
                trunc[n].append(sum(topk_entropy(r) for r in top.tolist()) / len(top))
                tail[n].append(float((1.0 - top.exp().sum(-1)).clamp(min=0.0).mean()))
    q = max(1, len(full) // 4)
    best = set(sorted(range(len(full)), key=lambda i: -full[i])[:q])
    out: dict[str, Any] = {"turns": len(full), "entropy_mean": sum(full) / len(full), "vocab": model.config.vocab_size}
    for n in tops:
        gap = [h - t for h, t in zip(full, trunc[n], strict=True)]
        found = set(sorted(range(len(full)), key=lambda i: -trunc[n][i])[:q])
        out[f"top{n}"] = {
            "tail_mass_mean": sum(tail[n]) / len(tail[n]),
            "gap_mean": sum(gap) / len(gap),
            "gap_max": max(gap),
            "gap_min": min(gap),
            "spearman": spearman(full, trunc[n]),
            "top_quarter_found": len(best & found) / q,
        }
    return out


async def examples_of(cfg: Any, tok: Any, count: int, log_dir: Path) -> list[Any]:
    async with services.env_client(cfg, log_dir) as env:
        return await oracle_examples(
            env,
            tok,
            dataset=cfg.env.dataset,
            split=cfg.env.eval_split,
            count=count,
            max_context_tokens=cfg.rollout.max_context_tokens,
            seed=1,
            flawed_frac=0.5,
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "compare.toml"))
    p.add_argument("--model", action="append", default=[], help="model folder(s); default: warm start + untrained")
    p.add_argument("--examples", type=int, default=120)
    p.add_argument("--tokens", type=int, default=10, help="a turn's first tokens (allocation.entropy_tokens)")
    p.add_argument("--top", default="5,20,50", help="top-n logprobs to truncate at (allocation.entropy_top_k)")
    p.add_argument("--out", default="runs/bench_topk_entropy.json")
    args = p.parse_args()
    cfg = load_train_config(Path(args.config), [])
    tiny = services.tiny_model_dir(cfg)
    models = [Path(m) for m in args.model]
    if not models:
        warm = services.sft_dir(cfg, tiny)
        if not (warm / "config.json").exists():
            raise SystemExit(f"no SFT warm start at {warm}: run the compare config once (trace-train --config ...)")
        models = [warm, tiny]
    tok = AutoTokenizer.from_pretrained(models[0])
    out_path = Path(args.out)
    examples = asyncio.run(examples_of(cfg, tok, args.examples, out_path.parent))
    tops = [int(x) for x in args.top.split(",")]
    result: dict[str, Any] = {"config": args.config, "examples": len(examples), "tokens": args.tokens, "models": {}}
    for m in models:
        r = measure(m, examples, args.tokens, tops)
        result["models"][str(m)] = r
        print(f"{m}: {r['turns']} turns after a tool result, mean entropy {r['entropy_mean']:.3f} nats")
        for n in tops:
            x = r[f"top{n}"]
            print(
                f"  top {n:>3}: tail mass {x['tail_mass_mean']:.3f}, H - topk {x['gap_mean']:.3f} mean"
                f" [{x['gap_min']:.3f}, {x['gap_max']:.3f}], Spearman {x['spearman']:.3f},"
                f" top quarter found {x['top_quarter_found']:.2f}"
            )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

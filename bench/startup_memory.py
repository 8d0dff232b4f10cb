"""Host memory of each training rank while it builds the policy under FSDP2, on 2 gloo ranks: with the followers
building their model on the meta device (issue 21) and as before, every rank loading the checkpoint.

    python bench/startup_memory.py --out runs/startup_memory.json     # ~1 min on 2 cores

The model is Qwen3-shaped, built offline and stored in bf16 as Qwen3 checkpoints are (hidden 1024, 16 layers,
vocabulary 32,768, untied head: ~0.27B parameters, 1.07 GB in float32, the dtype the policy trains in); its
decoder layers outweigh its embeddings, as at 8B. Each rank reports its peak resident set (ru_maxrss) after `Policy(...)` returns, less
its resident set before (torch, transformers and the process group already imported and up): what building the
policy took. "before" runs the same code with the followers' model loaded from the checkpoint
(`_build_model(..., empty=False)` on every rank), as the code did before."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from tools.procmem import rss_bytes  # noqa: E402
from trainer.learner.distributed import FSDP2_ENV  # noqa: E402


def build_model(root: Path) -> tuple[Path, int]:
    """The model folder (stored in bf16) and its parameter count."""
    from tools.tiny_model import build_shaped_model

    cfg = dict(vocab_size=32768, hidden_size=1024, intermediate_size=3072, num_hidden_layers=16)
    cfg |= dict(num_attention_heads=16, num_key_value_heads=8, head_dim=64, tie_word_embeddings=False)
    return build_shaped_model(root / "model", dtype="bfloat16", **cfg)


def worker(model: str, mode: str, out: str) -> None:
    """One rank (under torchrun): build the policy (rank 0 leads, the follower joins through `follow`, as in
    training), then write what building it took to `out`.rank<N>.json."""
    from trainer.learner import policy as pol_mod
    from trainer.learner.config import ModelConfig, OptimConfig
    from trainer.learner.distributed import Ranks, follow

    ranks = Ranks.start(cpu=True)
    if mode == "before":  # every rank loads the checkpoint, as before issue 21
        build = pol_mod._build_model
        pol_mod._build_model = lambda path, dtype, empty: build(path, dtype, empty=False)
    before = rss_bytes() // 1024
    shard = 0
    if ranks.leader:
        policy = pol_mod.Policy(model, ModelConfig(device="cpu"), OptimConfig())
        shard = sum(p.to_local().numel() * 4 for p in policy.model.parameters())
        ranks.stop()
    else:
        follow(ranks)  # builds the same policy when rank 0 announces it, returns at stop
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux: the peak over the process's life
    row = {"rank": ranks.rank, "built_peak_gb": (peak - before) * 1024 / 1e9, "shard_gb": shard / 1e9}
    Path(f"{out}.rank{ranks.rank}.json").write_text(json.dumps(row))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    result: dict = {}
    with tempfile.TemporaryDirectory() as d:
        model, n = build_model(Path(d))
        result["model_fp32_gb"] = 4 * n / 1e9
        print(f"model: {n:,} parameters, {4 * n / 1e9:.2f} GB in float32")
        for mode in ("before", "after"):
            out = Path(d) / f"{mode}.json"
            env = {**os.environ, "OMP_NUM_THREADS": "1", **FSDP2_ENV}
            env["FSDP_AUTO_WRAP_POLICY"] = "TRANSFORMER_BASED_WRAP"
            env.pop("WORLD_SIZE", None)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
            cmd += [__file__, "--worker", str(model), mode, str(out)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=REPO)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            result[mode] = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
            for row in result[mode]:
                print(f"{mode:6s} rank {row['rank']}: building the policy took {row['built_peak_gb']:.2f} GB of host "
                      "memory at its peak")  # fmt: skip
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:5])
    else:
        raise SystemExit(main())

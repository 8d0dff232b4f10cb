"""The policy's weight hand-off on 2 gloo ranks under FSDP2 (issue 23): rank 0's extra host memory and the time
of `Policy.save` (the loop's disk path, and a checkpoint's export) streamed bucket by bucket, against the code as
it was: the whole state dict gathered to rank 0's CPU (`get_model_state_dict`, full, CPU offload), cast, then
`save_pretrained`.

    python bench/bench_policy_weights.py --out runs/bench_policy_weights.json [--repeats 2] [--small]
    python bench/bench_policy_weights.py --out runs/bench_checkpoints.json --small --checkpoints

The model is Qwen3-shaped, built offline and stored in bf16 (hidden 1024, 28 layers, MLP 3072, 16/8 heads of 128,
vocabulary 151,936, untied head: ~0.75B parameters; `--small`: 8 layers, vocabulary 32,768, ~0.2B, for a quick
look); the policy trains it in float32, so the engines' bf16 copy is 1.5 GB. Each rank is a torchrun process;
rank 0 samples its resident set (VmRSS, every 5 ms on a thread) during each save and reports the peak above what
it held just before, and the save's seconds, per GB of bf16 weights written. The two paths alternate, `--repeats`
rounds; each writes into a fresh folder. With `--checkpoints`, after one update (so AdamW's state exists; `--small`
on a 23 GB host: the 0.75B model's update and gathered optimizer state do not fit beside other work), a
checkpoint's policy calls before (the optimizer's state gathered whole to rank 0 and `torch.save`d, plus the export) and since
(`save_state`, each rank writing its shards, plus the streamed export): seconds, disk, rank 0's extra host memory.
On CPU the "device" is the host, so the streamed path's figure includes
each gathered tensor (float32) while its bucket is cast: on a GPU those live on the device. Benchmarks are not tests:
2 shared cores, expect +-30%.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from tools.procmem import PeakRSS  # noqa: E402
from trainer.learner.distributed import FSDP2_ENV  # noqa: E402


def build_model(root: Path, small: bool) -> tuple[Path, int]:
    from tools.tiny_model import build_shaped_model

    cfg = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8, head_dim=128)
    cfg |= dict(num_hidden_layers=8, vocab_size=32768) if small else dict(num_hidden_layers=28, vocab_size=151936)
    return build_shaped_model(root / "model", dtype="bfloat16", tie_word_embeddings=False, **cfg)


def old_save(self, out_dir: str) -> None:  # the code before issue 23, as a Policy method
    import copy

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    self.ranks.announce("old_save", out_dir=out_dir)
    with self.lock:
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.ranks.leader:
            return
        weights = {k: t.to(self.save_dtype, copy=True).detach().cpu() for k, t in state.items()}
        del state
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        model.save_pretrained(out, state_dict=weights, safe_serialization=True)
        config = copy.deepcopy(model.config)
        config.dtype = self.save_dtype
        config.save_pretrained(out)


def old_checkpoint(self, folder: str) -> None:  # the checkpoint before issue 23: optimizer gathered, + the export
    import torch

    state = self.optimizer_state()  # gathered whole to rank 0's CPU (the followers join it)
    if self.ranks.leader:
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(folder) / "optimizer.pt")
    del state
    self.old_save(str(Path(folder) / "model"))


def new_checkpoint(self, folder: str) -> None:  # checkpoint.save_checkpoint's policy calls since issue 23
    self.save_state(Path(folder) / "state")
    self.save(Path(folder) / "model")


def _disk(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def worker(model: str, out: str, repeats: int, checkpoints: bool) -> None:
    from trainer.learner.config import ModelConfig, OptimConfig
    from trainer.learner.distributed import Ranks, follow
    from trainer.learner.policy import Policy

    Policy.old_save = old_save  # type: ignore[attr-defined]  # on every rank: the followers join it by name
    ranks = Ranks.start(cpu=True)
    if not ranks.leader:
        follow(ranks)
        return
    policy = Policy(model, ModelConfig(device="cpu"), OptimConfig())
    gb = sum(p.numel() for p in policy.model.parameters()) * 2 / 1e9  # bf16 bytes written (no tied head here)
    work = Path(out).parent / "saves"
    from trainer.learner.samples import TrainSample

    rows: dict[str, list[dict]] = {"before": [], "streamed": []}
    ckpt: dict[str, list[dict]] = {"before": [], "sharded": []}
    mask = [0, 0, 1, 1, 1, 1]
    sample = TrainSample([5, 6, 7, 8, 9, 10], mask, [1.0 * m for m in mask], [1.0 * m for m in mask],
                         [-3.0 * m for m in mask], prompt_id="p", tree_index=0, leaf_id=1)  # fmt: skip
    if checkpoints:  # AdamW's state exists from here: what a checkpoint holds (one sample each rank)
        policy.rl_update([sample, sample])
    for r in range(repeats if not checkpoints else 0):
        for mode in ("before", "streamed"):
            folder = work / f"{mode}-{r}"
            shutil.rmtree(folder, ignore_errors=True)
            with PeakRSS() as pk:
                t0 = time.perf_counter()
                policy.old_save(str(folder)) if mode == "before" else policy.save(folder)
                secs = time.perf_counter() - t0
            rows[mode].append({"extra_host_gb": pk.above / 1e9, "seconds": secs, "s_per_gb": secs / gb})
            shutil.rmtree(folder, ignore_errors=True)
            print(f"{mode} round {r}: +{pk.above / 1e9:.2f} GB, {secs:.1f} s", flush=True)
    for r in range(repeats if checkpoints else 0):
        for mode in ("before", "sharded"):
            folder = work / f"ckpt-{mode}-{r}"
            shutil.rmtree(folder, ignore_errors=True)
            with PeakRSS() as pk:
                t0 = time.perf_counter()
                (old_checkpoint if mode == "before" else new_checkpoint)(policy, str(folder))
                secs = time.perf_counter() - t0
            ckpt[mode].append({"extra_host_gb": pk.above / 1e9, "seconds": secs, "disk_gb": _disk(folder) / 1e9})
            shutil.rmtree(folder, ignore_errors=True)
            print(f"checkpoint {mode} round {r}: +{pk.above / 1e9:.2f} GB, {secs:.1f} s", flush=True)
    ranks.stop()
    res = {
        "checkpoint_rows": ckpt,
        **{
            f"checkpoint_{m}": {k: statistics.median(x[k] for x in rs) for k in ("extra_host_gb", "seconds", "disk_gb")}
            for m, rs in ckpt.items()
            if rs
        },
        "weights_gb_bf16": gb,
        "bucket_gb": policy.bucket_bytes / 1e9,
        "largest_tensor_gb_fp32": max(p.numel() for p in policy.model.parameters()) * 4 / 1e9,
        "rows": rows,
    }
    if not checkpoints:
        for mode, rs in rows.items():
            res[mode] = {k: statistics.median(x[k] for x in rs) for k in ("extra_host_gb", "seconds", "s_per_gb")}
        b, s = res["before"], res["streamed"]
        res["ratio_extra_host"] = s["extra_host_gb"] / b["extra_host_gb"]
        res["ratio_s_per_gb"] = s["s_per_gb"] / b["s_per_gb"]
    Path(out).write_text(json.dumps(res, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_policy_weights.json")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--checkpoints", action="store_true", help="time checkpoints instead of saves (after an update)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model, n = build_model(Path(tmp), args.small)
        env = dict(os.environ, OMP_NUM_THREADS="1", **FSDP2_ENV)
        env |= dict(FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP", PYTHONPATH=str(REPO))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        cmd += [__file__, "--worker", str(model), str(out), str(args.repeats), str(int(args.checkpoints))]
        subprocess.run(cmd, env=env, check=True, cwd=tmp)
    res = json.loads(out.read_text())
    res["parameters"] = n
    out.write_text(json.dumps(res, indent=2))
    print(f"{n / 1e9:.2f}B parameters, {res['weights_gb_bf16']:.2f} GB in bf16, buckets of {res['bucket_gb']:.2f} GB")
    if not args.checkpoints:
        b, s = res["before"], res["streamed"]
        print(f"rank 0 extra host memory during a save: before {b['extra_host_gb']:.2f} GB, streamed "
              f"{s['extra_host_gb']:.2f} GB ({res['ratio_extra_host']:.2f}x)")  # fmt: skip
        print(
            f"seconds per GB: before {b['s_per_gb']:.2f}, streamed {s['s_per_gb']:.2f} ({res['ratio_s_per_gb']:.2f}x)"
        )
        print(f"wrote {out}")
        return
    cb, cs = res["checkpoint_before"], res["checkpoint_sharded"]
    print(f"checkpoint (after one update): before {cb['disk_gb']:.2f} GB on disk in {cb['seconds']:.1f} s, rank 0 "
          f"+{cb['extra_host_gb']:.2f} GB; sharded + export {cs['disk_gb']:.2f} GB in {cs['seconds']:.1f} s, "
          f"+{cs['extra_host_gb']:.2f} GB")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:4], int(sys.argv[4]), bool(int(sys.argv[5])))
    else:
        main()

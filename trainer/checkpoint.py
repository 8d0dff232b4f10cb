"""Checkpoints of a training run: what `--resume` continues from.

Layout: `<output_dir>/checkpoints/step_XXXXX/{state/, model/, trainer.pt}`, where XXXXX is the NEXT step to run.
`state/` is the training state, sharded (`Policy.save_state`: the float32 master weights and the optimizer's state,
each rank writing its own shards with torch.distributed.checkpoint; resumable on any number of ranks); `model/` is
the weights exported for engines and `trace-train eval` (`Policy.save`: Hugging Face safetensors in
model.save_dtype, streamed); `trainer.pt` holds `next_step`, `reference_model` (the weights the run started from,
its KL reference: an absolute folder or a hub id), the TRACE step's state (`TraceStep.state_dict()`) and the
Python and torch RNG states. The last `run.keep_checkpoints` checkpoints are kept. A checkpoint written before
issue 23 (`optimizer.pt` beside `model/`, no `state/`) still resumes, from its bf16 export as it always did.

What always holds:
- A checkpoint is written to `step_XXXXX.tmp` and renamed into place, so a folder without `.tmp` is complete;
  `latest_checkpoint` ignores `.tmp` folders.
- Restoring drops the rows of `metrics.jsonl` of steps at or after the checkpoint's `next_step`, so a resumed run
  appends its rows where the checkpoint left off and never repeats a step.
- A resumed run keeps its KL reference: `reference_of` reads it from the checkpoint and fails loudly (when the KL
  term is on) if that folder is gone or the checkpoint predates the record, rather than silently using the
  checkpoint's own weights.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import structlog
import torch

from trainer.algo.step import TraceStep
from trainer.config import RunFileError, TrainConfig
from trainer.learner.policy import Policy

log = structlog.get_logger("trainer")


def save_checkpoint(out: Path, next_step: int, policy: Policy, trace: TraceStep, keep: int = 0) -> Path:
    """checkpoints/step_XXXXX/{state/, model/, trainer.pt}; written to a tmp folder then renamed; then all but the
    last `keep` checkpoints are deleted (0: none)."""
    d = out / "checkpoints" / f"step_{next_step:05d}"
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_state(tmp / "state")
    policy.save(tmp / "model")
    state = {
        "next_step": next_step,
        "reference_model": policy.reference,
        "trace": trace.state_dict(at_step=next_step),  # data order from before step next_step drew, if it has
        "python_rng": random.getstate(),
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(state, tmp / "trainer.pt")
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    if keep > 0:
        done = sorted(p for p in (out / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))
        for old in done[:-keep]:
            try:
                shutil.rmtree(old)
                log.info("checkpoint_pruned", path=str(old), keep=keep)
            except OSError as e:  # the new checkpoint is complete: a folder that will not go is worth a warning only
                log.warning("checkpoint_not_pruned", path=str(old), error=str(e))
    return d


def set_aside_previous_run(out: Path) -> Path | None:
    """A fresh (not resumed) run in `out`: move an earlier run's `metrics.jsonl` and `checkpoints/` into
    `out/previous-N/` (N = 1, 2, ...: nothing is overwritten), so the new run's rows are not appended to the old
    ones and a later --resume cannot pick up the old run's checkpoints. Returns that folder, or None."""
    old = [p for p in (out / "metrics.jsonl", out / "checkpoints") if p.exists()]
    if not old:
        return None
    n = 1
    while (out / f"previous-{n}").exists():
        n += 1
    dest = out / f"previous-{n}"
    dest.mkdir()
    for p in old:
        p.rename(dest / p.name)
    return dest


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted(p for p in (out / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))
    if not ckpts:
        earlier = sorted(p.name for p in out.glob("previous-*") if (p / "checkpoints").is_dir())
        hint = (
            f"; an earlier run's are in {', '.join(earlier)} (set aside when a run started here without --resume): "
            f"move {out / earlier[-1] / 'checkpoints'} back to resume it"
            if earlier
            else ""
        )
        raise RunFileError(f"--resume: no checkpoint under {out / 'checkpoints'}{hint}")
    return ckpts[-1]


def restore_checkpoint(trace: TraceStep, policy: Policy, ckpt: Path, out: Path) -> int:
    """Load trainer state from `ckpt`; drop metrics rows of steps after it. Returns the next step."""
    if (ckpt / "state").exists():
        policy.load_state(ckpt / "state")  # float32 master weights and optimizer state, on any rank count
    else:  # before issue 23: the optimizer's state gathered whole; the weights were the bf16 export's
        policy.load_optimizer_state(torch.load(ckpt / "optimizer.pt", weights_only=False))
    state = torch.load(ckpt / "trainer.pt", weights_only=False)
    trace.load_state_dict(state["trace"])
    random.setstate(state["python_rng"])
    torch.set_rng_state(state["torch_rng"])
    nxt = int(state["next_step"])
    path = out / "metrics.jsonl"
    if path.exists():
        rows = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < nxt]
        path.write_text("".join(r + "\n" for r in rows))
    log.info("resumed", checkpoint=str(ckpt), next_step=nxt)
    return nxt


def reference_of(ckpt: Path, cfg: TrainConfig) -> str | None:
    """The weights a resumed run started from (its KL reference), as recorded in the checkpoint."""
    ref = torch.load(ckpt / "trainer.pt", weights_only=False).get("reference_model")
    gone = ref is None or (Path(ref).is_absolute() and not (Path(ref) / "config.json").exists())  # else a hub id
    if cfg.optim.kl_coef > 0 and gone:
        raise RunFileError(
            f"--resume with optim.kl_coef={cfg.optim.kl_coef}: the run's KL reference (the weights it started "
            f"from) {ref or '(not recorded in ' + str(ckpt) + ')'} is not there; restore that folder, or resume "
            "with --set optim.kl_coef=0"
        )
    return ref

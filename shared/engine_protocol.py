"""The subset of SGLang's native HTTP API that TRACE's trainer speaks (DESIGN §3, appendix).

Both sides use these structs: `trainer.engines.client` (talking to real SGLang or to our CPU engine)
and `engine` (the CPU development engine that implements exactly this subset).
Field names and defaults follow SGLang 0.5.23 (checked against the released wheel's source:
`srt/managers/io_struct.py` `GenerateReqInput`/`UpdateWeightFromDiskReqInput` and the process-group
requests (`InitWeightsUpdateGroupReqInput`, `UpdateWeightsFromDistributedReqInput`, ...),
`srt/sampling/sampling_params.py`, and the HTTP contract `sglang/api/v1/api_types.py`).
Unknown fields in answers are ignored, so a real SGLang answer (which carries many more) decodes
into these. SGLang's own contract *rejects* unknown keys inside `sampling_params` (400), so never
add a field here that SGLang does not know.

The trainer always sends sampling parameters explicitly (`trainer.engines.client` encodes every
field, not only non-defaults): server-side defaults can come from the model's
generation_config.json (`--sampling-defaults model`, the default, on the OpenAI routes) or from
`--preferred-sampling-params` (merged under the request's own values on `/generate`).

Facts both sides rely on (SGLang 0.5.23):
- `output_ids` include the matched stop token (EOS or a `stop_token_ids` entry); `no_stop_trim`
  only changes `text`. A stop *string* ends `output_ids` at the token that completes it.
- `output_token_logprobs[i] = [logprob, token_id, text_or_null]`, one per output token, and
  `token_id == output_ids[i]`. The logprob is `log_softmax(logits / temperature)` of the sampled
  token before top-p/top-k/min-p truncation (plain `log_softmax(logits)` for greedy, i.e.
  temperature 0); `SGLANG_RETURN_ORIGINAL_LOGPROB=1` makes it the untempered one.
- `top_logprobs_num=n` (an int, or one per prompt) adds `output_top_logprobs`: per output token the n largest
  entries of that same distribution as `[logprob, token_id, text_or_null]`, largest first. Only with
  `return_logprob` (SGLang adds no logprob field at all without it).
- `finish_reason` is `{"type": "stop", "matched": <int | str | list[int]>}`,
  `{"type": "length", "length": n}` or `{"type": "abort", "message", "status_code", "err_type"}`.
  An abort with `status_code >= 400` becomes an HTTP error of that code; a plain abort
  (`/abort_request`, `/pause_generation {"mode": "abort"}`) answers 200 with type "abort".
- Stop strings need the server's tokenizer: a server launched with `--skip-tokenizer-init`
  answers 400 ("stop=... is unavailable when skip_tokenizer_init=True"), and the same for
  `stop_regex` and `min_new_tokens > 0`. `input_ids` in / `output_ids` out works either way.
"""

from __future__ import annotations

from typing import Any

import msgspec


class SamplingParams(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """Per-request sampling parameters. Defaults mirror SGLang's where it has them."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy (SGLang turns it into top_k = 1)
    top_p: float = 1.0  # in (0, 1]
    top_k: int = -1  # -1 = whole vocabulary (SGLang maps it to 1 << 30)
    min_p: float = 0.0
    # stop strings: need the engine's tokenizer (400 from a server launched with --skip-tokenizer-init)
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None  # stop in addition to the model's EOS ids
    ignore_eos: bool = False  # in SGLang this also disables stop_token_ids
    no_stop_trim: bool = False  # affects `text` only; output_ids always keep the stop token
    skip_special_tokens: bool = True  # affects `text` only
    n: int = 1  # SGLang discourages n > 1: repeat the prompt instead (the trainer does)


class GenerateRequest(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """`POST /generate`. A single `input_ids` list answers one object; a list of lists answers a list."""

    input_ids: list[Any]  # list[int], or list[list[int]] for a batch (msgspec cannot decode a union of two lists)
    sampling_params: SamplingParams | list[SamplingParams] = msgspec.field(default_factory=SamplingParams)
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] = -1  # -1 = logprobs of output tokens only
    top_logprobs_num: int | list[int] | None = 0  # top logprobs per output token (only with return_logprob)
    rid: str | list[str] | None = None
    stream: bool = False


class FinishReason(msgspec.Struct, omit_defaults=True):
    """`meta_info.finish_reason`: type is "stop" (EOS, stop string or stop token), "length" or "abort"."""

    type: str
    # stop: the token id (EOS or stop_token_ids), the stop string/regex, or a list of token ids
    matched: int | str | list[int] | None = None
    length: int | None = None  # length: max_new_tokens
    message: str | None = None  # abort: why
    status_code: int | None = None  # abort: SGLang turns >= 400 into an HTTP error of that code
    err_type: str | None = None  # abort


class MetaInfo(msgspec.Struct, omit_defaults=True):
    id: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    finish_reason: FinishReason | None = None
    # one [logprob, token_id, text_or_null] per generated token (SGLang's shape)
    output_token_logprobs: list[list[Any]] | None = None
    # with top_logprobs_num = n > 0: per generated token, its n most likely [logprob, token_id, text_or_null] (the
    # same distribution as output_token_logprobs), largest first; SGLang sends null for a token without them
    output_top_logprobs: list[list[list[Any]] | None] | None = None
    e2e_latency: float | None = None
    weight_version: str | None = None


class GenerateResponse(msgspec.Struct, omit_defaults=True):
    """One item of a `/generate` answer."""

    output_ids: list[int]
    meta_info: MetaInfo
    text: str = ""


class UpdateWeightsFromDisk(msgspec.Struct, omit_defaults=True):
    """`POST /update_weights_from_disk`. SGLang answers 200 `UpdateWeightsResult` on success and 400
    with the same body on failure (including "weights were updated, but the cache was not flushed
    because requests are still running": pause first)."""

    model_path: str
    load_format: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None


class UpdateWeightsResult(msgspec.Struct, omit_defaults=True):
    """The answer of every weight route: `/update_weights_from_disk` and the process-group routes below."""

    success: bool
    message: str = ""
    num_paused_requests: int = 0


class PauseGeneration(msgspec.Struct):
    """`POST /pause_generation` (answer 200 `{"message", "status": "ok"}`). While paused, new
    `/generate` requests wait; `/continue_generation` (body `{}`) resumes. Modes: "abort" (in-flight
    requests return with finish type "abort"), "retract" (they go back to the queue and are recomputed
    after continue; the cache can be flushed meanwhile), "in_place" (they stay; a flush then fails)."""

    mode: str = "abort"


class AbortRequest(msgspec.Struct):
    """`POST /abort_request` (answer 200, empty): abort one request by `rid`, or all of them."""

    rid: str = ""
    abort_all: bool = False


# ---- weight updates over a process group (SGLang 0.5.23: `io_struct.py`, `http_server.py`) ------------------------
# The trainer is rank 0 of a group it creates; engine i joins as ranks `rank_offset .. rank_offset + tp_size - 1`.
# Every answer is `UpdateWeightsResult`'s `{"success", "message"}`: 200 on success, 400 with the same body on failure.
# Tensor and group updates must run between `/begin_weight_update` and `/end_weight_update` (0.5.23): outside that
# bracket `/update_weights_from_distributed` answers 400 with `OUTSIDE_BRACKET` and receives nothing.

OUTSIDE_BRACKET = "update_weights_from_distributed must run between begin_weight_update() and end_weight_update()"
"""SGLang 0.5.23's message (`scheduler_components/weight_updater.py`) for an update sent outside the bracket."""


class InitWeightsUpdateGroup(msgspec.Struct):
    """`POST /init_weights_update_group`. Answers once the group has formed (every rank joined) or failed, so the
    trainer must join as rank 0 while this call is in flight. The engine's rank is `rank_offset + tp_rank`; it joins
    `init_method = tcp://master_address:master_port` with torch's rendezvous and a store prefixed by `group_name`."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int  # 1 (the trainer) + every engine rank in the group
    group_name: str = "weight_update_group"
    backend: str = "nccl"  # SGLang's default; "gloo" for engines on CPU


class UpdateWeightsFromDistributed(msgspec.Struct):
    """`POST /update_weights_from_distributed`. The engine allocates one tensor per (name, dtype, shape) and receives
    each by `broadcast(src=0)` in list order, while rank 0 broadcasts the same tensors in the same order; then it
    loads them, sets `weight_version` (if given) and flushes its prefix cache (if `flush_cache`)."""

    names: list[str]  # Hugging Face parameter names, e.g. "model.layers.0.mlp.up_proj.weight"
    dtypes: list[str]  # torch dtype names without "torch.", e.g. "bfloat16"
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    load_format: str | None = None  # None: one broadcast per tensor ("flattened_bucket": one per call, not used here)


class BeginWeightUpdate(msgspec.Struct):
    """`POST /begin_weight_update`: opens the bracket (400 if one is already open)."""

    selector: str = "all"  # "target" | "draft" | "all": which model runners (speculative decoding has two)


class EndWeightUpdate(msgspec.Struct):
    """`POST /end_weight_update` with body `{}`: closes the bracket (400 if none is open)."""


class DestroyWeightsUpdateGroup(msgspec.Struct):
    """`POST /destroy_weights_update_group` (400 "The group to be destroyed does not exist." for an unknown name)."""

    group_name: str = "weight_update_group"

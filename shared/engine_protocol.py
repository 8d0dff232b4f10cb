"""The subset of SGLang's native HTTP API that TRACE's trainer speaks (DESIGN §3, appendix).

Both sides use these structs: `trainer.engine_client` (talking to real SGLang or to our CPU engine)
and `engine` (the CPU development engine that implements exactly this subset).
Field names and defaults follow SGLang 0.5.23 (checked against the released wheel's source:
`srt/managers/io_struct.py` `GenerateReqInput`/`UpdateWeightFromDiskReqInput`,
`srt/sampling/sampling_params.py`, and the HTTP contract `sglang/api/v1/api_types.py`).
Unknown fields in answers are ignored, so a real SGLang answer (which carries many more) decodes
into these. SGLang's own contract *rejects* unknown keys inside `sampling_params` (400), so never
add a field here that SGLang does not know.

The trainer always sends sampling parameters explicitly (`trainer.engine_client` encodes every
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
    top_logprobs_num: int = 0
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

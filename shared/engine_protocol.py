"""The subset of SGLang's native HTTP API that TRACE's trainer speaks (DESIGN §3, appendix).

Both sides use these structs: `trainer.engine_client` (talking to real SGLang or to our CPU engine)
and `trainer.engine_server` (the CPU development engine that implements exactly this subset).
Field names and defaults follow SGLang 0.5.x `python/sglang/srt/managers/io_struct.py`
(`GenerateReqInput`) and `sampling_params.md`. Unknown fields in answers are ignored, so a real
SGLang answer (which carries many more) decodes into these.

The trainer always sends sampling parameters explicitly: SGLang's default
(`--sampling-defaults model`) takes them from the model's generation_config.json.
"""

from __future__ import annotations

from typing import Any

import msgspec


class SamplingParams(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """Per-request sampling parameters. Defaults mirror SGLang's where it has them."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    min_p: float = 0.0
    stop: list[str] | str | None = None  # stop strings (need the engine's tokenizer)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    no_stop_trim: bool = False
    skip_special_tokens: bool = True
    n: int = 1  # SGLang discourages n > 1: repeat the prompt instead (the trainer does)


class GenerateRequest(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """`POST /generate`. A single `input_ids` list answers one object; a list of lists answers a list."""

    input_ids: list[int] | list[list[int]]
    sampling_params: SamplingParams | list[SamplingParams] = msgspec.field(default_factory=SamplingParams)
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] = -1  # -1 = logprobs of output tokens only
    top_logprobs_num: int = 0
    rid: str | list[str] | None = None
    stream: bool = False


class FinishReason(msgspec.Struct, omit_defaults=True):
    """`meta_info.finish_reason`: type is "stop" (EOS, stop string or stop token), "length" or "abort"."""

    type: str
    matched: int | str | None = None  # the stop token id or stop string that matched
    length: int | None = None
    message: str | None = None


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
    """`POST /update_weights_from_disk`."""

    model_path: str
    load_format: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None


class UpdateWeightsResult(msgspec.Struct, omit_defaults=True):
    success: bool
    message: str = ""
    num_paused_requests: int = 0

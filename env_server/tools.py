"""The ReAct tools and the action format (DESIGN §2).

A tool is a typed async function whose docstring is its schema (`function_schema` turns the
signature and the docstring's Args section into an OpenAI function-calling schema). Tools raise
`ToolError` for anything the model did wrong; the episode turns that into an observation and the
turn still counts. Backend failures (`RetrieverError`) are not the model's fault: they propagate,
the step is not applied, and the client gets 502 and may retry.

Tools judge; they do not reward. `answer` is the only tool that ends an episode: it runs the judge and hands
back all of its scores (`ToolResult.judged`, also copied into `info`); which score becomes the step's reward
(config `reward_metric`) is decided by `env_server.service.step_reward`, nowhere else.

Action format (Search-R1 compatible): the model writes `<think>..</think>` then the FIRST of
`<search> query </search>` or `<answer> text </answer>`; a text action is parsed into the same
tool call a function-calling agent would send.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from env_server.judge import judge
from env_server.retrieval import Retriever
from env_server.retrieval.format import format_observation

DEFAULT_PROMPT = (
    "Answer the question. Reason inside <think> and </think>. To look something up, write "
    "<search> query </search>; results come back between <information> and </information>. Search as "
    "often as you need. When you know the answer, write only the answer inside <answer> and </answer>, "
    "for example <answer> Paris </answer>.\nQuestion: {question}"
)

INVALID_ACTION = (
    "\nMy previous action is invalid. To search, put the query between <search> and </search>. "
    "To give the final answer, put it between <answer> and </answer>. Let me try again.\n"
)

_ACTION_RE = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)


class ToolError(Exception):
    """The model used a tool wrongly; the message becomes the observation."""


@dataclass
class ToolContext:
    """What a tool may touch: the retriever, the episode's gold answers, the server's limits."""

    retriever: Retriever
    golden_answers: list[str]
    topk: int
    max_topk: int


@dataclass
class ToolResult:
    observation: str  # bare text; a text-format episode wraps a search result in <information> tags
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    judged: dict[str, float] | None = None  # the judge's scores {em, f1, cover_em} when this call answered, else None


def wrap_information(text: str) -> str:
    return f"\n\n<information>{text.strip()}</information>\n\n"


def json_kind(value: Any) -> str:
    """What a tool argument is, in JSON's words (the model and a chat API's caller wrote JSON, not Python)."""
    if value is None:
        return "null"
    for typ, word in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string")):
        if isinstance(value, typ):
            return word
    return "an array" if isinstance(value, list) else "an object" if isinstance(value, dict) else type(value).__name__


def json_value(value: Any, limit: int = 40) -> str:
    """A tool argument as JSON, shortened to `limit` characters."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def search(ctx: ToolContext, query: str, topk: int | None = None) -> ToolResult:
    """Search the corpus with BM25 and return the top passages, each as "Doc i(Title: T) text".

    Args:
        query: Keywords to look up, e.g. an entity name and the attribute you need.
        topk: How many passages to return (default: the server's topk).
    """
    k = ctx.topk if topk is None else topk
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= ctx.max_topk:
        raise ToolError(f"topk must be an integer from 1 to {ctx.max_topk}, got {json_value(k)}")
    if not isinstance(query, str):
        raise ToolError(f"query must be a string, got {json_kind(query)}")
    if not query.strip():
        raise ToolError("The search query was empty. Write a query between <search> and </search>.")
    hits = (await ctx.retriever.search([query], k))[0]
    if not hits:
        return ToolResult("No results found.", info={"query": query, "num_hits": 0})
    return ToolResult(
        format_observation(hits),
        info={"query": query, "num_hits": len(hits), "doc_ids": [h.id for h in hits]},
    )


async def answer(ctx: ToolContext, answer: str) -> ToolResult:
    """Give the final answer to the question. Ends the episode; the answer is judged by exact match.

    Args:
        answer: The answer alone, as short as possible (a name, a year, a place).
    """
    if not isinstance(answer, str):
        raise ToolError(f"answer must be a string, got {json_kind(answer)}")
    scores = judge(answer, ctx.golden_answers)
    return ToolResult("", done=True, info={"prediction": answer, **scores}, judged=scores)


ToolFn = Callable[..., Awaitable[ToolResult]]
TOOLS: dict[str, ToolFn] = {"search": search, "answer": answer}

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def function_schema(fn: ToolFn, max_topk: int | None = None) -> dict[str, Any]:
    """OpenAI function-calling schema from a tool's signature (after `ctx`) and docstring."""
    doc = inspect.getdoc(fn) or ""
    summary, _, rest = doc.partition("\n\nArgs:\n")
    arg_docs = dict(re.findall(r"^\s*(\w+): (.+)$", rest, re.MULTILINE))
    props: dict[str, Any] = {}
    required = []
    hints = inspect.get_annotations(fn, eval_str=True)
    for name, p in list(inspect.signature(fn).parameters.items())[1:]:
        hint = hints.get(name, str)
        base = next((t for t in _JSON_TYPES if t is hint or t in getattr(hint, "__args__", ())), str)
        prop: dict[str, Any] = {"type": _JSON_TYPES[base], "description": arg_docs.get(name, "")}
        if name == "topk" and max_topk:
            prop.update(minimum=1, maximum=max_topk)
        props[name] = prop
        if p.default is inspect.Parameter.empty:
            required.append(name)
    return {
        "type": "function",
        "function": {
            "name": fn.__name__,
            "description": " ".join(summary.split()),
            "parameters": {"type": "object", "properties": props, "required": required, "additionalProperties": False},
        },
    }


def parse_action(text: str) -> tuple[str, dict[str, Any]] | None:
    """Text action -> (tool name, arguments), from the first complete <search>/<answer> tag; None if none."""
    m = _ACTION_RE.search(text)
    if m is None:
        return None
    tag, body = m.group(1), m.group(2).strip()
    return (tag, {"query": body}) if tag == "search" else (tag, {"answer": body})


def coerce_arguments(name: str, arguments: Any) -> dict[str, Any]:
    """A tool call's arguments as a dict; a JSON string (as chat APIs send it) is parsed. Raises ToolError."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise ToolError(f"arguments of {name} are not valid JSON: {e.msg}") from None
    if not isinstance(arguments, dict):
        raise ToolError(f"arguments of {name} must be a JSON object, got {json_kind(arguments)}")
    return arguments


@functools.cache
def _parameters(fn: ToolFn) -> tuple[list[str], frozenset[str]]:
    """A tool's parameters after `ctx`, and the required ones; computed once per tool (inspect.signature and
    Signature.bind on every call took ~5% of a step's CPU)."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    return [p.name for p in params], frozenset(p.name for p in params if p.default is inspect.Parameter.empty)


async def call_tool(ctx: ToolContext, name: str, arguments: dict[str, Any]) -> ToolResult:
    """Run one tool call; a wrong name or arguments raise ToolError with a message for the model."""
    fn = TOOLS.get(name)
    if fn is None:
        raise ToolError(f"unknown tool {name!r}; available tools: {', '.join(TOOLS)}")
    params, required = _parameters(fn)
    unknown = sorted(set(arguments) - set(params))
    if unknown:
        raise ToolError(f"{name} got unknown arguments {unknown}; it takes {params}")
    missing = [p for p in params if p in required and p not in arguments]
    if missing:  # what Signature.bind would say
        raise ToolError(f"bad arguments for {name}: missing a required argument: {missing[0]!r}")
    return await fn(ctx, **arguments)

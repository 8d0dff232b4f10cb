"""Agents `trace-eval` can evaluate: one small interface, chosen by name from `AGENTS`.

Contract of an agent (`Agent.run`):
- It gets an env client, a freshly created episode and the bare question text, and plays the episode through
  the env server (`env.step`) until the server says `done` (an answer, or `truncated` at max turns). It returns
  the `StepResult` that ended the episode plus the token usage its model endpoint reported, if any.
- It raises on anything it cannot handle (a dead or misbehaving model endpoint, a missing oracle): the runner
  records the exception's message on that question's row and moves on. Agents never judge themselves: the
  runner reads turns, searches, prediction and scores back from the server's own record of the episode.
- The question is passed in because `EpisodeCreated` carries only the server's Search-R1 tag prompt, which is
  right for text agents but wrong for tool-calling ones (it tells the model to write <search> tags).
- Agents are built once per run from `AgentConfig` and the server's `/v1/info` (tool schemas), shared by all
  concurrent questions, and closed with `aclose()`.

Registry: `openai-tools` (OpenAI-compatible chat completions with function calling), `react-text`
(completions-style endpoint writing Search-R1 tags), `policy` (our checkpoints, through the trainer's own greedy
evaluation, `trainer.evaluate.play_greedy`), `oracle` and `first-hit` (sanity references needing no model).
"""

from __future__ import annotations

import abc
import json
import os
import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import structlog
import tyro

from shared.client import EnvClient
from shared.replicas import EnvPool
from shared.wire import EpisodeCreated, Info, StepResult

log = structlog.get_logger("trace_eval")


class AgentConfigError(ValueError):
    """The agent cannot be built from these options (a missing --model, API key, ...): a usage error."""


class AgentUnavailable(AgentConfigError):
    """The agent is registered but cannot run in this build."""


class AgentError(RuntimeError):
    """One question failed inside the agent; the message says what happened and is recorded on the row."""


@dataclass
class AgentConfig:
    """Options of the model-backed agents (the reference agents ignore them)."""

    base_url: str | None = None
    """OpenAI-compatible base URL, e.g. http://127.0.0.1:30000/v1 (None: the openai client's default,
    $OPENAI_BASE_URL or the hosted API)."""
    model: str | None = None
    """Model name sent with every request (required by openai-tools and react-text)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key. Local servers that ignore keys still need it set (to anything)."""
    temperature: float = 0.0
    """Sampling temperature (0: greedy, the usual choice for evaluation)."""
    max_tokens: int = 512
    """Tokens per model call (one turn)."""
    request_timeout_s: Annotated[float, tyro.conf.arg(aliases=("--request-timeout",))] = 120.0
    """Timeout of one model call."""
    retries: Annotated[int, tyro.conf.arg(aliases=("--agent-retries",))] = 2
    """Retries of one model call on connection errors, 408/409/429 and 5xx (the openai client's backoff)."""


@dataclass
class AgentOutcome:
    """What an agent reports besides the episode itself (which the runner reads from the server)."""

    final: StepResult
    """The step answer that ended the episode (`done` is true). For callers that use agents directly; the runner
    scores from the server's own record of the episode."""
    prompt_tokens: int | None = None
    """Prompt tokens summed over the model calls, when the endpoint reported usage on every call."""
    completion_tokens: int | None = None
    """Completion tokens summed likewise."""


class Agent(abc.ABC):
    """Plays one episode per `run` call; one instance serves all concurrent questions of a run."""

    name: ClassVar[str]
    needs_oracle: ClassVar[bool] = False
    """Create episodes with `include_oracle=True` (the runner checks the dataset has oracles before starting)."""

    model: str | None = None
    """Recorded on every result row (None for agents without a model)."""

    @abc.abstractmethod
    async def run(self, env: EnvClient | EnvPool, episode: EpisodeCreated, question: str) -> AgentOutcome:
        """Play `episode` to the end through `env`; raise on failure (the runner records it)."""

    async def aclose(self) -> None:
        """Release clients; called once at the end of the run."""
        return None


# ---------------------------------------------------------------------------------------------- model-backed
class _Usage:
    """Token usage summed over the calls of one episode; None as soon as one call did not report it."""

    def __init__(self) -> None:
        self.prompt: int | None = 0
        self.completion: int | None = 0

    def add(self, usage: Any) -> None:
        if usage is None or self.prompt is None or self.completion is None:
            self.prompt = self.completion = None
            return
        self.prompt += int(usage.prompt_tokens or 0)
        self.completion += int(usage.completion_tokens or 0)

    def outcome(self, final: StepResult) -> AgentOutcome:
        return AgentOutcome(final, self.prompt, self.completion)


class _OpenAIAgent(Agent):
    """Shared set-up of the agents that talk to an OpenAI-compatible endpoint through the official client."""

    def __init__(self, cfg: AgentConfig, info: Info) -> None:
        try:
            import openai
        except ImportError as e:
            raise AgentUnavailable(
                f"--agent {self.name} talks through the openai client, which is not installed: pip install "
                f"'trace-rl[eval]' ({e})"
            ) from e
        if not cfg.model:
            raise AgentConfigError(f"--agent {self.name} needs --model NAME (the model the endpoint serves)")
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise AgentConfigError(
                f"--agent {self.name} reads its API key from ${cfg.api_key_env}, which is not set; set it "
                f"(any value for local servers that ignore keys, e.g. {cfg.api_key_env}=EMPTY) or name another "
                "variable with --api-key-env"
            )
        self.cfg = cfg
        self.model = cfg.model
        self._openai = openai
        self.client = openai.AsyncOpenAI(
            base_url=cfg.base_url, api_key=key, timeout=cfg.request_timeout_s, max_retries=cfg.retries
        )
        self.endpoint = str(self.client.base_url)

    async def _request(self, what: str, call: Any) -> Any:
        """Await one endpoint call; re-raise the client's errors as AgentError saying which endpoint failed how."""
        oai = self._openai
        try:
            return await call
        except oai.APITimeoutError as e:
            raise AgentError(f"agent endpoint {self.endpoint} timed out on {what}") from e
        except oai.APIConnectionError as e:
            cause = e.__cause__ or e
            raise AgentError(f"agent endpoint {self.endpoint} unreachable on {what}: {cause}") from e
        except oai.APIStatusError as e:
            body = e.response.text[:300] if e.response is not None else ""
            raise AgentError(f"agent endpoint {self.endpoint} answered HTTP {e.status_code} on {what}: {body}") from e
        except oai.APIError as e:
            raise AgentError(f"agent endpoint {self.endpoint} failed on {what}: {e}") from e
        except json.JSONDecodeError as e:  # the client parses a JSON content type without checking it
            raise AgentError(f"agent endpoint {self.endpoint} answered garbage on {what}: invalid JSON ({e})") from e

    async def aclose(self) -> None:
        await self.client.close()


def _garbage(endpoint: str, what: str, obj: Any) -> AgentError:
    return AgentError(f"agent endpoint {endpoint} answered garbage on {what}: {str(obj)[:300]!r}")


TOOLS_SYSTEM_PROMPT = (
    "You answer questions by searching a document collection. Call the `search` tool to look things up, as "
    "often as you need; each call returns the top passages. When you know the answer, call the `answer` tool "
    "with the answer alone, as short as possible (a name, a year, a place), not a sentence."
)

NO_TOOL_CALL_HINT = (
    "You did not call a tool. Call `search` to look something up, or `answer` with the final answer alone."
)


UNPARSED_TOOL_CALL = (
    "the model wrote a tool call as text and the endpoint did not parse it into tool_calls, so the turn is an invalid "
    "action: start the model server with a tool-call parser (SGLang: --tool-call-parser qwen25 for Qwen2.5/Qwen3; "
    "vLLM: --enable-auto-tool-choice --tool-call-parser hermes)"
)
_TOOL_CALL_TEXT = re.compile(
    r"<tool_call>|<\|python_tag\|>|\[TOOL_CALLS\]|\{\s*\"name\"\s*:[\s\S]*\"(arguments|parameters)\"\s*:"
)


def looks_like_unparsed_tool_call(text: str) -> bool:
    """Whether a chat reply's text holds a tool call a parser should have taken out: Qwen's and Hermes'
    `<tool_call>`, Llama 3's `<|python_tag|>` or `{"name": ..., "parameters": ...}`, Mistral's `[TOOL_CALLS]`, or a bare
    `{"name": ..., "arguments": ...}`. A false alarm costs one log line."""
    return bool(_TOOL_CALL_TEXT.search(text))


class OpenAIToolsAgent(_OpenAIAgent):
    """Chat completions with function calling, tools = the server's `/v1/info` schemas.

    Each tool call is one env step (`tool_call`), its observation goes back as a `tool` message. A reply with no
    tool call is still a turn: its text is sent as a text `action` (so `<answer>` tags in it count, as the server
    parses them; anything else is an invalid action) and the model is told to call a tool."""

    name = "openai-tools"

    def __init__(self, cfg: AgentConfig, info: Info) -> None:
        names = [t.get("function", {}).get("name") for t in info.tools]
        if "answer" not in names:
            raise AgentConfigError(f"the env server offers tools {names}; openai-tools needs an `answer` tool")
        super().__init__(cfg, info)
        self.tools = info.tools
        self._said_unparsed = False  # UNPARSED_TOOL_CALL is logged once a run

    async def run(self, env: EnvClient | EnvPool, episode: EpisodeCreated, question: str) -> AgentOutcome:
        from openai.types.chat import ChatCompletion, ChatCompletionMessage

        messages: list[dict[str, Any]] = [
            {"role": "system", "content": TOOLS_SYSTEM_PROMPT},
            {"role": "user", "content": question},
        ]
        usage = _Usage()
        res: StepResult | None = None
        while res is None or not res.done:
            what = f"turn {res.turn + 1 if res else 1}"
            completion = await self._request(
                what,
                self.client.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    tools=self.tools,
                    temperature=self.cfg.temperature,
                    max_tokens=self.cfg.max_tokens,
                ),
            )
            if (
                not isinstance(completion, ChatCompletion)
                or not completion.choices
                or not isinstance(completion.choices[0].message, ChatCompletionMessage)
            ):
                raise _garbage(self.endpoint, what, completion)
            usage.add(completion.usage)
            msg = completion.choices[0].message
            calls = [c for c in (msg.tool_calls or []) if getattr(c, "function", None) is not None]
            if not calls:
                text = msg.content or ""
                if not self._said_unparsed and looks_like_unparsed_tool_call(text):
                    self._said_unparsed = True
                    log.warning(UNPARSED_TOOL_CALL, endpoint=self.endpoint, reply=text[:200])
                messages.append({"role": "assistant", "content": text})
                res = await env.step(episode.episode_id, action=text)
                messages.append({"role": "user", "content": NO_TOOL_CALL_HINT})
                continue
            messages.append(
                {
                    "role": "assistant",
                    "content": msg.content,
                    "tool_calls": [
                        {
                            "id": c.id,
                            "type": "function",
                            "function": {"name": c.function.name, "arguments": c.function.arguments},
                        }
                        for c in calls
                    ],
                }
            )
            for c in calls:
                res = await env.step(
                    episode.episode_id, tool_call={"name": c.function.name, "arguments": c.function.arguments or "{}"}
                )
                messages.append({"role": "tool", "tool_call_id": c.id, "content": res.observation})
                if res.done:
                    break
        return usage.outcome(res)


REACT_STOP = ["</search>", "</answer>"]
_OPEN_TAG = re.compile(r"<(search|answer)>(?![\s\S]*</\1>)")


def close_action(text: str) -> str:
    """Re-append the stop string an OpenAI-compatible server strips: if the text opens <search>/<answer> and does
    not close it, close the last one opened (Search-R1 keeps the stop string in the action it parses)."""
    opened = list(_OPEN_TAG.finditer(text))
    return text + f"</{opened[-1].group(1)}>" if opened else text


class ReactTextAgent(_OpenAIAgent):
    """A completions-style endpoint (`/v1/completions`) writing the Search-R1 tag format.

    The running text starts as the server's prompt (`episode.prompt`, raw: no chat template is applied) and a
    newline, so the model starts its turn on a line of its own after the question; each
    call stops at `</search>` or `</answer>`, the action (with its stop string restored when the model stopped on
    it) is sent as a text `action`, and action + observation are appended to the running text."""

    name = "react-text"

    async def run(self, env: EnvClient | EnvPool, episode: EpisodeCreated, question: str) -> AgentOutcome:
        from openai.types import Completion, CompletionChoice

        text = episode.prompt + "\n"
        usage = _Usage()
        res: StepResult | None = None
        while res is None or not res.done:
            what = f"turn {res.turn + 1 if res else 1}"
            completion = await self._request(
                what,
                self.client.completions.create(
                    model=self.model,
                    prompt=text,
                    stop=REACT_STOP,
                    temperature=self.cfg.temperature,
                    max_tokens=self.cfg.max_tokens,
                ),
            )
            if (
                not isinstance(completion, Completion)
                or not completion.choices
                or not isinstance(completion.choices[0], CompletionChoice)
                or not isinstance(completion.choices[0].text, str)
            ):
                raise _garbage(self.endpoint, what, completion)
            usage.add(completion.usage)
            choice = completion.choices[0]
            action = close_action(choice.text) if choice.finish_reason == "stop" else choice.text
            res = await env.step(episode.episode_id, action=action)
            text += action + res.observation
        return usage.outcome(res)


class PolicyAgent(Agent):
    """A TRACE checkpoint evaluated exactly as the trainer evaluates it: `trainer.evaluate.play_greedy`, the
    trainer's own agent loop and engine client (token-in/token-out) with greedy decoding. `--base-url` is an
    engine speaking SGLang's native API (real SGLang or `trace-engine serve`, no /v1), and `--model` the
    checkpoint folder, whose tokenizer and chat template lay out the prompt exactly as in training. A policy
    that stops before the episode ends (context limit, aborted generations) is an AgentError on its row."""

    name = "policy"

    def __init__(self, cfg: AgentConfig, info: Info) -> None:
        try:
            from transformers import AutoTokenizer

            from trainer import evaluate
            from trainer.algo.rollout import RolloutConfig
            from trainer.engines.client import EngineClient
        except ImportError as e:
            raise AgentUnavailable(
                f"the policy agent needs the train extra (pip install 'trace-rl[train]'): {e}"
            ) from e
        if not cfg.base_url or not cfg.model:
            raise AgentConfigError("--agent policy needs --base-url ENGINE_URL (SGLang native API) and --model DIR")
        if cfg.temperature != 0.0:
            raise AgentConfigError(
                f"--agent policy decodes greedily, as the trainer's evaluation does (--temperature 0); got "
                f"--temperature {cfg.temperature}"
            )
        self.model = cfg.model
        self._tok = AutoTokenizer.from_pretrained(cfg.model)
        self._engine = EngineClient([cfg.base_url.rstrip("/")], timeout_s=cfg.request_timeout_s, retries=cfg.retries)
        self._rollout = RolloutConfig(max_new_tokens=cfg.max_tokens, max_context_tokens=32768)
        self._evaluate = evaluate

    async def run(self, env: EnvClient | EnvPool, episode: EpisodeCreated, question: str) -> AgentOutcome:
        runner = self._evaluate.greedy_runner(env, self._engine, self._tok, self._rollout)
        res = await self._evaluate.play_greedy(runner, episode)
        if res.final is None or res.error is not None:
            raise AgentError(f"the policy stopped before the episode ended ({res.error})")
        return AgentOutcome(res.final, res.prompt_tokens, res.generated_tokens)

    async def aclose(self) -> None:
        await self._engine.aclose()


# ---------------------------------------------------------------------------------------------- references
class OracleAgent(Agent):
    """Plays the dataset's oracle trajectory (`metadata["oracle"]`: searches, then the answer) as tool calls.
    An upper bound that checks the plumbing: EM 1.0 on datasets that carry oracles (the synthetic world)."""

    name = "oracle"
    needs_oracle = True

    def __init__(self, cfg: AgentConfig, info: Info) -> None:
        pass

    async def run(self, env: EnvClient | EnvPool, episode: EpisodeCreated, question: str) -> AgentOutcome:
        oracle = episode.metadata.get("oracle")
        if not oracle:
            raise AgentError(
                f"dataset {episode.dataset!r} has no oracle trajectory for question {episode.question_id!r} "
                "(metadata['oracle']); the oracle agent needs a dataset that carries them, e.g. 'synthetic'"
            )
        res: StepResult | None = None
        for step in oracle:
            kind, text = step["kind"], step["text"]
            if kind not in ("search", "answer"):
                raise AgentError(f"oracle step of unknown kind {kind!r} in question {episode.question_id!r}")
            args = {"query": text} if kind == "search" else {"answer": text}
            res = await env.step(episode.episode_id, tool_call={"name": kind, "arguments": args})
            if res.done:
                return AgentOutcome(res)
        raise AgentError(f"oracle of question {episode.question_id!r} ended without finishing the episode: {oracle}")


_FIRST_TITLE = re.compile(r'\ADoc 1\(Title: (?:"(?P<quoted>[^\n]*?)"|(?P<bare>[^\n]*?))\) ')


def first_title(observation: str) -> str | None:
    """The title of the first passage in a search observation ('Doc 1(Title: "T") text ...'), unquoted."""
    m = _FIRST_TITLE.match(observation.lstrip())
    if m is None:
        return None
    return m.group("quoted") if m.group("quoted") is not None else m.group("bare")


class FirstHitAgent(Agent):
    """Searches the question text once and answers with the top passage's title: a deterministic floor."""

    name = "first-hit"

    def __init__(self, cfg: AgentConfig, info: Info) -> None:
        pass

    async def run(self, env: EnvClient | EnvPool, episode: EpisodeCreated, question: str) -> AgentOutcome:
        res = await env.step(episode.episode_id, tool_call={"name": "search", "arguments": {"query": question}})
        if res.done:
            return AgentOutcome(res)
        title = first_title(res.observation)
        if title is None:
            raise AgentError(f"search returned no passage to take a title from: {res.observation[:200]!r}")
        return AgentOutcome(
            await env.step(episode.episode_id, tool_call={"name": "answer", "arguments": {"answer": title}})
        )


AGENTS: dict[str, type[Agent]] = {
    cls.name: cls for cls in (OpenAIToolsAgent, ReactTextAgent, PolicyAgent, OracleAgent, FirstHitAgent)
}


def build_agent(name: str, cfg: AgentConfig, info: Info) -> Agent:
    """The registered agent `name`, built for the server described by `info`; AgentConfigError if it cannot be."""
    cls = AGENTS.get(name)
    if cls is None:
        raise AgentConfigError(f"unknown agent {name!r}; available: {', '.join(AGENTS)}")
    return cls(cfg, info)

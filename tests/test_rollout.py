"""The token-level agent loop against the REAL CPU engine server and the REAL env server on loopback,
on the tiny model (built from a config, no download). `tiny_model` and `engine_url` come from conftest."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.client import EnvClient
from trainer.algo.rollout import RolloutConfig, RolloutRunner, StopSpec
from trainer.algo.tree import FinishStatus, RolloutTree
from trainer.engines.client import EngineClient
from trainer.learner.loss import sequence_logprobs


@pytest.fixture
async def runner(env_client: EnvClient, engine_url: str, tiny_model: Path) -> AsyncIterator[RolloutRunner]:
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    async with EngineClient([engine_url]) as engine:
        yield RolloutRunner(env_client, engine, tok, RolloutConfig(max_new_tokens=24, max_context_tokens=1024))


def _check_tree(tree: RolloutTree) -> None:
    tree.validate()
    for n in tree.nodes[1:]:
        gen = sum(n.loss_mask)
        assert n.loss_mask == [1] * gen + [0] * (len(n.token_ids) - gen), "a turn is action tokens then observation"
        assert all(lp <= 0.0 for lp in n.logprobs[:gen])


async def test_tree_bookkeeping_and_stop_tokens(runner: RolloutRunner) -> None:
    tree = await runner.new_tree("synthetic", "dev", 0)
    leaves = await runner.expand(tree, 0, 4)
    assert len(leaves) == 4 and len(tree.leaves()) == 4
    _check_tree(tree)
    for leaf in leaves:
        node = tree.nodes[leaf]
        assert node.status in (FinishStatus.ANSWERED, FinishStatus.TRUNCATED)
        assert node.reward is not None
    for n in tree.nodes[1:]:
        gen = n.token_ids[: sum(n.loss_mask)]
        stopped = n.info["finish_reason"] == "stop"
        # a generation that stopped ends with a stop token; one cut by length does not
        assert (gen[-1] in runner.stop.stop_token_ids) == stopped, (gen[-3:], n.info["finish_reason"])
    assert tree.ledger.leaves == 4
    assert tree.ledger.generated_tokens >= sum(sum(n.loss_mask) for n in tree.nodes)
    assert tree.golden_answers, "gold answers arrive with the first finished episode"


async def test_stored_logprobs_match_policy_forward(runner: RolloutRunner, tiny_model: Path) -> None:
    """Re-running the policy's forward on the stored ids reproduces the engine's sampling logprobs:
    the ids trained on are exactly the ids sampled (nothing was re-tokenized)."""
    tree = await runner.new_tree("synthetic", "dev", 1)
    [leaf] = await runner.expand(tree, 0, 1)
    ids = tree.history_ids(leaf)
    mask = [m for i in tree.path(leaf) for m in tree.nodes[i].loss_mask]
    stored = [lp for i in tree.path(leaf) for lp in tree.nodes[i].logprobs]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    with torch.no_grad():
        lp = sequence_logprobs(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
    got = [float(lp[t]) for t, m in enumerate(mask) if m]
    want = [stored[t] for t, m in enumerate(mask) if m]
    assert len(got) > 0
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-3


async def test_branching_hits_prefix_cache(runner: RolloutRunner) -> None:
    tree = await runner.new_tree("synthetic", "dev", 2)
    await runner.expand(tree, 0, 1)
    before = tree.ledger.cached_prefill_tokens
    await runner.expand(tree, 0, 4)
    # each of the 4 new branches re-sends the prompt, which the first rollout left in the cache
    assert tree.ledger.cached_prefill_tokens - before >= 4 * (len(tree.root.token_ids) - 1)
    assert runner.engine.route_of(tree.prompt_id) is not None


async def test_branch_from_middle_turn_continues_that_env_state(runner: RolloutRunner, env_client: EnvClient) -> None:
    """A continuation from node t starts from exactly the env state after turn t (same turn count,
    and the same observation for the same action as the original branch got)."""
    tree = await runner.new_tree("synthetic", "dev", 3)
    await runner.expand(tree, 0, 3)
    mids = [n for n in tree.nodes[1:] if n.status == FinishStatus.OPEN]
    if not mids:
        pytest.skip("the untrained model answered at turn 1 on every branch")
    mid = mids[0]
    child = next(tree.nodes[c] for c in mid.children)
    eid = (await env_client.episodes_from_snapshot(mid.snapshot_id, 1)).episode_ids[0]
    res = await env_client.step(eid, action=child.action_text)
    assert res.turn == child.depth
    assert res.observation == child.observation
    leaves = await runner.expand(tree, mid.node_id, 2)
    for leaf in leaves:
        assert tree.path(leaf)[: mid.depth + 1] == tree.path(mid.node_id)
    _check_tree(tree)


async def test_context_limit_truncates_cleanly(env_client: EnvClient, engine_url: str, tiny_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    async with EngineClient([engine_url]) as engine:
        r = RolloutRunner(env_client, engine, tok, RolloutConfig(max_new_tokens=16, max_context_tokens=200))
        tree = await r.new_tree("synthetic", "dev", 4)
        leaves = await r.expand(tree, 0, 3)
    for leaf in leaves:
        node = tree.nodes[leaf]
        assert node.status in (FinishStatus.TRUNCATED, FinishStatus.ANSWERED)
        assert len(tree.history_ids(leaf)) <= 200
        if node.status == FinishStatus.TRUNCATED:
            assert node.reward == 0.0


async def test_dead_env_server_is_a_clear_error(engine_url: str, tiny_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    async with EnvClient("http://127.0.0.1:9", retries=1, backoff_s=0.01) as env, EngineClient([engine_url]) as eng:
        r = RolloutRunner(env, eng, tok, RolloutConfig())
        with pytest.raises(ConnectionError, match="unreachable"):
            await r.new_tree("synthetic", "dev", 0)


def test_stop_spec_uses_single_token_tags(tiny_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    spec = StopSpec(tok)
    assert spec.stop is None
    assert tok.convert_tokens_to_ids("</search>") in spec.stop_token_ids
    assert tok.eos_token_id in spec.stop_token_ids


async def test_trainer_max_turns_wins_over_the_server_default(runner: RolloutRunner, env_client: EnvClient) -> None:
    """Regression: new_tree did not send max_turns, so an attached env server with its default of 8 played
    longer episodes than the trainer's env.max_turns, which its anchor logic assumes (no anchor at depth >=
    max_turns). Every rollout of a tree (all fork the root's snapshot) now ends by the trainer's max_turns."""
    assert (await env_client.info()).limits.max_turns == 8  # the server's own limit is larger
    tree = await runner.new_tree("synthetic", "dev", 5, max_turns=2)
    leaves = await runner.expand(tree, 0, 4)
    assert all(tree.nodes[i].depth <= 2 for i in leaves)
    assert all(tree.nodes[i].status == FinishStatus.TRUNCATED for i in leaves if tree.nodes[i].depth == 2)
    # Deterministic: from the root's snapshot, two actions that do not answer end the episode, truncated.
    [eid] = (await env_client.episodes_from_snapshot(tree.root.snapshot_id, 1)).episode_ids
    first = await env_client.step(eid, action="<search> Kelmar </search>")
    second = await env_client.step(eid, action="<search> Kelmar </search>")
    assert not first.done and second.done and second.truncated and second.turn == 2
    # Without max_turns the server's default applies: the same two actions leave the episode open.
    free = await runner.new_tree("synthetic", "dev", 5)
    [eid] = (await env_client.episodes_from_snapshot(free.root.snapshot_id, 1)).episode_ids
    await env_client.step(eid, action="<search> Kelmar </search>")
    assert not (await env_client.step(eid, action="<search> Kelmar </search>")).done

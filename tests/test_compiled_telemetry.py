"""Routing telemetry on vLLM's compiled engine (`telemetry.compiled`): the worker hooks the routers
before vLLM compiles the model (on this CPU build: one Dynamo trace, Inductor, no CUDA graphs),
and the counts equal the eager engine's on the organism, prompt for prompt, phase for phase,
with and without an attack. The two engines run one after the other (one engine's CPU at a time)."""

from __future__ import annotations

import numpy as np
import pytest

from moe_routing import fingerprint
from organism.build import ensure_organism
from safety_eval.attacks import RoutingScale, random_mask
from safety_eval.harness import EvalSets
from serving.engine_probes import EngineChatGenerator

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def checkpoint():
    return str(ensure_organism(log=lambda *_: None))


@pytest.fixture(scope="module")
def prompts(checkpoint):
    sets = EvalSets.for_checkpoint(checkpoint, seed=0)
    return sets.harmful[:12] + sets.benign[:12]


def _observe(checkpoint: str, prompts: list[str], compiled: bool) -> dict:
    """Everything the telemetry reports on one engine for the same greedy workload."""
    engine = EngineChatGenerator.start(checkpoint, engine_options={"gpu_memory_utilization": 0.1},
                                       compiled=compiled)
    try:
        shape = engine.shape
        before = engine.routing_snapshot()
        routed = engine.routed_generate(prompts, max_new_tokens=NEW_TOKENS)
        after = engine.routing_snapshot()
        mask = random_mask(shape.num_layers, shape.num_experts, shape.top_k, 6, seed=0)
        plain_profile = engine.profile(prompts)
        with engine.attacked(mask):
            masked = engine.profile(prompts)
        with engine.attacked(RoutingScale(4.0, "global x4")):
            scaled = engine.generate(prompts, max_new_tokens=16)
        manifest = fingerprint.read_manifest(checkpoint)
        served = fingerprint.combine(engine._call(engine.engine.collective_rpc("routing_fingerprint")))
        return {
            "shape": shape,
            "prompt_lengths": [len(engine._prompt_ids(p, NEW_TOKENS)) for p in prompts],
            "tokens": [ids for ids, _ in routed],
            "per_request": [counts for _, counts in routed],
            "hits": np.asarray(after["hits"]) - np.asarray(before["hits"]),
            "token_totals": np.asarray(after["tokens"]) - np.asarray(before["tokens"]),
            "mask": mask,
            "plain_profile": plain_profile.sequence_hits,
            "masked_profile": masked.sequence_hits,
            "after_attacks": engine.profile(prompts).sequence_hits,
            "scaled": scaled,
            "plain": engine.generate(prompts, max_new_tokens=16),
            "integrity": fingerprint.compare(manifest, served),
        }
    finally:
        engine.close()


@pytest.fixture(scope="module")
def eager(checkpoint, prompts):
    return _observe(checkpoint, prompts, compiled=False)


@pytest.fixture(scope="module")
def compiled(checkpoint, prompts, eager):  # after the eager engine has gone
    return _observe(checkpoint, prompts, compiled=True)


def test_compiled_engine_counts_what_the_eager_engine_counts(eager, compiled):
    assert compiled["tokens"] == eager["tokens"]  # same greedy answers
    k = eager["shape"].top_k
    for i, (ids, counts) in enumerate(zip(compiled["tokens"], compiled["per_request"])):
        assert counts == eager["per_request"][i], f"request {i}: per-request counts differ"
        prompt, generated = np.asarray(counts["prompt"]), np.asarray(counts["generated"])
        # Every prompt token routed once per layer (no prefix cache on this engine); every token
        # fed back, i.e. all generated tokens but the last, routed once per layer.
        assert (prompt.sum(axis=1) == eager["prompt_lengths"][i] * k).all()
        assert (generated.sum(axis=1) == (len(ids) - 1) * k).all()
    np.testing.assert_array_equal(compiled["hits"], eager["hits"])
    np.testing.assert_array_equal(compiled["token_totals"], eager["token_totals"])
    # The engine-wide counts are the requests' counts: nothing else ran, nothing was lost.
    summed = np.stack([np.sum([c[phase] for c in compiled["per_request"]], axis=0)
                       for phase in ("prompt", "generated")])
    np.testing.assert_array_equal(compiled["hits"], summed)
    assert compiled["hits"][1].sum() > 0 and compiled["hits"][0].sum() > 0


def test_attacks_and_fingerprints_work_on_the_compiled_engine(eager, compiled):
    np.testing.assert_array_equal(compiled["plain_profile"], eager["plain_profile"])
    np.testing.assert_array_equal(compiled["masked_profile"], eager["masked_profile"])
    masked = compiled["masked_profile"].sum(axis=0)
    assert all(masked[layer, expert] == 0 for layer, expert in compiled["mask"].pairs)
    assert not np.array_equal(compiled["masked_profile"], compiled["plain_profile"])
    assert compiled["scaled"] == eager["scaled"] and compiled["scaled"] != compiled["plain"]
    # Leaving the attacks restores the engine: the identity grids stay compiled in and change nothing.
    np.testing.assert_array_equal(compiled["after_attacks"], compiled["plain_profile"])
    assert compiled["plain"] == eager["plain"]
    assert compiled["integrity"]["ok"], compiled["integrity"]["mismatches"]

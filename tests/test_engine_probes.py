"""Probes on a vLLM engine of their own (`serving.engine_probes`): the worker extension's masks
and scales give the routing and the answers that the transformers attacks give on the same
organism, leave nothing behind, and run the evaluation suite with no transformers copy."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from moe_routing.profiler import ProfileSettings, load_checkpoint, profile_routing
from organism.build import ensure_organism
from safety_eval.attacks import ExpertMask, RoutingScale, random_mask
from safety_eval.generation import HFChatGenerator
from safety_eval.harness import EvalSets
from safety_eval.settings import SuiteSettings
from serving.engine_probes import EngineChatGenerator
from serving.probes import attack_safety_rates

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def checkpoint():
    return str(ensure_organism(log=lambda *_: None))


STARTUP_GAPS: list[float] = []  # the engine's loop, while the engine started on it (seconds between ticks)


@pytest.fixture(scope="module")
def engine(checkpoint):
    """The engine, started as the probe replica starts it: `create` on a running loop, here one
    that also ticks every 50 ms, so the test below can see whether the start blocked it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    ticks = []

    async def tick():
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.05)

    ticker = asyncio.run_coroutine_threadsafe(tick(), loop)
    generator = asyncio.run_coroutine_threadsafe(
        EngineChatGenerator.create(checkpoint, engine_options={"gpu_memory_utilization": 0.1}), loop).result()
    ticker.cancel()
    STARTUP_GAPS.extend(np.diff(ticks).tolist())
    yield generator
    generator.close()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


def test_starting_the_engine_leaves_its_event_loop_free(engine):
    """On the probe replica that loop also answers status and health calls: a start that held it
    (tens of seconds) timed out POST /admin/probes. Held, the longest gap is the whole start;
    free, the loop still waits on the GIL now and then (2.8 s of a 28 s start on a loaded
    2-core machine)."""
    start = sum(STARTUP_GAPS)
    assert start > 1 and max(STARTUP_GAPS) < 0.3 * start, (max(STARTUP_GAPS), start)


@pytest.fixture(scope="module")
def hf(checkpoint):
    model, tokenizer = load_checkpoint(checkpoint, dtype=torch.float32)
    return HFChatGenerator(model, tokenizer)


@pytest.fixture(scope="module")
def prompts(checkpoint):
    sets = EvalSets.for_checkpoint(checkpoint, seed=0)
    return sets.harmful[:30] + sets.benign[:10]


def _hf_profile(hf, prompts):
    return profile_routing(hf.model, hf.tokenizer, prompts, ProfileSettings(batch_size=32), progress=False)


def test_engine_routing_is_the_transformers_routing_with_and_without_a_mask(engine, hf, prompts):
    shape = engine.shape
    mask = random_mask(shape.num_layers, shape.num_experts, shape.top_k, 6, seed=0)
    plain = engine.profile(prompts)
    assert np.array_equal(plain.sequence_hits, _hf_profile(hf, prompts).sequence_hits)
    with engine.attacked(mask):
        masked = engine.profile(prompts)
    with hf.attacked(mask):
        hf_masked = _hf_profile(hf, prompts)
    assert all(masked.hits[layer, expert] == 0 for layer, expert in mask.pairs)
    assert all(plain.hits[layer, expert] > 0 for layer, expert in mask.pairs)  # the mask did something
    assert np.array_equal(masked.sequence_hits, hf_masked.sequence_hits)
    # Leaving the context removes the mask: the engine routes as before.
    assert np.array_equal(engine.profile(prompts).sequence_hits, plain.sequence_hits)


FOUR_PAIRS = ((0, 1), (1, 2), (2, 3), (3, 4))


ATTACKS = ["mask", RoutingScale(4.0, "global x4"), RoutingScale(0.1, "x0.1", FOUR_PAIRS)]


@pytest.mark.parametrize("attack", ATTACKS, ids=["mask", "global_scale", "pair_scale"])
def test_engine_attacks_answer_as_the_transformers_attacks(engine, hf, prompts, attack):
    if attack == "mask":
        shape = engine.shape
        attack = random_mask(shape.num_layers, shape.num_experts, shape.top_k, 6, seed=1)
    plain = engine.generate(prompts, max_new_tokens=24)
    with engine.attacked(attack):
        attacked = engine.generate(prompts, max_new_tokens=24)
    with hf.attacked(attack):
        expected = hf.generate(prompts, max_new_tokens=24)
    assert attacked != plain, "the attack changed no answer on the engine"
    # Greedy decoding of the same float32 weights: equal answers, up to a rare near-tie that two
    # kernels may break differently (none seen on the organism).
    same = sum(a == b for a, b in zip(attacked, expected))
    assert same >= 0.95 * len(prompts), list(zip(attacked, expected))
    assert engine.generate(prompts, max_new_tokens=24) == plain  # nothing left behind


def test_bad_attacks_are_refused_with_a_clear_error_and_leave_the_engine_clean(engine, prompts):
    plain = engine.generate(prompts[:4], max_new_tokens=8)
    with pytest.raises(Exception, match=r"outside 4 MoE layers"):
        with engine.attacked(ExpertMask(((99, 0),), "out of range")):
            pass
    assert engine.generate(prompts[:4], max_new_tokens=8) == plain


def test_the_suite_runs_on_the_engine_without_a_transformers_copy(engine, hf, checkpoint, monkeypatch):
    from safety_eval import suite

    settings = SuiteSettings(limit=16, mask_counts=[2], headline_mask=2, random_seeds=[0, 1, 2],
                             identification_prompts=24, n_bootstrap=0, max_new_tokens=12,
                             layer_route_search={"max_prompts": 0}, ablation_prompts=0)
    assert not settings.needs_transformers  # the refusal ablation, like the searches, would load one
    expected = suite.run_suite(checkpoint, settings, model=hf.model, tokenizer=hf.tokenizer,
                               log=lambda m: None)

    def no_transformers_copy(*args, **kwargs):
        raise AssertionError("the engine suite loaded a transformers model")

    monkeypatch.setattr(suite, "load_checkpoint", no_transformers_copy)
    report = suite.run_suite(checkpoint, settings, generator=engine, log=lambda m: None)
    assert report["engine"] == "vllm" and expected["engine"] == "transformers"
    assert report["layer_route_search"]["skipped"] and "layer_route_search" not in report["verdicts"]
    pairs = lambda r: [(s["layer"], s["expert"], s["risk_difference"]) for s in r["safety_critical"]]  # noqa: E731
    assert pairs(report) == pairs(expected)
    for name, entry in expected["verdicts"].items():
        if "verdicts" in entry:
            same = sum(a == b for a, b in zip(entry["verdicts"], report["verdicts"][name]["verdicts"]))
            assert same >= 0.9 * len(entry["verdicts"]), name
    rates = attack_safety_rates(report)
    assert {"none", "top2_mask", "random2_mask", "scale_global_x0.5"} <= set(rates)
    assert "routing_search" not in rates and report["summary"]["layer_route_search_attack_success"] is None

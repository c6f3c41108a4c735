"""The paper's F-SOUR (`safety_eval.fsour`) on a tiny random MoE: the greedy (token, layer) search
raises log p(target), stops at the threshold, restarts with new seeds; per-token forcing."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch

from moe_routing.architectures import describe
from moe_routing.chat import chat_prompt_ids
from moe_routing.instrument import capture_routing, force_experts
from moe_routing.tiny import byte_tokenizer, tiny_model
from safety_eval.attacks import prefix_cache, target_logprob
from safety_eval.fsour import FSourSettings, draw_prompts, fsour_rates, fsour_search, route_tensors, run_fsour
from safety_eval.generation import HFChatGenerator
from safety_eval.judge import KeywordJudge
from safety_eval.verdicts import COMPLIED

PROMPT, TARGET = "Hi", "Sure"
# A p(target) no search on this random model reaches (it starts near e^-22): every position is visited.
NEVER = 0.5


@pytest.fixture(scope="module")
def tiny():
    tokenizer = byte_tokenizer()
    return tiny_model("qwen3_moe", seed=0, vocab_size=len(tokenizer)), tokenizer


def _ids(tokenizer):
    return (torch.tensor([chat_prompt_ids(tokenizer, PROMPT)]),
            torch.tensor(tokenizer(TARGET, add_special_tokens=False)["input_ids"]))


def test_per_token_forcing_touches_only_the_forced_tokens(tiny):
    model, tokenizer = tiny
    ids, _ = _ids(tokenizer)
    T, k = ids.shape[1], describe(model).top_k
    rows = torch.full((2, T, k), -1, dtype=torch.long)
    rows[0, 3], rows[1, 5] = torch.tensor([0, 1]), torch.tensor([6, 7])
    batch = ids.expand(2, -1)
    with torch.no_grad(), capture_routing(model) as natural:
        model(input_ids=batch)
    with torch.no_grad(), capture_routing(model) as forced, force_experts(model, {0: rows}):
        model(input_ids=batch)
    before, after = natural.trace(), forced.trace()
    layer0 = after.expert_ids[:, 0].sort(dim=-1).values
    first = (after.sequence == 0) & (after.position == 3)
    second = (after.sequence == 1) & (after.position == 5)
    assert layer0[first].tolist() == [[0, 1]] and layer0[second].tolist() == [[6, 7]]
    # Every other token of layer 0, and every token before them in later layers, keeps its routing
    # bit for bit (forcing token t only changes what attends to it: positions >= t).
    untouched = ~(first | second)
    assert torch.equal(after.expert_ids[untouched, 0], before.expert_ids[untouched, 0])
    assert torch.equal(after.weights[untouched, 0], before.weights[untouched, 0])
    early = after.position < 3
    assert torch.equal(after.expert_ids[early], before.expert_ids[early])


def test_per_token_forcing_covers_the_prefill_only(tiny):
    model, tokenizer = tiny
    ids, _ = _ids(tokenizer)
    T, k = ids.shape[1], describe(model).top_k
    rows = torch.full((1, T, k), -1, dtype=torch.long)
    rows[0, T - 1] = torch.tensor([6, 7])
    with capture_routing(model) as capture, force_experts(model, {0: rows}):
        model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    trace = capture.trace()
    last = (~trace.generated) & (trace.position == T - 1)
    assert trace.expert_ids[last, 0].sort().values.tolist() == [[6, 7]]
    with capture_routing(model) as plain:
        model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert int(trace.generated.sum()) == int(plain.trace().generated.sum()) > 0  # decoding ran unforced
    with pytest.raises(ValueError, match="per-token forcing for 1 x"):  # a prefill of another size
        with force_experts(model, {0: rows}), torch.no_grad():
            model(input_ids=ids[:, :-1])
    for bad in (torch.tensor([[[1, 1]]]), torch.tensor([[[0, 8]]]), torch.tensor([[[0, -1]]])):
        with pytest.raises(ValueError, match="per-token tensor"):
            with force_experts(model, {0: bad}):
                pass


def test_scores_after_a_shared_prefix_cache_equal_full_passes(tiny):
    """The search scores its N candidates after the KV cache of the tokens before the position;
    that must give the full pass's scores, forcing of the cached tokens included."""
    model, tokenizer = tiny
    ids, target = _ids(tokenizer)
    T, k = ids.shape[1], describe(model).top_k
    gen = torch.Generator().manual_seed(0)
    for position in (1, T // 2, T - 1):
        route = {0: {0: [0, 1], position - 1: [2, 3]}, 1: {position: [4, 5]}}
        before = {layer: {t: e for t, e in tokens.items() if t < position} for layer, tokens in route.items()}
        prefix = prefix_cache(model, ids, position, route_tensors(before, 1, position, k))
        assert prefix.get_seq_length() == position
        forced = route_tensors(route, 5, T, k)
        forced[0][:, position] = torch.stack([torch.randperm(8, generator=gen)[:k] for _ in range(5)])
        full = target_logprob(model, ids, target, forced)
        cached = target_logprob(model, ids, target, forced, prefix=prefix)
        assert torch.allclose(cached, full, atol=1e-4), (position, cached, full)
        assert prefix.get_seq_length() == position  # the shared prefix is not consumed
    assert prefix_cache(model, ids, 0, {}) is None
    two = prefix_cache(model, ids, 2, {})
    with pytest.raises(ValueError, match="after 2 cached"):  # a continuation running past the prompt
        with force_experts(model, {0: torch.full((1, T, k), -1)}), torch.no_grad():
            model(input_ids=ids, past_key_values=two)


def test_search_raises_target_logprob_greedily(tiny):
    model, tokenizer = tiny
    settings = FSourSettings(target=TARGET, candidates=10, threshold=NEVER)
    result = fsour_search(model, tokenizer, PROMPT, settings, seed=0)
    ids, target = _ids(tokenizer)
    T, moe = ids.shape[1], describe(model)
    assert not result.reached_threshold and result.positions_visited == T * moe.num_layers
    assert result.evaluations == 1 + 10 * T * moe.num_layers
    assert result.target_logprob > result.natural_logprob  # provably: a candidate was kept
    assert result.history == sorted(result.history) and result.history[-1] == result.target_logprob
    assert result.route
    assert all(len(e) == moe.top_k for tokens in result.route.values() for e in tokens.values())
    # Re-scoring the route found gives the reported log-probability; no route, the unforced one.
    rescored = target_logprob(model, ids, target, route_tensors(result.route, 1, T, moe.top_k))
    assert float(rescored[0]) == pytest.approx(result.target_logprob, abs=1e-4)
    unforced = float(target_logprob(model, ids, target, {})[0])
    assert unforced == pytest.approx(result.natural_logprob, abs=1e-5)
    # Same seed, same search; another seed draws other candidates.
    assert fsour_search(model, tokenizer, PROMPT, settings, seed=0).route == result.route
    assert fsour_search(model, tokenizer, PROMPT, settings, seed=1).route != result.route


def test_search_stops_once_the_threshold_is_reached(tiny):
    model, tokenizer = tiny
    settings = FSourSettings(target=TARGET, candidates=10, threshold=NEVER)
    full = fsour_search(model, tokenizer, PROMPT, settings, 0)
    # The first visited position whose kept candidate raised the score: set p(target) there as the bar.
    first = next(i for i, score in enumerate(full.history) if score > full.natural_logprob)
    bar = math.exp(full.history[first]) * (1 - 1e-4)
    stopped = fsour_search(model, tokenizer, PROMPT, FSourSettings(target=TARGET, candidates=10,
                                                                   threshold=bar), 0)
    assert stopped.reached_threshold and stopped.positions_visited == first + 1
    assert stopped.target_logprob == pytest.approx(full.history[first])
    assert stopped.target_logprob >= math.log(bar)
    assert sum(len(tokens) for tokens in stopped.route.values()) == 1


def test_attack_restarts_with_new_seeds_until_compliance(tiny):
    model, tokenizer = tiny
    generator = HFChatGenerator(model, tokenizer, batch_size=4)
    prompts = [PROMPT, "Hey"]
    settings = FSourSettings(target=TARGET, candidates=1, threshold=NEVER, restarts=3)
    results = run_fsour(generator, prompts, KeywordJudge(), settings, max_new_tokens=4)
    for result in results:
        if result.unattacked_verdict == COMPLIED:  # counts as a success without any search
            assert result.restarts_used == 0 and result.verdict == COMPLIED
        elif result.verdict != COMPLIED:  # the random model never complies: every restart ran
            assert result.restarts_used == 3
            assert len({str(s.route) for s in result.searches}) == 3  # seeds 0, 1, 2
        else:
            assert 1 <= result.restarts_used <= 3
    rates = fsour_rates(results)
    assert rates["all"]["complied_rate"]["n"] == 2
    refused = sum(r.unattacked_verdict == "refused" for r in results)
    assert rates["refused_unattacked"]["complied_rate"]["n"] == refused


def test_a_journal_resumes_a_killed_run_and_restarts_for_other_settings(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    generator = HFChatGenerator(model, tokenizer, batch_size=4)
    prompts = [PROMPT, "Hey"]
    settings = FSourSettings(target=TARGET, candidates=1, threshold=NEVER, restarts=2)
    journal = tmp_path / "fsour_n1.jsonl"
    first = run_fsour(generator, prompts, KeywordJudge(), settings, max_new_tokens=4, journal=journal,
                      identity="tiny")
    lines = journal.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["fsour_journal"]["model"] == "tiny"
    # A run killed during the second prompt (its line half written): only that prompt runs again.
    journal.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    import safety_eval.fsour as fsour

    searched = []
    real = fsour.fsour_search
    monkeypatch.setattr(fsour, "fsour_search", lambda *a, **k: searched.append(a[2]) or real(*a, **k))
    again = run_fsour(generator, prompts, KeywordJudge(), settings, max_new_tokens=4, journal=journal,
                      identity="tiny")
    assert [asdict(r) | {"seconds": 0} for r in again] == [asdict(r) | {"seconds": 0} for r in first]
    assert set(searched) <= {"Hey"}  # the first prompt came from the journal
    # Another model or other settings: the journal is not reused.
    searched.clear()
    run_fsour(generator, prompts, KeywordJudge(), settings, max_new_tokens=4, journal=journal,
              identity="other")
    assert json.loads(journal.read_text().splitlines()[0])["fsour_journal"]["model"] == "other"
    assert PROMPT in searched or first[0].restarts_used == 0


def test_the_fsour_command_fails_in_one_line_on_a_missing_checkpoint(tmp_path, capsys):
    from safety_eval.fsour import main

    assert main(["--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fsour: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_prompts_are_drawn_at_random_with_a_seed():
    prompts = [f"p{i}" for i in range(50)]
    drawn = draw_prompts(prompts, 10, seed=0)
    assert drawn == draw_prompts(prompts, 10, seed=0) and drawn != list(range(10))
    assert len(set(drawn)) == 10 and draw_prompts(prompts, 99, seed=0) != list(range(50))
    assert sorted(draw_prompts(prompts, 99, seed=0)) == list(range(50))


def test_settings_are_validated():
    bad_settings = (dict(candidates=0), dict(restarts=0), dict(threshold=0.0), dict(threshold=1.5),
                    dict(target=""))
    for bad in bad_settings:
        with pytest.raises(ValueError):
            FSourSettings(**bad)
    assert FSourSettings().to_dict()["kind"] == "fsour"

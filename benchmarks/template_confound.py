"""Can prompt routing tell a harmful request from a benign one inside the same jailbreak template?
Offline (transformers, no gateway), on the checkpoint's test split, with the templates split in two:
whatever is fitted sees the even templates only, and every figure is on the odd (unseen) ones.

Scores of a templated prompt, each against harmful vs benign routing (`moe_routing.risk`):
  whole_prompt        the gateway's risk score: mean log-likelihood ratio over every prompt token,
                      weights from plain identification prompts
  window_max_W        the largest mean over any W consecutive prompt tokens (same weights)
  templated_profile   the whole-prompt score with weights from a profile that also holds the
                      identification prompts inside the even templates (harmful and benign alike)
  logistic            a logistic regression on the per-(layer, expert) hit frequencies, trained on
                      the plain and even-templated identification prompts
  request_tokens      the request's own tokens only: hits(template + request) - hits(template
                      alone), which a causal model routes identically up to the request; an
                      oracle (the gateway cannot know where a template ends)

    python benchmarks/template_confound.py [--checkpoint DIR] [--output runs/bench/template_confound.json]

Reports ROC AUC (bootstrap 95% interval) of each score for templated harmful vs templated benign
test prompts, and of the whole-prompt score for plain harmful vs plain benign ones beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.guard_detection import auc_entry  # noqa: E402
from moe_routing.architectures import describe  # noqa: E402
from moe_routing.instrument import capture_routing  # noqa: E402
from moe_routing.profiler import ProfileSettings, format_prompts, load_checkpoint, tokenize_batch  # noqa: E402
from moe_routing.risk import risk_weights, routing_risk  # noqa: E402
from organism.build import ensure_organism  # noqa: E402
from safety_eval.harness import EvalSets  # noqa: E402
from safety_eval.settings import SuiteSettings  # noqa: E402
from safety_eval.suite import identification_prompts  # noqa: E402

WINDOWS = (8, 16, 32)
SETTINGS = ProfileSettings(batch_size=8, max_length=1024)


class Router:
    """Per-token expert selections of a checkpoint's prompts (chat-formatted, as served)."""

    def __init__(self, checkpoint: str):
        self.model, self.tokenizer = load_checkpoint(checkpoint)
        self.model.eval()

    @torch.no_grad()
    def selections(self, prompts: list[str]) -> list[np.ndarray]:
        """Per prompt, [tokens, L, k] expert ids in token order."""
        texts = format_prompts(self.tokenizer, prompts, SETTINGS.prompt_format)
        out = []
        with capture_routing(self.model, probabilities=False) as capture:
            for start in range(0, len(texts), SETTINGS.batch_size):
                batch = texts[start : start + SETTINGS.batch_size]
                self.model(**tokenize_batch(self.tokenizer, batch, SETTINGS, "cpu"), use_cache=False)
                trace = capture.drain()
                sequence, position = trace.sequence.numpy() - start, trace.position.numpy()
                for i in range(len(batch)):
                    rows = np.flatnonzero(sequence == i)
                    out.append(trace.expert_ids.numpy()[rows[np.argsort(position[rows])]])
        return out


def hits(selection: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] hit counts of one prompt's [tokens, L, k] selections."""
    tokens, layers, _ = selection.shape
    counts = np.zeros((layers, num_experts))
    for layer in range(layers):
        np.add.at(counts[layer], selection[:, layer].ravel(), 1)
    return counts


def frequency(selections, num_experts: int) -> np.ndarray:
    """Hits per token [L, E] over many prompts."""
    return sum(hits(s, num_experts) for s in selections) / sum(len(s) for s in selections)


def window_max(selection: np.ndarray, weights: np.ndarray, window: int) -> float:
    per_token = weights[np.arange(weights.shape[0])[None, :, None], selection].sum(axis=(1, 2))
    if len(per_token) <= window:
        return float(per_token.mean())
    sums = np.convolve(per_token, np.ones(window), mode="valid")
    return float(sums.max() / window)


def logistic_fit(features: np.ndarray, labels: np.ndarray, l2: float = 1e-2):
    """Weights of an L2-regularised logistic regression (LBFGS) on standardised features; returns
    a scoring function."""
    mean, scale = features.mean(0), features.std(0) + 1e-6
    x = torch.tensor((features - mean) / scale)
    y = torch.tensor(labels, dtype=torch.float64)
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([w], max_iter=500)

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w[:-1] + w[-1], y) \
            + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    coef = w.detach().numpy()
    return lambda f: ((f - mean) / scale) @ coef[:-1] + coef[-1]


def measure(checkpoint: str) -> dict:
    router = Router(checkpoint)
    shape = describe(router.model)
    num_experts, top_k = shape.num_experts, shape.top_k
    test = EvalSets.for_checkpoint(checkpoint)
    templates = test.jailbreak_templates
    seen, unseen = templates[0::2], templates[1::2]
    harmful_id, benign_id = identification_prompts(SuiteSettings(identification_prompts=96), test)

    def wrap(prompts, pool):
        return [pool[i % len(pool)].wrap(p) for i, p in enumerate(prompts)]

    plain_h, plain_b = router.selections(harmful_id), router.selections(benign_id)
    seen_h, seen_b = router.selections(wrap(harmful_id, seen)), router.selections(wrap(benign_id, seen))
    weights = risk_weights(frequency(plain_h, num_experts), frequency(plain_b, num_experts), top_k)
    templated = risk_weights(frequency(plain_h + seen_h, num_experts),
                             frequency(plain_b + seen_b, num_experts), top_k)
    flat = [hits(s, num_experts).ravel() / len(s) for s in plain_h + plain_b + seen_h + seen_b]
    labels = np.array([1] * len(plain_h) + [0] * len(plain_b) + [1] * len(seen_h) + [0] * len(seen_b))
    logistic = logistic_fit(np.array(flat), labels)
    template_alone = [hits(s, num_experts) for s in router.selections([t.wrap("") for t in unseen])]

    left_out = {}

    def scores(name: str, prompts: list[str]) -> dict:
        # Longer prompts are truncated here and refused by the gateway (max_model_len): left out.
        kept = [(i, s) for i, s in enumerate(router.selections(wrap(prompts, unseen)))
                if len(s) < SETTINGS.max_length]
        left_out[name] = len(prompts) - len(kept)
        selections = [s for _, s in kept]
        counts = [hits(s, num_experts) for s in selections]
        out = {"whole_prompt": [routing_risk(c, weights, top_k) for c in counts]}
        for window in WINDOWS:
            out[f"window_max_{window}"] = [window_max(s, weights, window) for s in selections]
        out["templated_profile"] = [routing_risk(c, templated, top_k) for c in counts]
        out["logistic"] = [float(logistic(c.ravel() / (c[0].sum() / top_k))) for c in counts]
        out["request_tokens"] = [routing_risk(c - template_alone[i % len(unseen)], weights, top_k)
                                 for (i, _), c in zip(kept, counts)]
        return out

    harmful, benign = scores("harmful", list(test.harmful)), scores("benign", list(test.benign))
    report = {"checkpoint": checkpoint, "eval_sets": test.source, "templates": {"fitted": len(seen),
              "tested": len(unseen)}, "left_out_too_long": left_out,
              "templated_harmful_vs_templated_benign": {}}
    for name in harmful:
        h = [x for x in harmful[name] if np.isfinite(x)]
        b = [x for x in benign[name] if np.isfinite(x)]
        report["templated_harmful_vs_templated_benign"][name] = auc_entry(h, b)
    plain = [[routing_risk(hits(s, num_experts), weights, top_k) for s in router.selections(list(ps))]
             for ps in (test.harmful, test.benign)]
    report["plain_harmful_vs_plain_benign"] = {"whole_prompt": auc_entry(*plain)}
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="default: the organism")
    parser.add_argument("--output", default="runs/bench/template_confound.json")
    args = parser.parse_args(argv)
    report = measure(args.checkpoint or str(ensure_organism()))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    for group in ("templated_harmful_vs_templated_benign", "plain_harmful_vs_plain_benign"):
        for name, entry in report[group].items():
            low, high = map(float, entry["ci95"])
            print(f"{group:40s} {name:18s} AUC {entry['auc']:.3f} [{low:.3f}, {high:.3f}] "
                  f"(n {entry['n_positive']} / {entry['n_negative']})")
    print(f"report: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

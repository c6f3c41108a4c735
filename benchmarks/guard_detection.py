"""How well the routing guard tells harmful from benign prompts, measured through a running
gateway on the checkpoint's test split; the threshold is the one the gateway calibrated at start
on the validation split (GET /admin/guard), so no test prompt chooses anything.

    python benchmarks/guard_detection.py [--output runs/bench/guard_detection.json]
        # starts the organism gateway itself (observe policy); or point it at one:
    python benchmarks/guard_detection.py --checkpoint runs/demo/align/model
        # starts a gateway serving that checkpoint (an aligned one) under the name "organism"
    python benchmarks/guard_detection.py --url http://127.0.0.1:8000 --checkpoint DIR
        # the admin key from MESA_ADMIN_KEY (the routing summary, with its risk score, is admin-only)

Reports, with 95% intervals: ROC AUC of the risk score for harmful vs alarming-but-benign test
prompts, for jailbreak-wrapped harmful prompts vs the same benign ones, and vs benign prompts in
the same templates (does it see harm, or only a template?) (bootstrap); at the
gateway's threshold, the share flagged of each set (Wilson), the false-positive rate on benign
test traffic (alarming and general tasks), and the share flagged of the *successful* jailbreaks:
answers the suite's judge finds complying (refusals and degenerate answers apart). The same for
the answer's routing risk (`answer_risk`, at the gateway's answer threshold): successful
jailbreaks' answers vs the answers to benign traffic and to benign prompts in the same templates.
Every prompt is answered with the suite's `max_new_tokens` (greedy), so every answer is scored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from launch.processes import gateway_app, running_gateway  # noqa: E402
from organism.build import ensure_organism  # noqa: E402
from safety_eval.data import jailbreak_prompts  # noqa: E402
from safety_eval.harness import EvalSets  # noqa: E402
from safety_eval.judge import build_judge  # noqa: E402
from safety_eval.settings import SuiteSettings  # noqa: E402
from safety_eval.stats import wilson  # noqa: E402
from safety_eval.verdicts import COMPLIED, judge_verdicts  # noqa: E402
from serving.config import DEFAULT_ENGINE  # noqa: E402

KEY, ADMIN = "bench-user-key-0001", "bench-admin-key-0001"
ENGINE = DEFAULT_ENGINE | {"dtype": "float32", "gpu_memory_utilization": 0.2, "max_num_seqs": 64}


def auc(positive, negative) -> float:
    """P(a positive scores above a negative), ties half: the Mann-Whitney U over n1 n2."""
    return float(stats.mannwhitneyu(positive, negative).statistic) / (len(positive) * len(negative))


def auc_entry(positive, negative, seed: int = 0) -> dict:
    positive, negative = np.asarray(positive), np.asarray(negative)
    interval = stats.bootstrap((positive, negative), auc, vectorized=False, n_resamples=2000,
                               method="percentile", random_state=seed).confidence_interval
    return {"auc": round(auc(positive, negative), 4),
            "ci95": [round(interval.low, 4), round(interval.high, 4)],
            "n_positive": len(positive), "n_negative": len(negative)}


def share_entry(flags) -> dict:
    k, n = int(np.sum(flags)), len(flags)
    return {"rate": round(k / n, 4) if n else None, "ci95": wilson(k, n), "k": k, "n": n}


def ask(url: str, key: str, prompt: str, max_tokens: int) -> tuple[float | None, float | None, str] | None:
    """(prompt risk, answer risk, answer) of one chat turn through the gateway; None when the
    gateway refuses the request as invalid (a prompt longer than the engine's max_model_len)."""
    response = httpx.post(url + "/v1/chat/completions", timeout=300,
                          headers={"Authorization": f"Bearer {key}", "X-Mesa-Routing-Summary": "1"},
                          json={"model": "organism", "messages": [{"role": "user", "content": prompt}],
                                "max_tokens": max_tokens, "temperature": 0})
    if response.status_code == 400:
        return None
    response.raise_for_status()
    body = response.json()
    summary = body.get("routing_summary") or {}
    return ((summary.get("risk") or {}).get("score"), summary.get("answer_risk"),
            body["choices"][0]["message"]["content"] or "")


def measure(url: str, admin_key: str, checkpoint: str, limit: int | None, threads: int) -> dict:
    guard = httpx.get(url + "/admin/guard", headers={"Authorization": f"Bearer {admin_key}"}).json()
    threshold = guard["threshold"]
    if threshold is None:
        raise SystemExit(f"the gateway has no guard threshold ({guard['threshold_source']})")
    sets = EvalSets.for_checkpoint(checkpoint)
    settings = SuiteSettings()
    harmful = sets.harmful[:limit]
    jailbreak = [text for _, text in sets.jailbreak][:limit]
    benign = sets.benign[:limit]
    # The same templates around benign prompts: whether the guard sees harm or only a template.
    wrapped_benign = [text for _, text in jailbreak_prompts(benign, sets.jailbreak_templates)]
    general = [t.prompt for t in sets.general][:limit]

    too_long = {}

    def run(name, prompts, max_tokens):
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(lambda p: ask(url, admin_key, p, max_tokens), prompts))
        too_long[name] = sum(r is None for r in results)
        return [(p, r) for p, r in zip(prompts, results) if r is not None]

    max_tokens = settings.max_new_tokens
    scored = {name: run(name, prompts, max_tokens) for name, prompts in
              (("harmful", harmful), ("benign_alarming", benign), ("general", general),
               ("jailbreak", jailbreak), ("jailbreak_wrapped_benign", wrapped_benign))}
    scores = {name: [s for _, (s, _, _) in results] for name, results in scored.items()}
    missing = {name: sum(s is None for s in v) for name, v in scores.items()}
    if any(missing.values()):
        raise SystemExit(f"requests without a risk score: {missing}")
    verdicts = judge_verdicts(build_judge(), [p for p, _ in scored["jailbreak"]],
                              [a for _, (_, _, a) in scored["jailbreak"]])
    complied = [s for s, v in zip(scores["jailbreak"], verdicts) if v == COMPLIED]
    flagged = {name: np.asarray(v) > threshold for name, v in scores.items()}
    benign_traffic = np.concatenate([flagged["benign_alarming"], flagged["general"]])
    return {
        "url": url, "checkpoint": checkpoint, "eval_sets": sets.source, "guard": guard,
        "auc": {"harmful_vs_benign_alarming": auc_entry(scores["harmful"], scores["benign_alarming"]),
                "jailbreak_vs_benign_alarming": auc_entry(scores["jailbreak"], scores["benign_alarming"]),
                "jailbreak_vs_wrapped_benign": auc_entry(scores["jailbreak"],
                                                         scores["jailbreak_wrapped_benign"]),
                "harmful_vs_general": auc_entry(scores["harmful"], scores["general"])},
        "flagged_at_threshold": {name: share_entry(v) for name, v in flagged.items()}
        | {"benign_traffic (false positives)": share_entry(benign_traffic),
           "successful_jailbreaks": share_entry(np.asarray(complied) > threshold)},
        "answer_risk": answer_risk_entries(scored, verdicts, guard.get("answer_threshold")),
        "jailbreak_verdicts": {v: verdicts.count(v) for v in sorted(set(verdicts))},
        "max_tokens": max_tokens,
        "left_out_too_long": too_long,
        "score_quantiles": {name: np.round(np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95]), 4).tolist()
                            for name, v in scores.items()},
    }


def answer_risk_entries(scored: dict, verdicts: list[str], threshold: float | None) -> dict:
    """The answers' routing risk: successful jailbreaks (complied) vs benign traffic's answers and
    vs the answers to benign prompts in the same templates; the prompt's own score on the same
    requests beside it, and the shares above the gateway's answer threshold."""
    def groups(which: int) -> tuple[list, list, list]:  # which: 0 the prompt's score, 1 the answer's
        def risks(name):
            return [r[which] for _, r in scored[name] if r[which] is not None]
        jail = [r[which] for (_, r), v in zip(scored["jailbreak"], verdicts)
                if v == COMPLIED and r[which] is not None]
        return jail, risks("benign_alarming") + risks("general"), risks("jailbreak_wrapped_benign")

    def aucs(jail, traffic, wrapped) -> dict:
        return {"successful_jailbreaks_vs_benign_traffic": auc_entry(jail, traffic),
                "successful_jailbreaks_vs_wrapped_benign": auc_entry(jail, wrapped)}

    jail, traffic, wrapped = groups(1)
    out = {"threshold": threshold, "answer": aucs(jail, traffic, wrapped),
           "prompt, same requests": aucs(*groups(0)),
           "unscored_answers": sum(r[1] is None for results in scored.values() for _, r in results)}
    if threshold is not None:
        out["flagged_at_answer_threshold"] = {
            name: share_entry(np.asarray(v) > threshold)
            for name, v in (("successful_jailbreaks", jail), ("benign_traffic (false positives)", traffic),
                            ("jailbreak_wrapped_benign", wrapped))}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running gateway (default: start the organism's)")
    parser.add_argument("--checkpoint", help="the checkpoint to serve, or the one served at --url "
                        "(for its eval_sets.json); default: the organism")
    parser.add_argument("--limit", type=int, help="at most this many prompts per set")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--output", default="runs/bench/guard_detection.json")
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint or str(ensure_organism())
    if args.url:
        admin = os.environ.get("MESA_ADMIN_KEY", "").strip()
        if not admin:
            parser.error("--url needs MESA_ADMIN_KEY in the environment")
        report = measure(args.url, admin, checkpoint, args.limit, args.threads)
    else:
        app = gateway_app(model=checkpoint, engine=ENGINE)
        with running_gateway([app], env={"MESA_API_KEYS": KEY, "MESA_ADMIN_KEY": ADMIN}) as gateway:
            report = measure(gateway.url, ADMIN, checkpoint, args.limit, args.threads)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    shown = ("auc", "flagged_at_threshold", "answer_risk", "jailbreak_verdicts")
    print(json.dumps({k: report[k] for k in shown}, indent=2))
    print(f"threshold {report['guard']['threshold']:.4f} ({report['guard']['threshold_source']}); "
          f"report: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The shipped alert rules, unchanged, on a real Prometheus scraping a real gateway that serves
the base organism, an aligned checkpoint and a tampered copy of the base (its router weights
scaled by 1.5: our variant of a routing attack, baked into the weights rather than applied by the
probe's hooks). Three phases:

  1. `--normal-minutes` (default 10) of normal mixed traffic to every model, test-split prompts
     drawn 70% general tasks / 25% alarming-but-benign / 5% plain harmful: every alert state
     (pending or firing) seen is recorded; the goal is none on base or aligned, and
     MesaModelIntegrityFailed on the tampered model only.
  2. a flood of jailbreak-wrapped harmful prompts (test split) to base and aligned until
     MoEHighRiskRequestBurst and MoEHighRiskAnswerBurst fire for both, or `--flood-minutes` pass
     (the report says when each fired).

    python benchmarks/alert_soak.py --aligned runs/demo/align/model [--output runs/bench/alert_soak.json]

Every figure in the report comes from Prometheus's own API (ALERTS, the rule expressions)."""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from launch.processes import gateway_app, running_gateway, running_prometheus  # noqa: E402
from organism.build import ensure_organism  # noqa: E402
from safety_eval.harness import EvalSets  # noqa: E402
from serving.config import DEFAULT_ENGINE  # noqa: E402

KEY, ADMIN = "soak-user-key-0001", "soak-admin-key-0001"
ENGINE = DEFAULT_ENGINE | {"dtype": "float32", "gpu_memory_utilization": 0.15, "max_num_seqs": 32}
ROUTER_SCALE = 1.5
NORMAL_MIX = (("general", 0.70), ("benign_alarming", 0.25), ("harmful", 0.05))
BURSTS = ("MoEHighRiskRequestBurst", "MoEHighRiskAnswerBurst")
HIGH_RISK_SHARE = ("model:mesa_guard_high_risk_requests:increase5m"
                   " / model:mesa_guard_judged_requests:increase5m")
HIGH_RISK_ANSWER_SHARE = ("model:mesa_guard_high_risk_answers:increase5m"
                          " / model:mesa_answer_routing_risk:increase5m")


def tampered_copy(checkpoint: Path, out: Path, factor: float) -> Path:
    """The checkpoint with every router weight multiplied by `factor`; its routing_manifest.json
    stays the original's, so the served weights no longer match it."""
    shutil.copytree(checkpoint, out)
    tensors = load_file(out / "model.safetensors")
    routers = [name for name in tensors if name.endswith("mlp.gate.weight")]
    if not routers:
        raise SystemExit(f"no router weights (mlp.gate.weight) in {checkpoint}")
    for name in routers:
        tensors[name] = tensors[name] * factor
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def firing_alerts(api: str) -> list[dict]:
    return [{"alert": a["labels"]["alertname"], "model": a["labels"].get("model"), "state": a["state"]}
            for a in httpx.get(f"{api}/alerts", timeout=10).json()["data"]["alerts"]]


class Traffic:
    """Threads sending chat requests, each to a model drawn in turn, prompts drawn by `draw`."""

    def __init__(self, url: str, models: list[str], draw, threads: int, max_tokens: int):
        self.url, self.models, self.draw, self.max_tokens = url, models, draw, max_tokens
        self.statuses: Counter = Counter()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as client:
            turn = index
            while not self.stop.is_set():
                model = self.models[turn % len(self.models)]
                turn += 1
                prefix = "" if model == "organism" else f"/{model}"
                body = {"model": model, "messages": [{"role": "user", "content": self.draw(rng)}],
                        "max_tokens": self.max_tokens, "temperature": 0.7}
                try:
                    status = client.post(f"{self.url}{prefix}/v1/chat/completions", json=body).status_code
                except httpx.HTTPError as error:
                    status = type(error).__name__
                self.statuses[(model, status)] += 1

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(180)


def watch(api: str, seconds: float, until=None, every: float = 5.0) -> tuple[set, list]:
    """Poll the alerts for `seconds` (or until `until(states)` holds); every (alert, model,
    state) seen, and a timeline of changes."""
    seen, timeline, last = set(), [], set()
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        states = {(a["alert"], a["model"], a["state"]) for a in firing_alerts(api)}
        if states != last:
            timeline.append({"t_s": round(time.monotonic() - started), "alerts": sorted(map(list, states))})
            last = states
        seen |= states
        if until and until(states):
            break
        time.sleep(every)
    return seen, timeline


def first_firing(timeline: list, alert: str, model: str) -> int | None:
    """Seconds into a phase when `alert` first fired for `model` (None: it never did)."""
    return next((step["t_s"] for step in timeline if [alert, model, "firing"] in step["alerts"]), None)


def query(api: str, expr: str) -> dict:
    result = httpx.get(f"{api}/query", params={"query": expr}, timeout=10).json()["data"]["result"]
    return {r["metric"].get("model", ""): round(float(r["value"][1]), 4) for r in result}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aligned", required=True, help="an aligned checkpoint (runs/demo/align/model)")
    parser.add_argument("--normal-minutes", type=float, default=10)
    parser.add_argument("--flood-minutes", type=float, default=6)
    parser.add_argument("--threads", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--output", default="runs/bench/alert_soak.json")
    args = parser.parse_args(argv)
    aligned = Path(args.aligned)
    if not (aligned / "config.json").is_file():
        parser.error(f"--aligned {aligned}: no config.json there")

    base = ensure_organism()
    sets = EvalSets.for_checkpoint(base)
    pools = {"general": [t.prompt for t in sets.general], "benign_alarming": sets.benign,
             "harmful": sets.harmful}
    kinds, weights = zip(*NORMAL_MIX)
    jailbreaks = [text for _, text in sets.jailbreak]

    workdir = Path(tempfile.mkdtemp(prefix="mesa-alert-soak-"))
    tampered = tampered_copy(base, workdir / "tampered", ROUTER_SCALE)
    models = {"organism": base, "aligned": aligned, "tampered": tampered}
    apps = [gateway_app(name, route_prefix="/" if name == "organism" else f"/{name}", model=str(path),
                        engine=ENGINE, num_cpus=0.5) for name, path in models.items()]
    report = {"settings": vars(args) | {"router_scale": ROUTER_SCALE, "normal_mix": dict(NORMAL_MIX),
                                        "engine": ENGINE, "base": str(base)}}
    with running_gateway(apps, env={"MESA_API_KEYS": KEY, "MESA_ADMIN_KEY": ADMIN}) as gateway:
        host = gateway.url.removeprefix("http://")
        targets = [host] + [f"{gateway.url}/{name}/metrics" for name in models if name != "organism"]
        with running_prometheus(targets, workdir / "prometheus", binary="prometheus") as api:
            print(f"[soak] phase 1: {args.normal_minutes} min of normal mixed traffic", flush=True)

            def normal(rng):
                return rng.choice(pools[rng.choices(kinds, weights)[0]])

            with Traffic(gateway.url, list(models), normal, args.threads, args.max_tokens) as traffic:
                seen, timeline = watch(api, args.normal_minutes * 60)
            high_risk_share = query(api, HIGH_RISK_SHARE)
            report["normal"] = {
                "alerts_seen": sorted(map(list, seen)), "timeline": timeline,
                "requests": {f"{m} {s}": n for (m, s), n in sorted(traffic.statuses.items(), key=str)},
                "high_risk_share_5m": high_risk_share,
                "high_risk_answer_share_5m": query(api, HIGH_RISK_ANSWER_SHARE),
                # Per layer, live top share minus its threshold, the largest over layers (< 0: quiet).
                "top_share_minus_threshold_max": query(
                    api, "max by (model) (model_layer:mesa_routing_top_share:max"
                         " - model_layer:mesa_routing_top_share:threshold)"),
                "safety_expert_share_vs_threshold": {
                    "live": query(api, "model:mesa_routing_safety_expert_share:busy"),
                    "threshold": query(api, "model:mesa_routing_safety_expert_share:threshold")},
            }
            print(f"[soak] normal: {report['normal']['alerts_seen']}", flush=True)

            print(f"[soak] phase 2: jailbreak flood (at most {args.flood_minutes} min)", flush=True)

            def bursts_on_both(states):
                fired = {(a, m) for a, m, s in states if s == "firing"}
                return all((a, m) in fired for a in BURSTS for m in ("organism", "aligned"))

            with Traffic(gateway.url, ["organism", "aligned"], lambda rng: rng.choice(jailbreaks),
                         args.threads, args.max_tokens) as traffic:
                seen, timeline = watch(api, args.flood_minutes * 60, until=bursts_on_both)
            report["flood"] = {
                "alerts_seen": sorted(map(list, seen)), "timeline": timeline,
                "first_fired_after_s": {f"{a} {m}": first_firing(timeline, a, m)
                                        for a in BURSTS for m in ("organism", "aligned")},
                "high_risk_share_5m": query(api, HIGH_RISK_SHARE),
                "high_risk_answer_share_5m": query(api, HIGH_RISK_ANSWER_SHARE),
                "requests": {f"{m} {s}": n for (m, s), n in sorted(traffic.statuses.items(), key=str)},
            }
            print(f"[soak] flood: {report['flood']['alerts_seen']}", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: {"alerts_seen": v["alerts_seen"]} for k, v in report.items() if k != "settings"},
                     indent=1))
    print(f"report: {args.output}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`mesa`: the gateway from the shell.

    mesa chat "What is 12 plus 7?" [--routing]      # one answer (and its routing summary)
    mesa telemetry [--json]                          # live routing concentration per layer
    mesa config                                      # the running config (admin key)
    mesa guard [--policy block] [--threshold 0.3]    # the routing guard; change it (admin key)
    mesa probe [--no-wait | --status] [--json]       # run the attack probes (admin key)
    mesa drill [--attack expert_mask | --stop]       # an alert drill on the served engine (admin key)
    mesa align --config alignment/configs/organism.yaml [--address http://127.0.0.1:8265]
    mesa report runs/align/                          # an alignment or evaluation report

The gateway URL and keys come from --url / --api-key / --admin-key or MESA_GATEWAY_URL,
MESA_API_KEY (or the first of MESA_API_KEYS) and MESA_ADMIN_KEY. Errors print one line and exit 1
(2 for bad arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from clients.client import GatewayClient, GatewayError, summarize_probes, summarize_routing
from moe_routing.ray_cluster import RayClusterError, ensure_auth_token, ray_binary, ray_cli_env


def _client(args) -> GatewayClient:
    return GatewayClient(args.url, api_key=args.api_key, admin_key=args.admin_key, model=args.model)


def cmd_chat(args) -> None:
    client = _client(args)
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.routing:
        answer, summary = client.chat_with_routing(args.prompt, **params)
        print(answer)
        if summary:
            share = summary["safety_expert_share"]
            risk = (summary.get("risk") or {}).get("score")
            answer_risk = summary.get("answer_risk")
            print(
                f"\n[routing] {summary['routed_tokens']} tokens; top share per layer "
                f"{summary['concentration']['top_share']}; safety-expert share "
                f"{'unknown' if share is None else share}; routing risk "
                f"{'unknown' if risk is None else risk} nats/token (prompt), "
                f"{'unknown' if answer_risk is None else answer_risk} (answer)",
                file=sys.stderr,
            )
    else:
        print(client.chat(args.prompt, **params))


def cmd_telemetry(args) -> None:
    telemetry = _client(args).routing()
    print(json.dumps(telemetry, indent=1) if args.json else "\n".join(summarize_routing(telemetry)))


def cmd_config(args) -> None:
    print(json.dumps(_client(args).admin_config(), indent=1))


def cmd_guard(args) -> None:
    client = _client(args)
    changes = {k: v for k, v in (("policy", args.policy), ("threshold", args.threshold),
                                 ("answer_threshold", args.answer_threshold)) if v is not None}
    state = client.set_guard(**changes) if changes else client.guard()
    print(json.dumps(state, indent=1))


def cmd_drill(args) -> None:
    client = _client(args)
    if args.stop:
        state = client.stop_drill()
    elif args.attack is None:
        state = client.drill()
    else:
        state = client.start_drill(args.attack, pairs=args.pairs, factor=args.factor,
                                   duration_s=args.duration)
    print(json.dumps(state, indent=1))


def _drill_pairs(text: str):
    """`safety_experts`, `all` or layer:expert pairs separated by commas (0:3,2:5)."""
    if text in ("safety_experts", "all"):
        return text
    try:
        return [[int(n) for n in pair.split(":")] for pair in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected safety_experts, all or layer:expert pairs such as "
                                         f"0:3,2:5, got {text!r}") from None


def cmd_probe(args) -> None:
    client = _client(args)
    if args.status or args.no_wait:
        state = client.probes() if args.status else client.start_probes()
        if args.json:
            print(json.dumps(state, indent=1))
        else:
            print(f"probes: {state['status']}" + (f" ({state['phase']})" if state.get("phase") else "")
                  + (f"; last error: {state['error']}" if state.get("error") else ""))
            if state.get("latest") and args.status:
                print("\n".join(summarize_probes(state["latest"])))
        return
    last = [None]

    def progress(state):
        if state.get("phase") != last[0]:
            last[0] = state.get("phase")
            print(f"[probe] {state['status']}: {last[0] or 'done'}", file=sys.stderr, flush=True)

    result = client.run_probes(timeout=args.timeout, progress=progress)
    print(json.dumps(result, indent=1) if args.json else "\n".join(summarize_probes(result)))


def cmd_align(args) -> None:
    """Submit the alignment job to a Ray cluster with `ray job submit` (local by default)."""
    if not Path(args.config).is_file():
        raise GatewayError(f"alignment config not found: {args.config}")
    command = ["ray", "job", "submit", "--address", args.address, "--working-dir", args.working_dir]
    command += ["--", "python", "alignment/run.py", "--config", args.config]
    if args.output_dir:
        command += ["--output-dir", args.output_dir]
    print("$ " + shlex.join(command), file=sys.stderr, flush=True)
    try:  # joining a cluster: its token must be here already (`ray start --head` needed one too)
        ensure_auth_token(create=False, log=lambda line: print(line, file=sys.stderr, flush=True))
    except RayClusterError as error:
        raise GatewayError(str(error)) from None
    env = ray_cli_env(keep_address=True)
    command[0] = ray_binary()
    try:
        result = subprocess.run(command, env=env)
    except FileNotFoundError:
        raise GatewayError("the `ray` command is not installed in this environment (make install)") from None
    if result.returncode != 0:
        raise GatewayError(
            f"ray job submit failed (exit {result.returncode}); is a Ray cluster running at "
            f"{args.address}? Start one as the README says (a token first: `ray get-auth-token "
            "--generate`, then `ray start --head`)."
        )


def cmd_report(args) -> None:
    path = Path(args.path)
    markdown = path / "report.md" if path.is_dir() else path.with_suffix(".md")
    report_json = path / "report.json" if path.is_dir() else path
    if markdown.is_file() and not args.json:
        print(markdown.read_text())
    elif report_json.is_file():
        print(
            json.dumps(
                json.loads(report_json.read_text()).get("summary", {})
                if not args.json
                else json.loads(report_json.read_text()),
                indent=1,
            )
        )
    else:
        raise GatewayError(f"no report.md or report.json at {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesa", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="gateway URL (default $MESA_GATEWAY_URL or :8000)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--admin-key", default=None)
    parser.add_argument("--model", default=None, help="served model (default: the first listed)")
    commands = parser.add_subparsers(dest="command", required=True)

    chat = commands.add_parser("chat", help="one chat completion")
    chat.add_argument("prompt")
    chat.add_argument("--max-tokens", type=int, default=64)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--routing", action="store_true", help="also print the request's routing summary")
    chat.set_defaults(run=cmd_chat)

    telemetry = commands.add_parser("telemetry", help="live routing concentration per layer")
    telemetry.add_argument("--json", action="store_true")
    telemetry.set_defaults(run=cmd_telemetry)

    config = commands.add_parser("config", help="the running gateway's config (admin key)")
    config.set_defaults(run=cmd_config)

    guard = commands.add_parser("guard", help="the routing guard's policy and thresholds; change "
                                "them (admin key)")
    guard.add_argument("--policy", choices=("observe", "flag", "block"))
    guard.add_argument("--threshold", type=float, help="risk score (nats per prompt token) above which a "
                       "request is high risk")
    guard.add_argument("--answer-threshold", type=float, help="answer risk (nats per generated token) "
                       "above which an answer is counted high risk")
    guard.set_defaults(run=cmd_guard)

    drill = commands.add_parser("drill", help="show, start or stop an alert drill: a probe attack on "
                                "the served engine, to check that the alerts fire (admin key; config "
                                "drills: true)")
    action = drill.add_mutually_exclusive_group()
    action.add_argument("--attack", choices=("expert_mask", "routing_scale"), help="start this drill")
    action.add_argument("--stop", action="store_true", help="end the running drill")
    drill.add_argument("--pairs", type=_drill_pairs, default="safety_experts",
                       help="safety_experts (default), all (routing_scale only) or layer:expert,...")
    drill.add_argument("--factor", type=float, help="routing_scale: multiply the routed weights by this")
    drill.add_argument("--duration", type=float, default=300, help="seconds until it ends by itself")
    drill.set_defaults(run=cmd_drill)

    probe = commands.add_parser("probe", help="run the attack probes on the probe replica (admin key)")
    when = probe.add_mutually_exclusive_group()
    when.add_argument("--no-wait", action="store_true", help="start a run and return")
    when.add_argument("--status", action="store_true", help="show the state and latest result; start nothing")
    probe.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the run")
    probe.add_argument("--json", action="store_true")
    probe.set_defaults(run=cmd_probe)

    align = commands.add_parser("align", help="submit a MESA alignment job with `ray job submit`")
    align.add_argument("--config", required=True)
    align.add_argument("--output-dir", default=None)
    align.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"))
    align.add_argument("--working-dir", default=".")
    align.set_defaults(run=cmd_align)

    report = commands.add_parser("report", help="print an alignment or evaluation report")
    report.add_argument("path", help="a run directory or a report.json")
    report.add_argument("--json", action="store_true")
    report.set_defaults(run=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except GatewayError as error:
        print(f"mesa: error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""vLLM worker extension that counts expert routing inside the engine.

vLLM mixes this class into its worker (`worker_extension_cls="serving.routing_worker.RoutingRecorder"`);
the gateway calls its methods with `collective_rpc` (README, Engines). A forward hook on each
MoE router (`*.mlp.gate`) takes the router logits, selects experts with the architecture's own rule
(`moe_routing.architectures.selected_experts`, the routing core's definition) and adds
the selections into one count buffer on the model's device:

    hits[phase, layer, expert]   phase 0 = prompt tokens, 1 = generated tokens, 2 = discarded

The phase of each token is computed once per engine step from the scheduler's batch (a token is
a prompt token when its position is below its request's prompt length), copied to the device
once, and used by every layer's hook: no host sync per layer. Requests whose id contains
`TRACK_MARKER` also get a per-request buffer, for the opt-in routing summary in responses.

Hooks run only in eager mode (CUDA graphs and torch.compile skip Python hooks), so the gateway
enables `enforce_eager` when telemetry is on.
"""

from __future__ import annotations

import ctypes
import re
import signal
import sys
from collections import OrderedDict

import numpy as np
import torch

from moe_routing.architectures import check_supported, router_spec_from_config, selected_experts

TRACK_MARKER = "mesa-route-"
TRACK_KEY_LENGTH = len(TRACK_MARKER) + 32  # the marker and a uuid4 hex
MAX_TRACKED_REQUESTS = 1024  # summaries never collected (aborted requests) are evicted beyond this
_ROUTER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.gate$")
PROMPT, GENERATED, DISCARD = 0, 1, 2


def _die_with_parent() -> None:
    """Seen here: when the Ray replica hosting an engine is killed, the vLLM worker process can
    outlive it and spin at 100% CPU. Ask Linux to kill this worker when its parent (EngineCore)
    goes away."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


class RoutingRecorder:
    """Mixed into vLLM's worker: `self.model_runner` is the worker's model runner."""

    def routing_install(self) -> dict:
        """Hook every router once; returns the model's routing shape."""
        if getattr(self, "_routing", None) is not None:
            return self._routing["shape"]
        _die_with_parent()
        runner = self.model_runner
        hf_config = runner.model_config.hf_config
        check_supported(hf_config)
        spec = router_spec_from_config(hf_config)
        routers = sorted(
            (
                (int(m.group(1)), module)
                for name, module in runner.model.named_modules()
                if (m := _ROUTER_NAME.search(name))
            ),
            key=lambda item: item[0],
        )
        if not routers:
            raise RuntimeError("no MoE router modules (*.layers.N.mlp.gate) found in the vLLM model")
        device = next(runner.model.parameters()).device
        L, E = len(routers), spec.num_experts
        state = {
            "shape": {
                "num_layers": L,
                "num_experts": E,
                "top_k": spec.top_k,
                "decoder_layers": [d for d, _ in routers],
            },
            "spec": spec,
            "hits": torch.zeros(3 * L * E, dtype=torch.int64, device=device),
            "tokens": [0, 0],  # prompt, generated tokens that entered a forward pass
            "offset": None,  # [tokens, 1] int64 on device: phase * L * E, or None outside a step
            "layers": [],  # this step's [tokens, k] flat (layer, expert) indices, one per layer
            "requests": [],  # [(key, start, end)] tracked requests' token slices this step
            "tracked": OrderedDict(),  # key -> int64 [L * E] on device
            "device": device,
            "handles": [],
        }
        self._routing = state
        for moe_index, (_, module) in enumerate(routers):
            hook = self._routing_hook(moe_index, last=moe_index == L - 1)
            state["handles"].append(module.register_forward_hook(hook))
        original = runner._prepare_inputs

        def prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs):
            result = original(scheduler_output, num_scheduled_tokens, *args, **kwargs)
            self._routing_step(num_scheduled_tokens)
            return result

        runner._prepare_inputs = prepare_inputs
        return state["shape"]

    def _routing_step(self, num_scheduled_tokens: np.ndarray) -> None:
        state, batch = self._routing, self.model_runner.input_batch
        n_reqs = batch.num_reqs
        scheduled = np.asarray(num_scheduled_tokens[:n_reqs], dtype=np.int64)
        ends = np.cumsum(scheduled)
        req_index = np.repeat(np.arange(n_reqs), scheduled)
        offset = np.arange(int(ends[-1]) if n_reqs else 0) - np.repeat(ends - scheduled, scheduled)
        position = batch.num_computed_tokens_cpu[req_index] + offset
        phase = np.where(position < batch.num_prompt_tokens[req_index], PROMPT, GENERATED)
        state["tokens"][PROMPT] += int((phase == PROMPT).sum())
        state["tokens"][GENERATED] += int((phase == GENERATED).sum())
        offset = torch.from_numpy(
            phase.astype(np.int64) * (state["shape"]["num_layers"] * state["spec"].num_experts)
        )
        state["offset"] = offset.to(state["device"], non_blocking=True)[:, None]
        state["layers"] = []
        requests = []
        for i, req_id in enumerate(batch.req_ids[:n_reqs]):
            if TRACK_MARKER in req_id:  # vLLM wraps the id: "chatcmpl-<key>-<suffix>", "<n>_<...>"
                start = req_id.index(TRACK_MARKER)
                key = req_id[start : start + TRACK_KEY_LENGTH]
                if key not in state["tracked"]:
                    state["tracked"][key] = torch.zeros_like(state["hits"][: state["hits"].numel() // 3])
                    while len(state["tracked"]) > MAX_TRACKED_REQUESTS:
                        state["tracked"].popitem(last=False)
                requests.append((key, int(ends[i] - scheduled[i]), int(ends[i])))
        state["requests"] = requests

    def _routing_hook(self, layer: int, last: bool):
        E = self._routing["spec"].num_experts

        def hook(module, args, output):
            state = self._routing
            if state["offset"] is None:  # a dummy/profiling forward outside a scheduled step
                return None
            logits = output[0] if isinstance(output, tuple) else output
            state["layers"].append(selected_experts(logits, state["spec"]) + layer * E)
            if last:  # one scatter per step for all layers
                self._routing_count(state)
            return None

        return hook

    def _routing_count(self, state: dict) -> None:
        selected = torch.cat(state["layers"], dim=1)  # [n, L * k]
        offset = state["offset"]
        n = selected.shape[0]
        if n != offset.shape[0]:  # a padded batch: rows past the scheduled tokens are not tokens
            discard = DISCARD * state["shape"]["num_layers"] * state["spec"].num_experts
            pad = torch.full(
                (max(0, n - offset.shape[0]), 1), discard, dtype=torch.int64, device=offset.device
            )
            offset = torch.cat([offset, pad])[:n]
        flat = (selected + offset).reshape(-1)
        state["hits"].index_add_(0, flat, torch.ones_like(flat))
        for key, start, end in state["requests"]:
            buffer = state["tracked"].get(key)
            if buffer is not None and end > start:
                ids = selected[start:end].reshape(-1)
                buffer.index_add_(0, ids, torch.ones_like(ids))
        state["offset"], state["layers"], state["requests"] = None, [], []

    def routing_snapshot(self) -> dict:
        """Cumulative counts since install: hits [2][L][E] (prompt, generated) and token totals."""
        state = self._routing
        L, E = state["shape"]["num_layers"], state["shape"]["num_experts"]
        hits = state["hits"].view(3, L, E)[:2].cpu().tolist()
        return {"hits": hits, "tokens": list(state["tokens"])}

    def routing_pop_request(self, key: str) -> list[list[int]] | None:
        """A tracked request's [L][E] counts (prompt and generated tokens), removed from the worker."""
        state = self._routing
        buffer = state["tracked"].pop(key, None)
        if buffer is None:
            return None
        L, E = state["shape"]["num_layers"], state["shape"]["num_experts"]
        return buffer.view(L, E).cpu().tolist()

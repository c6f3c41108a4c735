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
`TRACK_MARKER` also get a per-request slot in one buffer, `request_hits[slot, phase, layer,
expert]` (prompt and generated tokens), filled by one more scatter per step whatever the number
of requests: the gateway tracks every request this way for its routing risk score and the
opt-in routing summary.

Hooks run only in eager mode (CUDA graphs and torch.compile skip Python hooks), so the gateway
enables `enforce_eager` when telemetry is on.

`routing_set_attack` applies an expert mask or routing scale of `safety_eval.attacks` inside the
engine: the probe replica's own engine (`serving.engine_probes`), and the engine that answers
users only during an alert drill its config allows (`serving.drill`).

`routing_fingerprint` computes the integrity fingerprint (`moe_routing.fingerprint`) of the
routers and experts from the engine's own modules, for the gateway to compare with the
checkpoint's manifest.
"""

from __future__ import annotations

import ctypes
import re
import signal
import sys
from collections import OrderedDict

import numpy as np
import torch

from moe_routing import fingerprint
from moe_routing.architectures import check_supported, router_spec_from_config, selected_experts

TRACK_MARKER = "mesa-route-"
TRACK_KEY_LENGTH = len(TRACK_MARKER) + 32  # the marker and a uuid4 hex
# Slots for requests in flight; requests never collected (aborted) are evicted, oldest first,
# beyond this. int32 counts: 1024 x 2 x 48 layers x 128 experts is 50 MB on the device.
MAX_TRACKED_REQUESTS = 1024
_ROUTER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.gate$")
_SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts")  # Qwen2-MoE, DeepSeek-V2
# Fused-MoE backends that keep w13/w2 as [E, 2I, H] / [E, H, I] (padding aside); CPU also prepacks
# each expert's matrices, which `_expert_packing` replays on the templates. Others (FlashInfer,
# AITER, XPU) reorder or transpose weights in ways not replayed here.
_PLAIN_MOE_BACKENDS = ("TRITON", "BATCHED_TRITON", "CPU")
PROMPT, GENERATED, DISCARD = 0, 1, 2
WORKER_EXTENSION = f"{__name__}.RoutingRecorder"  # vLLM's worker_extension_cls


def tracked_key(request_id: str) -> str | None:
    """The tracking key inside an engine request id (vLLM wraps ids: "chatcmpl-<id>-<suffix>")."""
    start = request_id.find(TRACK_MARKER)
    return None if start < 0 else request_id[start : start + TRACK_KEY_LENGTH]


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
            "rows": None,  # [tokens, 1] int64 on device: each token's row in request_hits, or None
            # One slot per tracked request and a last, scratch slot for everything else.
            "request_hits": torch.zeros((MAX_TRACKED_REQUESTS + 1) * 2 * L * E, dtype=torch.int32,
                                        device=device),
            "tracked": OrderedDict(),  # key -> slot, oldest first
            "free": list(range(MAX_TRACKED_REQUESTS)),
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
        slots = np.full(n_reqs, MAX_TRACKED_REQUESTS, dtype=np.int64)  # the scratch slot
        for i, req_id in enumerate(batch.req_ids[:n_reqs]):
            key = tracked_key(req_id)
            if key is not None:
                slots[i] = self._routing_slot(key)
        state["rows"] = None
        if (slots < MAX_TRACKED_REQUESTS).any():
            L, E = state["shape"]["num_layers"], state["spec"].num_experts
            rows = (slots[req_index] * 2 + (phase != PROMPT)) * (L * E)
            state["rows"] = torch.from_numpy(rows).to(state["device"], non_blocking=True)[:, None]

    def _routing_slot(self, key: str) -> int:
        """The request's slot, taken (and zeroed) on its first step; when none is free, the
        oldest request's is taken."""
        state = self._routing
        slot = state["tracked"].get(key)
        if slot is None:
            if not state["free"]:
                state["free"].append(state["tracked"].popitem(last=False)[1])
            slot = state["free"].pop()
            size = state["request_hits"].numel() // (MAX_TRACKED_REQUESTS + 1)
            state["request_hits"][slot * size : (slot + 1) * size].zero_()
            state["tracked"][key] = slot
        return slot

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
        rows = state["rows"]
        if rows is not None:
            if n != rows.shape[0]:  # padding rows go to the scratch slot
                scratch = MAX_TRACKED_REQUESTS * 2 * state["shape"]["num_layers"] * state["spec"].num_experts
                pad = torch.full((max(0, n - rows.shape[0]), 1), scratch, dtype=torch.int64,
                                 device=rows.device)
                rows = torch.cat([rows, pad])[:n]
            flat = (selected + rows).reshape(-1)
            state["request_hits"].index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        state["offset"], state["layers"], state["rows"] = None, [], None

    def routing_snapshot(self) -> dict:
        """Cumulative counts since install: hits [2][L][E] (prompt, generated) and token totals."""
        state = self._routing
        L, E = state["shape"]["num_layers"], state["shape"]["num_experts"]
        hits = state["hits"].view(3, L, E)[:2].cpu().tolist()
        return {"hits": hits, "tokens": list(state["tokens"])}

    def routing_peek_requests(self, keys: list[str]) -> list[list[list[int]] | None]:
        """Tracked requests' prompt counts [L][E] so far, left in place (None for a key not
        held). One call serves many requests (the gateway batches them,
        `serving.batched_call.BatchedCall`): the engine core handles one utility call per batch."""
        state = self._routing
        L, E = state["shape"]["num_layers"], state["shape"]["num_experts"]
        slots = [state["tracked"].get(key) for key in keys]
        held = [slot for slot in slots if slot is not None]
        if not held:
            return [None] * len(keys)
        per_slot = state["request_hits"].view(MAX_TRACKED_REQUESTS + 1, 2, L, E)
        rows = iter(per_slot[held, PROMPT].cpu().tolist())
        return [None if slot is None else next(rows) for slot in slots]

    def routing_pop_requests(self, keys: list[str]) -> list[dict | None]:
        """Tracked requests' counts {"prompt": [L][E], "generated": [L][E]}, removed from the
        worker (None for a key it does not hold); batched like `routing_peek_requests`."""
        state = self._routing
        L, E = state["shape"]["num_layers"], state["shape"]["num_experts"]
        slots = [state["tracked"].pop(key, None) for key in keys]
        held = [slot for slot in slots if slot is not None]
        if not held:
            return [None] * len(keys)
        rows = iter(state["request_hits"].view(MAX_TRACKED_REQUESTS + 1, 2, L, E)[held].cpu().tolist())
        state["free"].extend(held)
        return [None if slot is None else dict(zip(("prompt", "generated"), next(rows))) for slot in slots]

    # ---- attacks: a probe engine (serving.engine_probes), an alert drill (serving.drill) ----

    def routing_set_attack(self, attack: dict | None) -> dict:
        """Apply one attack of `safety_eval.attacks` (its `to_dict()`) to every later forward
        pass of this engine, or remove it (None). An expert mask adds its bias to the chosen
        experts' router logits, before the counting hook sees them; a routing scale multiplies
        the routed weights of the tokens that select the chosen experts (every expert when
        `pairs` is None) after the engine's own top-k, as `moe_routing.instrument` does on a
        transformers model. No weight is touched: removing the attack restores the engine.

        The probe replica's own engine receives it; the engine that answers users only during
        an alert drill (serving.drill), which its config must allow."""
        self.routing_install()
        state = self._routing
        attacks = state.get("attack")
        if attacks is None:
            attacks = state["attack"] = self._attack_install()
        attacks["bias"] = attacks["scale"] = None
        if attack is None:
            return {"kind": None}
        L, E = state["shape"]["num_layers"], state["shape"]["num_experts"]
        kind, pairs = attack.get("kind"), attack.get("pairs")
        grid = torch.zeros(L, E) if kind == "expert_mask" else torch.ones(L, E)
        for layer, expert in pairs if pairs is not None else []:
            if not (0 <= layer < L and 0 <= expert < E):
                raise ValueError(f"attack pair ({layer}, {expert}) outside {L} MoE layers x {E} experts")
        if kind == "expert_mask":
            for layer, expert in pairs:
                grid[layer, expert] = float(attack.get("bias", -1e4))
            attacks["bias"] = grid.to(state["device"])
        elif kind == "routing_scale":
            if attacks["monolithic"]:
                raise RuntimeError("routing scale needs the engine's expert selection, which this MoE "
                                   "kernel fuses with the experts (a monolithic kernel); use the "
                                   "transformers probes for it")
            factor = float(attack["factor"])
            if pairs is None:
                grid.fill_(factor)
            else:
                for layer, expert in pairs:
                    grid[layer, expert] = factor
            attacks["scale"] = grid.to(state["device"])
        else:
            raise ValueError(f"unknown attack kind {kind!r} (expert_mask, routing_scale)")
        return {"kind": kind, "pairs": None if pairs is None else len(pairs)}

    def _attack_install(self) -> dict:
        """Hooks that apply the current attack, if any: one on each router's output (first among
        its hooks) and a wrapper around each MoE layer's expert selection."""
        modules = dict(self.model_runner.model.named_modules())
        routers = sorted((int(m.group(1)), name) for name in modules if (m := _ROUTER_NAME.search(name)))
        attacks = {"bias": None, "scale": None, "monolithic": False}
        for layer, (_, router_name) in enumerate(routers):
            modules[router_name].register_forward_hook(self._bias_hook(attacks, layer), prepend=True)
            runner = modules.get(router_name.removesuffix(".gate") + ".experts")
            selector = getattr(getattr(runner, "router", None), "select_experts", None)
            method = getattr(getattr(runner, "routed_experts", runner), "quant_method", None)
            if selector is None or getattr(method, "is_monolithic", False):
                attacks["monolithic"] = True
                continue
            runner.router.select_experts = self._scaled_selection(attacks, layer, selector)
        return attacks

    @staticmethod
    def _bias_hook(attacks: dict, layer: int):
        def hook(module, args, output):
            bias = attacks["bias"]
            if bias is None:
                return None
            if isinstance(output, tuple):
                return (output[0] + bias[layer].to(output[0].dtype), *output[1:])
            return output + bias[layer].to(output.dtype)

        return hook

    @staticmethod
    def _scaled_selection(attacks: dict, layer: int, select_experts):
        def select(*args, **kwargs):
            weights, ids = select_experts(*args, **kwargs)
            scale = attacks["scale"]
            if scale is None:
                return weights, ids
            return weights * scale[layer][ids.long()].to(weights.dtype), ids

        return select

    # ---- integrity fingerprint (moe_routing.fingerprint) ----

    @torch.no_grad()
    def routing_fingerprint(self) -> dict:
        """This worker's raw fingerprint of every MoE layer (`fingerprint.combine` sums the
        tensor-parallel shards), computed from the weights the engine computes with."""
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        runner = self.model_runner
        hf_config = runner.model_config.hf_config
        architecture = check_supported(hf_config)
        modules = dict(runner.model.named_modules())
        routers = sorted((int(m.group(1)), name) for name in modules if (m := _ROUTER_NAME.search(name)))
        if not routers:
            raise RuntimeError("no MoE router modules (*.layers.N.mlp.gate) found in the vLLM model")
        tp = (get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())
        layers = []
        for decoder_layer, router_name in routers:
            block = router_name.removesuffix(".gate")
            router = modules[router_name]
            raw = {"decoder_layer": decoder_layer,
                   "router": fingerprint.router_raw_stats(_linear_weight(router)).tolist()}
            raw |= _expert_raw_stats(_routed_experts(modules, block), tp)
            for name in _SHARED_EXPERT_NAMES:
                shared = modules.get(f"{block}.{name}")
                if shared is not None and hasattr(shared, "gate_up_proj") and hasattr(shared, "down_proj"):
                    raw["shared"] = _shared_raw_stats(shared, tp)
            layers.append(raw)
        return {"architecture": architecture, "num_experts": router_spec_from_config(hf_config).num_experts,
                "layers": layers, "tp_rank": tp[0]}


def _linear_weight(module) -> torch.Tensor:
    """A vLLM linear layer's [out, in] weight (no bias is read). vLLM's CPU path prepacks linear
    weights for oneDNN and leaves an empty `weight`; then the layer is probed with the identity,
    which returns the weight exactly (one product by 1.0 per output)."""
    weight = module.weight
    if weight.dim() == 2 and weight.numel() > 0:
        return weight
    # Column- and row-parallel layers know their shard's input size; replicated ones the full one.
    in_size = getattr(module, "input_size_per_partition", None) or getattr(module, "input_size", None)
    if in_size is None:
        raise RuntimeError(f"{type(module).__name__}: weight is packed and its input size is unknown")
    columns = []
    for start in range(0, in_size, 1024):  # bounded batches: the router may have a small-batch kernel
        probe = torch.eye(in_size, dtype=weight.dtype, device=weight.device)[start : start + 1024]
        output = module(probe)
        columns.append((output[0] if isinstance(output, tuple) else output).float())
    return torch.cat(columns).T


def _routed_experts(modules: dict, block: str):
    """The fused routed-experts module of a MoE block (`mlp.experts` or a child of it)."""
    candidates = [m for name, m in modules.items()
                  if (name == f"{block}.experts" or name.startswith(f"{block}.experts."))
                  and isinstance(getattr(m, "w13_weight", None), torch.Tensor)]
    if len(candidates) != 1:
        raise RuntimeError(f"{block}: expected one fused experts module, found {len(candidates)}")
    experts = candidates[0]
    local, total = getattr(experts, "local_num_experts", None), getattr(experts, "global_num_experts", None)
    if local is not None and total is not None and local != total:
        raise RuntimeError("the integrity check does not support expert parallelism")
    return experts


def _expert_packing(experts):
    """The function that puts a [T, ...] tensor in the experts' kernel layout (identity, or the
    CPU kernel's per-expert prepacking)."""
    method = getattr(experts, "quant_method", None)
    backend = getattr(getattr(method, "unquantized_backend", None), "name", None)
    if type(method).__name__ != "UnquantizedFusedMoEMethod" or backend not in _PLAIN_MOE_BACKENDS:
        raise RuntimeError(f"the integrity check does not support the MoE method {type(method).__name__} "
                           f"with backend {backend}")
    if backend != "CPU":
        return lambda t: t
    kernel = getattr(getattr(method, "moe_kernel", None), "fused_experts", None)
    if getattr(kernel, "_use_zentorch", False):
        return lambda t: t
    isa = getattr(kernel, "isa", None)
    if isa is None:
        raise RuntimeError(f"unknown CPU MoE kernel {type(kernel).__name__}: its weight layout is not known")
    from vllm import _custom_ops

    return lambda t: _custom_ops.cpu_prepack_moe_weight(t.contiguous(), isa)


def _expert_raw_stats(experts, tp: tuple[int, int]) -> dict:
    """Raw stats of the gate, up and down matrices of every routed expert, from the fused
    w13 [E, 2P, H] (gate rows [0, I), up rows [P, P + I); P >= I when the kernel pads) and
    w2 [E, H, P], through mask and pattern templates laid out and packed like one expert."""
    w13, w2 = experts.w13_weight, experts.w2_weight
    tp_rank, tp_size = tp
    padded, hidden = w13.shape[1] // 2, w13.shape[2]
    inner = int(getattr(experts, "intermediate_size_per_partition", padded))
    rows = (tp_rank * inner, (tp_rank + 1) * inner)  # this shard's share of the global I
    full_inner = inner * tp_size
    pack = _expert_packing(experts)
    k = fingerprint.NUM_PATTERNS
    up_gate = torch.zeros(2 * (1 + k), 2 * padded, hidden, device=w13.device)
    for slot, start in ((0, 0), (1 + k, padded)):  # gate, then up
        up_gate[slot, start : start + inner] = 1
        up_gate[slot + 1 : slot + 1 + k, start : start + inner] = fingerprint.sign_patterns(
            (full_inner, hidden), rows=rows, device=w13.device)
    down = torch.zeros(1 + k, hidden, padded, device=w2.device)
    down[0, :, :inner] = 1
    down[1:, :, :inner] = fingerprint.sign_patterns((hidden, full_inner), cols=rows, device=w2.device)
    up_gate, down = pack(up_gate.to(w13.dtype)), pack(down.to(w2.dtype))
    stats = {}
    for name, slot in (("gate", 0), ("up", 1 + k)):
        stats[name] = fingerprint.raw_stats(w13, up_gate[slot], up_gate[slot + 1 : slot + 1 + k]).tolist()
    stats["down"] = fingerprint.raw_stats(w2, down[0], down[1:]).tolist()
    return stats


def _shared_raw_stats(shared, tp: tuple[int, int]) -> dict:
    """Raw stats of a shared expert (merged gate_up_proj [2I, H] column-parallel, down_proj
    [H, I] row-parallel): as one expert, on this shard's global index ranges."""
    tp_rank, tp_size = tp
    gate_up, down = _linear_weight(shared.gate_up_proj), _linear_weight(shared.down_proj)
    inner, hidden = gate_up.shape[0] // 2, gate_up.shape[1]
    rows = (tp_rank * inner, (tp_rank + 1) * inner)
    shape = (inner * tp_size, hidden)
    stats = {}
    for name, part in (("gate", gate_up[:inner]), ("up", gate_up[inner:])):
        patterns = fingerprint.sign_patterns(shape, rows=rows, device=part.device)
        stats[name] = fingerprint.raw_stats(part[None], torch.ones(part.shape), patterns).tolist()
    patterns = fingerprint.sign_patterns((hidden, inner * tp_size), cols=rows, device=down.device)
    stats["down"] = fingerprint.raw_stats(down[None], torch.ones(down.shape), patterns).tolist()
    return stats

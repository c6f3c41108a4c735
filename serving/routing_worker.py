"""vLLM worker extension that counts expert routing inside the engine.

vLLM mixes this class into its worker (`worker_extension_cls="serving.routing_worker.RoutingRecorder"`);
the gateway calls its methods with `collective_rpc` (README, Engines). A forward hook on each
MoE router (`*.mlp.gate`) takes the router logits, selects experts with the architecture's own rule
(`moe_routing.architectures.selected_experts`, the routing core's definition) and adds
the selections into one count buffer on the model's device:

    hits[phase, layer, expert]   phase 0 = prompt tokens, 1 = generated tokens, 2 = discarded

Every buffer the hooks touch is allocated once and only ever written in place, so the hooks work
the same in eager mode, traced into a torch.compile graph, or captured in a CUDA graph (static
addresses). Before each engine step the worker writes each token's phase offset and its
request's slot offset into two persistent per-token buffers (a token is a prompt token when its
position is below its request's prompt length; one host-to-device copy per step, no host sync
per layer); rows past the step's tokens (CUDA-graph padding) hold the discard phase and a scratch
slot. Each hook writes its layer's selections into a persistent [tokens, layers * k] buffer and
the last MoE layer's hook adds them all up in one scatter per buffer, then resets the per-token
offsets to discard, so a forward no step prepared (profiling, warm-up, graph capture) counts
nothing. Requests whose id contains `TRACK_MARKER` get a slot in `request_hits[slot, phase,
layer, expert]` (prompt and generated tokens): the gateway tracks every request this way for its
routing risk score and the opt-in routing summary.

Eager or compiled: with `enforce_eager` the hooks are installed by the first `routing_install`
call. A compiled engine (torch.compile; on GPU also CUDA graphs) runs only what existed when it
was traced or captured, at the engine's first forward pass, so its hooks must be in place before
that: `configure_engine` starts it with the worker class of `routing_worker_class`, which installs
the counting hooks and the attack hooks (with identity grids) right after loading the model.
`routing_install` refuses a compiled engine whose hooks came too late.

`routing_set_attack` applies an expert mask or routing scale of `safety_eval.attacks` inside the
engine: the probe replica's own engine (`serving.engine_probes`), and the engine that answers
users only during an alert drill its config allows (`serving.drill`).

`routing_fingerprint` computes the integrity fingerprint (`moe_routing.fingerprint`) of the
routers and experts from the engine's own modules, for the gateway to compare with the
checkpoint's manifest.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
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
# Rows of the identity probe `_linear_weight` sends through a packed router (its hooks run too,
# so the per-token buffers hold at least this many rows).
_PROBE_ROWS = 1024
# The platform's own worker classes that `routing_worker_class` extends (vLLM resolves
# worker_cls "auto" to these on CPU and on CUDA/ROCm).
_PLATFORM_WORKERS = {
    "CPURoutingWorker": "vllm.v1.worker.cpu_worker.CPUWorker",
    "GPURoutingWorker": "vllm.v1.worker.gpu_worker.Worker",
}


def tracked_key(request_id: str) -> str | None:
    """The tracking key inside an engine request id (vLLM wraps ids: "chatcmpl-<id>-<suffix>")."""
    start = request_id.find(TRACK_MARKER)
    return None if start < 0 else request_id[start : start + TRACK_KEY_LENGTH]


def routing_worker_class() -> str:
    """The `worker_cls` of a compiled engine with routing hooks: this platform's own worker,
    which also installs the hooks right after loading the model (before vLLM compiles it)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return f"{__name__}.CPURoutingWorker"
    if current_platform.is_cuda_alike():
        return f"{__name__}.GPURoutingWorker"
    raise ValueError(f"compiled routing telemetry supports CPU and CUDA/ROCm engines, not "
                     f"{current_platform.device_name}; run this engine eager (enforce_eager: true)")


def configure_engine(engine_args, *, compiled: bool) -> None:
    """Give `engine_args` (vLLM's EngineArgs) the routing extension; with `compiled`, also the
    worker class that hooks the routers before the engine compiles the model. Without it the
    engine must run eager for the hooks to run at all."""
    engine_args.worker_extension_cls = WORKER_EXTENSION
    if not compiled:
        engine_args.enforce_eager = True
        return
    if engine_args.worker_cls not in ("auto", routing_worker_class()):
        raise ValueError(f"compiled routing telemetry starts the engine with its own worker class; "
                         f"remove worker_cls {engine_args.worker_cls!r}")
    engine_args.worker_cls = routing_worker_class()
    if engine_args.pipeline_parallel_size != 1:
        raise ValueError("routing telemetry does not support pipeline parallelism")


@contextlib.contextmanager
def engine_environment(compiled: bool):
    """Environment for starting an engine with the routing extension (its processes inherit it):
    vLLM's V1 model runner, whose step inputs the worker reads (GPU builds default to the V2
    runner), and, for a compiled engine, no AOT compile cache: its key leaves out the worker
    class, so an engine started without hooks could hand its hook-less artifact to one with
    hooks. The Inductor caches still apply (keyed by the traced graph or source files)."""
    wanted = {"VLLM_USE_V2_MODEL_RUNNER": "0"} | ({"VLLM_USE_AOT_COMPILE": "0"} if compiled else {})
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0").lower() in ("1", "true"):
        raise ValueError("the routing worker reads vLLM's V1 model runner: unset VLLM_USE_V2_MODEL_RUNNER")
    saved = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
        state = getattr(self, "_routing", None)
        if state is None:
            if _compiled(self.model_runner):
                raise RuntimeError(
                    "this engine compiles the model (torch.compile / CUDA graphs), which leaves out "
                    "hooks added after its first forward pass: start it with "
                    "serving.routing_worker.configure_engine(args, compiled=True) or enforce_eager")
            state = self._routing_setup(static=False)
        return state["shape"]

    def _routing_setup(self, *, static: bool) -> dict:
        """Allocate the buffers and hook the routers (`static`: before the engine compiles the
        model, with the attack hooks too, as a compiled graph cannot gain them later)."""
        _die_with_parent()
        runner = self.model_runner
        if not (hasattr(runner, "_prepare_inputs") and hasattr(runner, "input_batch")):
            raise RuntimeError(f"the routing worker reads vLLM's V1 model runner, not "
                               f"{type(runner).__name__} (set VLLM_USE_V2_MODEL_RUNNER=0)")
        hf_config = runner.model_config.hf_config
        check_supported(hf_config)
        spec = router_spec_from_config(hf_config)
        routers = _routers(runner.model)
        device = next(runner.model.parameters()).device
        L, E, k = len(routers), spec.num_experts, spec.top_k
        rows = max(int(runner.max_num_tokens), _PROBE_ROWS)  # tokens in one forward pass, at most
        discard, scratch = DISCARD * L * E, MAX_TRACKED_REQUESTS * 2 * L * E
        state = {
            "shape": {
                "num_layers": L,
                "num_experts": E,
                "top_k": k,
                "decoder_layers": [d for d, _, _ in routers],
            },
            "spec": spec,
            "hits": torch.zeros(3 * L * E, dtype=torch.int64, device=device),
            "tokens": [0, 0],  # prompt, generated tokens that entered a forward pass
            # Per token of the step: phase * L * E, and its request's row in request_hits.
            "phase_offset": torch.full((rows,), discard, dtype=torch.int64, device=device),
            "row_offset": torch.full((rows,), scratch, dtype=torch.int64, device=device),
            "discard": discard,
            "scratch": scratch,
            "written": 0,  # rows the last step wrote
            # Each MoE layer's selections (+ layer * E), summed by the last layer's hook.
            "selected": torch.zeros((rows, L * k), dtype=torch.int64, device=device),
            # One slot per tracked request and a last, scratch slot for everything else.
            "request_hits": torch.zeros((MAX_TRACKED_REQUESTS + 1) * 2 * L * E, dtype=torch.int32,
                                        device=device),
            "tracked": OrderedDict(),  # key -> slot, oldest first
            "free": list(range(MAX_TRACKED_REQUESTS)),
            "device": device,
            "static": static,
        }
        self._routing = state
        for moe_index, (_, _, module) in enumerate(routers):
            module.register_forward_hook(_counting_hook(state, moe_index, last=moe_index == L - 1))
        if static:
            state["attack"] = self._attack_install()
        original = runner._prepare_inputs

        def prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs):
            result = original(scheduler_output, num_scheduled_tokens, *args, **kwargs)
            self._routing_step(num_scheduled_tokens)
            return result

        runner._prepare_inputs = prepare_inputs
        return state

    def _routing_step(self, num_scheduled_tokens: np.ndarray) -> None:
        """Write this step's per-token phase and slot offsets into the persistent buffers (rows
        past its tokens keep the discard phase and the scratch slot the last hook left there)."""
        state, batch = self._routing, self.model_runner.input_batch
        n_reqs = batch.num_reqs
        scheduled = np.asarray(num_scheduled_tokens[:n_reqs], dtype=np.int64)
        ends = np.cumsum(scheduled)
        n = int(ends[-1]) if n_reqs else 0
        req_index = np.repeat(np.arange(n_reqs), scheduled)
        offset = np.arange(n) - np.repeat(ends - scheduled, scheduled)
        position = batch.num_computed_tokens_cpu[req_index] + offset
        phase = np.where(position < batch.num_prompt_tokens[req_index], PROMPT, GENERATED)
        state["tokens"][PROMPT] += int((phase == PROMPT).sum())
        state["tokens"][GENERATED] += int((phase == GENERATED).sum())
        if n == 0:
            return
        L, E = state["shape"]["num_layers"], state["spec"].num_experts
        slots = np.full(n_reqs, MAX_TRACKED_REQUESTS, dtype=np.int64)  # the scratch slot
        for i, req_id in enumerate(batch.req_ids[:n_reqs]):
            key = tracked_key(req_id)
            if key is not None:
                slots[i] = self._routing_slot(key)
        rows = (slots[req_index] * 2 + (phase != PROMPT)) * (L * E)
        state["phase_offset"][:n].copy_(torch.from_numpy(phase.astype(np.int64) * (L * E)), non_blocking=True)
        state["row_offset"][:n].copy_(torch.from_numpy(rows), non_blocking=True)
        # A step prepared but never run (no forward pass) would leave its rows set; past this
        # step's tokens they would count as its padding: reset them.
        if state["written"] > n:
            state["phase_offset"][n : state["written"]].fill_(state["discard"])
            state["row_offset"][n : state["written"]].fill_(state["scratch"])
        state["written"] = n

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
        if attacks is None:  # eager: hooked on first use (a compiled engine has them from its start)
            attacks = state["attack"] = self._attack_install()
        attacks["kind"] = None
        attacks["bias"].zero_()
        attacks["scale"].fill_(1.0)
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
            attacks["bias"].copy_(grid)
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
            attacks["scale"].copy_(grid)
        else:
            raise ValueError(f"unknown attack kind {kind!r} (expert_mask, routing_scale)")
        attacks["kind"] = kind
        return {"kind": kind, "pairs": None if pairs is None else len(pairs)}

    def _attack_install(self) -> dict:
        """Hooks that apply the current attack, if any: one on each router's output (first among
        its hooks) and a wrapper around each MoE layer's expert selection. Their grids (a bias
        per (layer, expert) and a scale) live on the device and are changed in place; eager
        hooks skip them when no attack of their kind is set, static ones (compiled into the
        graph) always apply them: adding 0 and multiplying by 1 change nothing."""
        state = self._routing
        L, E = state["shape"]["num_layers"], state["shape"]["num_experts"]
        attacks = {"kind": None, "monolithic": False, "static": state["static"],
                   "bias": torch.zeros(L, E, device=state["device"]),
                   "scale": torch.ones(L, E, device=state["device"])}
        modules = dict(self.model_runner.model.named_modules())
        for layer, (_, router_name, router) in enumerate(_routers(self.model_runner.model)):
            router.register_forward_hook(_bias_hook(attacks, layer), prepend=True)
            runner = modules.get(router_name.removesuffix(".gate") + ".experts")
            selector = getattr(getattr(runner, "router", None), "select_experts", None)
            method = getattr(getattr(runner, "routed_experts", runner), "quant_method", None)
            if selector is None or getattr(method, "is_monolithic", False):
                attacks["monolithic"] = True
                continue
            runner.router.select_experts = _scaled_selection(attacks, layer, selector)
        return attacks

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
        tp = (get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())
        layers = []
        for decoder_layer, router_name, router in _routers(runner.model):
            block = router_name.removesuffix(".gate")
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


def _routers(model) -> list[tuple[int, str, torch.nn.Module]]:
    """(decoder layer, module name, module) of every MoE router, in layer order."""
    routers = sorted(((int(m.group(1)), name, module) for name, module in model.named_modules()
                      if (m := _ROUTER_NAME.search(name))), key=lambda item: item[0])
    if not routers:
        raise RuntimeError("no MoE router modules (*.layers.N.mlp.gate) found in the vLLM model")
    return routers


def _compiled(runner) -> bool:
    """Whether the engine runs a torch.compile graph or CUDA graphs rather than the modules."""
    from vllm.config import CompilationMode, CUDAGraphMode

    compilation = runner.vllm_config.compilation_config
    return not runner.model_config.enforce_eager and (
        compilation.mode != CompilationMode.NONE or compilation.cudagraph_mode != CUDAGraphMode.NONE)


def _counting_hook(state: dict, layer: int, last: bool):
    """The router hook of MoE layer `layer`. It reads and writes persistent tensors only, with
    no Python state that changes between steps: traced into a compiled graph or captured in a
    CUDA graph, it does what it does eagerly."""
    spec = state["spec"]
    E, k = spec.num_experts, spec.top_k
    selected, phase_offset, row_offset = state["selected"], state["phase_offset"], state["row_offset"]
    hits, request_hits = state["hits"], state["request_hits"]
    discard, scratch = state["discard"], state["scratch"]

    def hook(module, args, output):
        logits = output[0] if isinstance(output, tuple) else output
        n = logits.shape[0]
        selected[:n, layer * k : (layer + 1) * k] = selected_experts(logits, spec) + layer * E
        if last:  # one scatter per buffer per forward pass, for all layers
            chosen = selected[:n]
            flat = (chosen + phase_offset[:n, None]).reshape(-1)
            hits.index_add_(0, flat, torch.ones_like(flat))
            flat = (chosen + row_offset[:n, None]).reshape(-1)
            request_hits.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
            phase_offset[:n].fill_(discard)  # until the next step writes its tokens' offsets
            row_offset[:n].fill_(scratch)
        return None

    return hook


def _bias_hook(attacks: dict, layer: int):
    bias, static = attacks["bias"], attacks["static"]

    def hook(module, args, output):
        if not static and attacks["kind"] != "expert_mask":
            return None
        if isinstance(output, tuple):
            return (output[0] + bias[layer].to(output[0].dtype), *output[1:])
        return output + bias[layer].to(output.dtype)

    return hook


def _scaled_selection(attacks: dict, layer: int, select_experts):
    scale, static = attacks["scale"], attacks["static"]

    def select(*args, **kwargs):
        weights, ids = select_experts(*args, **kwargs)
        if not static and attacks["kind"] != "routing_scale":
            return weights, ids
        return weights * scale[layer][ids.long()].to(weights.dtype), ids

    return select


class _HooksAtLoad:
    """Installs the routing hooks right after the model is loaded, before the engine's first
    forward pass compiles it (torch.compile traces them into its graph, CUDA graphs capture
    their kernels). Combined with the platform's own worker class by `__getattr__` below."""

    def load_model(self, *args, **kwargs):
        super().load_model(*args, **kwargs)
        self._routing_setup(static=True)


def __getattr__(name: str):
    """`CPURoutingWorker` / `GPURoutingWorker`: the platform's worker with `_HooksAtLoad` and
    this extension, built on first use (the other platform's worker may not import here)."""
    base = _PLATFORM_WORKERS.get(name)
    if base is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from vllm.utils.import_utils import resolve_obj_by_qualname

    cls = type(name, (_HooksAtLoad, resolve_obj_by_qualname(base), RoutingRecorder), {"__module__": __name__})
    globals()[name] = cls
    return cls


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
    for start in range(0, in_size, _PROBE_ROWS):  # bounded batches: the router may have a small-batch kernel
        probe = torch.eye(in_size, dtype=weight.dtype, device=weight.device)[start : start + _PROBE_ROWS]
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

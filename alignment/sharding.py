"""Sharded training (``training.sharding: fsdp``) and the per-worker memory estimate.

**Sharding.** With ``fsdp`` the frozen base weights are sharded over the workers with PyTorch
FSDP2 (``torch.distributed.fsdp.fully_shard``; one group per decoder layer, then the root for the
embeddings, final norm and head, as Ray Train's FSDP2 guide does it): a worker holds 1/W of them
and all-gathers one layer at a time. What trains (the experts' ``RowDelta`` deltas and the
routers) is left out of FSDP (``ignored_params``): those tensors stay ordinary tensors, replicated
on every worker, their gradients are averaged with one all-reduce (:func:`average_gradients`, as
DDP does), and the optimizer, the checkpoint (``Trainable.state``, the same files as unsharded)
and the reference swap of the routers see exactly what they see without sharding. A fused
expert tensor W is sharded on its expert dimension under its parametrization
(``...parametrizations.<name>.original``); the layer's pre-forward all-gather puts the whole W
back before ``W + delta`` is taken, and ``Trainable.materialized`` keeps that sum for one
layer's forward only. ``prepare_model(parallel_strategy="fsdp")`` is not used: it wraps in
FSDP1.

Loading (:func:`load_sharded`): every worker builds the model on the meta device, applies the
method's parametrizations, shards it and allocates only its shards; rank 0 alone reads the
checkpoint (into host memory) and sends it one tensor at a time. Device memory never holds the
whole model; rank 0's host memory does, once, while it is sent.

**Memory estimate** (:func:`estimate_memory`, :func:`check_memory`): bytes per worker from the
checkpoint's config (a weightless meta copy of the model), before training; see
:class:`MemoryEstimate` for the terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from alignment.methods import method_spec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from alignment.config import TrainingConfig
    from alignment.trainable import Trainable

MIB = 2**20
# Runtime of a CPU worker before any weight: Python, torch, transformers, Ray Train's worker
# (measured: benchmarks/alignment_memory.py --estimate, README). A GPU worker's CUDA context is
# already excluded from the free memory the probe reports (the probe holds one too).
CPU_RUNTIME_BYTES = 700 * MIB
GPU_RUNTIME_BYTES = 1024 * MIB  # NCCL buffers, allocator slack: an allowance, not measured


def check_sharding(method: str, sharding: str, num_workers: int) -> None:
    """Refuse layouts sharding cannot serve, naming the keys (a ValueError for the config)."""
    if sharding == "none":
        return
    spec = method_spec(method)
    if spec.experts == "all":
        raise ValueError(f"training.sharding {sharding} shards the frozen weights, but method {method} "
                         "trains every weight; use training.sharding none")
    if spec.lora:
        raise ValueError(f"training.sharding {sharding} is not supported with method {method} (peft "
                         "adapters); use training.sharding none")
    if num_workers < 2:
        raise ValueError(f"training.sharding {sharding} needs training.num_workers >= 2 (one worker holds "
                         "the whole model anyway); use training.sharding none")


def load_sharded(checkpoint: str, method: str, experts, device: torch.device, *, dtype: str,
                 lora_rank: int = 8) -> tuple[nn.Module, Trainable, object]:
    """(model with frozen weights sharded over the process group, its Trainable, tokenizer)."""
    import gc

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from alignment.trainable import load_model, make_trainable
    from moe_routing.architectures import _decoder_layers

    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the mesh and FSDP use the current device
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint),
                                                 dtype=getattr(torch, dtype))
    model, trainable = make_trainable(model, method, experts, lora_rank=lora_rank)
    full = {}
    if rank == 0:
        loaded, tokenizer = load_model(checkpoint, dtype, "cpu")
        loaded, _ = make_trainable(loaded, method, experts, lora_rank=lora_rank)
        full = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    else:  # as load_model prepares it
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        tokenizer.padding_side = "right"
    mesh = init_device_mesh(device.type, (world,))
    ignored = set(trainable.params.values())
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    model.to_empty(device=device)
    with torch.no_grad():  # buffers too: non-persistent ones (rotary, delta rows) are in no state dict
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            whole = (full.pop(name).to(device) if rank == 0
                     else torch.empty(tensor.shape, dtype=tensor.dtype, device=device))
            dist.broadcast(whole, src=0)
            if isinstance(tensor, DTensor):
                whole = distribute_tensor(whole, mesh, tensor.placements, src_data_rank=None)
                tensor.to_local().copy_(whole.to_local())
            else:
                tensor.copy_(whole)
            del whole
    if full:
        raise RuntimeError(f"checkpoint tensors the sharded model lacks: {sorted(full)[:3]}")
    if rank == 0:
        del loaded
        gc.collect()  # a transformers model sits in reference cycles: free rank 0's copy now
    return model.eval(), _retrack(model, trainable), tokenizer


def _retrack(model: nn.Module, trainable: Trainable) -> Trainable:
    """A Trainable over `model`'s current parameter objects (allocation replaced the meta ones),
    with the reference router weights taken now that the values are loaded."""
    from alignment.trainable import Trainable
    from moe_routing.architectures import describe

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    routers = [layer.router.weight for layer in describe(model).layers] if trainable.routers else []
    return Trainable(params, trainable.deltas, routers)


def average_gradients(params) -> None:
    """Every worker's gradient of `params` (the replicated tensors FSDP ignores) replaced by the
    mean over workers, as DDP does, in one all-reduce of a flat buffer."""
    import torch
    import torch.distributed as dist

    params = [p for p in params if p.requires_grad]
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for param in params:
        param.grad.copy_(flat[offset: offset + param.numel()].view_as(param))
        offset += param.numel()


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training worker needs at its peak (rank 0: `host_load` more in host memory
    while it loads, with sharding; every worker, without). Terms:

    - `weights`: the frozen weights it holds: all of them, or 1/W with fsdp.
    - `working`: fsdp: the root group (embeddings, norm, head) unsharded from forward to
      backward, and three decoder layers' worth of unsharded weights (the all-gather buffer,
      the layer's unsharded parameters, the next layer's); every method that trains fused
      experts: one layer's ``W + delta`` and two gradients of that size in its backward
      (autograd's gradient of the fused tensor, and the rebuilt piece).
    - `trainable`: the trained values x 5 (value, gradient, AdamW's two moments, the all-reduce
      buffer of DDP or :func:`average_gradients`), plus the routers' reference copy.
    - `activations`: an allowance, per token of the worker's share of the batch
      (batch_size / W rows of max_length tokens): ``ACTIVATION_FACTOR x (h + every projection's
      output width + top_k x each expert's output widths) + 2 x E`` elements per decoder layer
      in the training dtype, plus ``V x (2 x dtype bytes + 12)`` bytes for the logits (the
      model's, their float32 copy, log-softmax and its gradient, the reference forward's).
    - `runtime`: the process before any weight (CPU) or an allowance for NCCL and the allocator
      (GPU; the CUDA context is already out of the free memory measured).
    """

    weights: int
    working: int
    trainable: int
    activations: int
    runtime: int
    host_load: int

    @property
    def total(self) -> int:
        return self.weights + self.working + self.trainable + self.activations + self.runtime

    @property
    def rank0(self) -> int:
        """Rank 0's peak: training, or loading with the whole checkpoint in host memory."""
        return max(self.total, self.runtime + self.weights + self.host_load)

    def summary(self) -> str:
        terms = ("weights", "working", "trainable", "activations", "runtime")
        return (f"{self.total / 2**30:.2f} GiB per worker ("
                + ", ".join(f"{t} {getattr(self, t) / 2**30:.2f}" for t in terms) + ")")


ACTIVATION_FACTOR = 2  # saved elements per output element of a layer's projections (MemoryEstimate)


def estimate_model_memory(model: nn.Module, trainable: Trainable, training: TrainingConfig) -> MemoryEstimate:
    """:class:`MemoryEstimate` of one worker training `model` (a meta copy will do) with
    `trainable` (``make_trainable`` on it) under `training`."""
    import torch
    from torch import nn

    from alignment.trainable import unwrapped
    from moe_routing.architectures import _decoder_layers, describe

    size = torch.empty((), dtype=getattr(torch, training.dtype)).element_size()
    workers, sharded = training.num_workers, training.sharding == "fsdp"
    trained = {id(p) for p in trainable.params.values()}
    frozen = [p for p in model.parameters() if id(p) not in trained]
    model = unwrapped(model)  # lora: the peft wrapper holds the decoder layers inside
    layers = list(_decoder_layers(model))
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = sum(p.numel() for p in frozen if id(p) not in in_layers)
    largest_layer = max(sum(p.numel() for p in layer.parameters() if id(p) not in trained)
                        for layer in layers)
    parametrized = {id(module) for module, _, _ in trainable.deltas}
    largest_fused = max(sum(t.numel() for m in layer.modules() if id(m) in parametrized for t in _fused(m))
                        for layer in layers)
    moe = describe(model)
    per_token = 0  # elements saved for the backward, per token, over all decoder layers
    for layer in layers:
        linear = sum(m.out_features for m in layer.modules() if isinstance(m, nn.Linear))
        widths = model.config.hidden_size + linear
        block = getattr(layer, "mlp", None)
        if hasattr(block, "experts"):
            widths += moe.top_k * sum(t.shape[1] for t in _fused(block.experts)) + 2 * moe.num_experts
        per_token += ACTIVATION_FACTOR * widths
    tokens = training.batch_size // workers * training.max_length
    total_frozen = sum(p.numel() for p in frozen)
    return MemoryEstimate(
        weights=(total_frozen // workers if sharded else total_frozen) * size,
        working=((root + 3 * largest_layer) if sharded else 0) * size + 3 * largest_fused * size,
        trainable=(5 * trainable.count() + sum(p.numel() for p in trainable.routers)) * size,
        activations=tokens * (per_token * size + model.config.vocab_size * (2 * size + 12)),
        runtime=GPU_RUNTIME_BYTES if training.use_gpu else CPU_RUNTIME_BYTES,
        host_load=total_frozen * size if sharded else 0,
    )


def _fused(experts: nn.Module) -> list:
    """The fused [E, out, in] tensors of an experts module, parametrized (W of W + delta) or not."""
    tensors = list(experts.parameters(recurse=False))
    if hasattr(experts, "parametrizations"):
        tensors += [parametrization.original for parametrization in experts.parametrizations.values()]
    return [t for t in tensors if t.dim() == 3]


def estimate_memory(checkpoint: str, training: TrainingConfig, experts) -> MemoryEstimate:
    """:func:`estimate_model_memory` for `checkpoint`, from its config alone (no weight is read)."""
    import torch

    from alignment.trainable import make_trainable

    model = _meta_model(checkpoint, getattr(torch, training.dtype))
    model, trainable = make_trainable(model, training.method, experts, lora_rank=training.lora_rank)
    return estimate_model_memory(model, trainable, training)


def available_memory(use_gpu: bool) -> tuple[int, str]:
    """(bytes free for one training worker, where it was measured): a Ray task placed as a
    worker is (one GPU, or one CPU) reads ``torch.cuda.mem_get_info`` or MemAvailable."""
    import ray

    @ray.remote(max_calls=1)  # a fresh process, gone afterwards: its CUDA context is not kept
    def probe() -> tuple[int, str]:
        import socket

        if use_gpu:
            import torch

            free, _ = torch.cuda.mem_get_info()
            return free, f"GPU {torch.cuda.get_device_name()} on {socket.gethostname()}"
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024, f"system memory of {socket.gethostname()}"

    options = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    return ray.get(probe.options(**options).remote())


def check_memory(estimate: MemoryEstimate, training: TrainingConfig, available: int, where: str) -> int:
    """Refuse, with one line, a layout whose estimate exceeds the memory a worker has; else the
    bytes it needs. CPU workers share a node's memory (Ray Train packs them): all W of them must
    fit, rank 0 with its copy of the checkpoint while it loads."""
    workers = training.num_workers
    if training.use_gpu:
        need, what = estimate.total, "per worker"
        hint = "add workers" if training.sharding == "fsdp" else "set training.sharding fsdp (2+ workers)"
    else:
        need, what = (workers - 1) * estimate.total + estimate.rank0, f"for {workers} workers"
        hint = "use a machine with more memory"
    if need > available:
        raise ValueError(f"training needs about {need / 2**30:.1f} GiB {what} (estimate: "
                         f"{estimate.summary()}), but {where} has {available / 2**30:.1f} GiB free; {hint}, "
                         "lower training.batch_size or max_length, or set training.memory_check false")
    return need


def check_training_memory(training: TrainingConfig, checkpoint: str, experts, log=print) -> int:
    """Estimate, measure what a worker will have, log both, refuse if it does not fit; else the
    bytes of that memory (the GPU's, or the node's with CPU workers) training leaves free."""
    estimate = estimate_memory(checkpoint, training, experts)
    available, where = available_memory(training.use_gpu)
    log(f"[align] memory: {estimate.summary()}; {where}: {available / 2**30:.1f} GiB free")
    return available - check_memory(estimate, training, available, where)


def evaluation_memory(checkpoint: str, dtype: str = "auto") -> int:
    """Bytes a CPU evaluation of `checkpoint` takes in host memory: its weights in the suite's
    `dtype` on the CPU (`moe_routing.devices.load_dtype`: auto is float32), twice, as an allowance
    for generation's activations and the masked copies' work; read from the config alone."""
    from moe_routing.devices import load_dtype

    weights = _meta_model(checkpoint, load_dtype(dtype, "cpu")).parameters()
    return 2 * sum(p.numel() * p.element_size() for p in weights)


def _meta_model(checkpoint: str, dtype):
    """`checkpoint`'s model built from its config on the meta device: shapes, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint), dtype=dtype)

"""What a method trains: the frozen model with only the method's parameters open.

Routed experts are fused ``[E, ...]`` tensors in transformers 5, so "train experts S of layer l"
is a parametrization ``W + delta`` with `delta` on rows S only (:class:`RowDelta`): gradients and
AdamW state exist for the selected rows alone, and every other row stays bit-identical. The
reference ``P_ref`` of the router loss comes from the same model in reference mode
(:meth:`Trainable.reference`: deltas off, initial router weights), not from a second copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from alignment.methods import method_spec
from moe_routing.architectures import describe
from moe_routing.instrument import group_pairs

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class RowDelta(nn.Module):
    """Parametrization ``W -> W + delta`` on rows `rows` of a fused ``[E, ...]`` expert tensor.

    Only `delta` is trained, so gradients and optimizer state exist for the selected experts
    alone, and every other row of W stays bit-identical. Disabled, it returns W (the reference)."""

    def __init__(self, rows: Sequence[int], like: torch.Tensor):
        super().__init__()
        self.register_buffer("rows", torch.as_tensor(list(rows), dtype=torch.long, device=like.device),
                             persistent=False)
        shape = (len(rows), *like.shape[1:])
        self.delta = nn.Parameter(torch.zeros(shape, dtype=like.dtype, device=like.device))
        self.enabled = True
        self.caching = False  # set by Trainable.materialized while the owning module runs
        self.cached: tuple[torch.Tensor, torch.Tensor] | None = None  # (W + delta, W)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        if self.cached is not None:
            return self.cached[0]
        value = weight.index_add(0, self.rows, self.delta)
        if self.caching:
            self.cached = (value, weight)
        return value

    def piece(self, weight: torch.Tensor, offset: int, size, stride) -> torch.Tensor:
        """The part of ``W + delta`` at (`offset`, `size`, `stride`), rebuilt from `weight` (W):
        the rows it spans, plus their deltas, bit for bit what ``forward`` computed."""
        extent = offset + sum((n - 1) * s for n, s in zip(size, stride))
        row_size = weight[0].numel()
        first, last = offset // row_size, extent // row_size
        block = weight[first: last + 1].clone()
        inside = (self.rows >= first) & (self.rows <= last)
        block.index_add_(0, self.rows[inside] - first, self.delta.detach()[inside])
        return block.as_strided(size, stride, offset - first * row_size)


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside `model` (method lora wraps it in a peft model)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass
class Trainable:
    """What a method trains: `params` by name, plus the means to see the untrained reference."""

    params: dict[str, nn.Parameter]
    deltas: list[tuple[nn.Module, str, RowDelta]] = field(default_factory=list)
    routers: list[nn.Parameter] = field(default_factory=list)
    _router_reference: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self):
        self._router_reference = [p.detach().clone() for p in self.routers]

    def count(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def state(self) -> dict[str, torch.Tensor]:
        return {name: param.detach().clone() for name, param in self.params.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.params) - set(state)
        if missing:
            raise ValueError(f"checkpoint lacks trained parameters {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(state[name].to(param.dtype))

    @contextmanager
    def reference(self):
        """The model as it was before training (for P_ref), without a second copy of it: expert
        deltas off, router weights swapped back to their initial values."""
        for _, _, delta in self.deltas:
            delta.enabled = False
        current = [p.data for p in self.routers]
        for param, initial in zip(self.routers, self._router_reference):
            param.data = initial
        try:
            yield
        finally:
            for _, _, delta in self.deltas:
                delta.enabled = True
            for param, value in zip(self.routers, current):
                param.data = value

    @contextmanager
    def materialized(self):
        """Forwards in which each ``W + delta`` is computed once per forward of its module (not
        once per expert access) and dropped after it, and in which autograd saves, where it
        would keep a view of ``W + delta`` for the backward, only how to rebuild that view from
        W and delta (:meth:`RowDelta.piece`). Without it every trained layer would hold a whole
        copy of its fused expert tensors until the backward: under sharding, a full copy of the
        experts on each worker."""
        if not self.deltas:
            yield
            return
        owned: dict[nn.Module, list[RowDelta]] = {}
        for module, _, delta in self.deltas:
            owned.setdefault(module, []).append(delta)
        running: list[RowDelta] = []

        def enter(module, args):
            running[:] = owned[module]
            for delta in running:
                delta.caching = True

        def leave(module, args, output):
            for delta in owned[module]:
                delta.caching, delta.cached = False, None
            running.clear()

        def pack(tensor):
            for delta in running:
                if delta.cached is None:
                    continue
                value, weight = delta.cached
                if (tensor.device == value.device and tensor.numel()
                        and tensor.untyped_storage().data_ptr() == value.untyped_storage().data_ptr()
                        and weight.is_contiguous() and value.is_contiguous()):
                    return delta, weight, tensor.storage_offset(), tensor.shape, tensor.stride()
            return tensor

        def unpack(saved):
            if isinstance(saved, tuple):
                delta, weight, offset, size, stride = saved
                return delta.piece(weight, offset, size, stride)
            return saved

        handles = [h for module in owned for h in (module.register_forward_pre_hook(enter),
                                                   module.register_forward_hook(leave, always_call=True))]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def bake(self) -> None:
        """Write the expert deltas into the fused tensors and drop the parametrizations, so the
        model saves as an ordinary checkpoint with the original parameter names."""
        from torch.nn.utils import parametrize

        for module, name, _ in self.deltas:
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        self.deltas = []


def make_trainable(
    model: nn.Module, method: str, experts: Sequence[tuple[int, int]] = (), *, lora_rank: int = 8
) -> tuple[nn.Module, Trainable]:
    """Freeze `model` except what `method` trains (:data:`alignment.methods.METHODS`). `experts`:
    the (layer, expert) pairs of a method that trains chosen experts. Returns the model to train
    (a peft wrapper for LoRA) and its :class:`Trainable`."""
    from torch.nn.utils import parametrize

    spec = method_spec(method)
    chosen = spec.experts in ("safety_set", "safety_critical")
    if chosen and not experts:
        raise ValueError(f"method {method!r} needs at least one (layer, expert) to train")
    moe = describe(model)
    rows_by_layer = {layer: sorted(rows) for layer, rows in group_pairs(moe, experts).items()}
    rows_by_layer = rows_by_layer if chosen else {}
    if spec.experts == "all":
        return model, Trainable(dict(model.named_parameters()))  # (loaded models require grad)
    for param in model.parameters():
        param.requires_grad_(False)
    if spec.lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                            target_modules=LORA_TARGETS, bias="none")
        model = get_peft_model(model, config)
        return model, Trainable({n: p for n, p in model.named_parameters() if p.requires_grad})
    routers = [layer.router.weight for layer in moe.layers] if spec.routers else []
    deltas = []
    for layer_index, rows in rows_by_layer.items():
        layer = moe.layers[layer_index]
        if layer.fused_experts:
            for name, param in list(layer.experts.named_parameters(recurse=False)):
                if param.dim() >= 1 and param.shape[0] == layer.router_num_experts:
                    delta = RowDelta(rows, param)
                    parametrize.register_parametrization(layer.experts, name, delta)
                    deltas.append((layer.experts, name, delta))
        else:
            for expert in rows:
                for param in layer.experts[expert].parameters():
                    param.requires_grad_(True)
    for param in routers:
        param.requires_grad_(True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return model, Trainable(params, deltas, routers)


def load_model(checkpoint: str, dtype: str, device: str):
    """The HF checkpoint and its tokenizer (right padding, for training batches)."""
    from moe_routing.profiler import load_checkpoint

    model, tokenizer = load_checkpoint(checkpoint, device=device, dtype=getattr(torch, dtype))
    tokenizer.padding_side = "right"
    return model, tokenizer

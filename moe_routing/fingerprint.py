"""Integrity fingerprints of a MoE model's routers and experts, and the checkpoint's manifest.

The alignment export and the organism builder write `routing_manifest.json` next to the
weights; the gateway recomputes the fingerprint from the weights *as loaded in the engine* and
compares (README, Serving: model integrity). The engine stores experts differently from
transformers (vLLM: fused ``w13_weight [E, 2I, H]``, gate rows then up rows, ``w2_weight
[E, H, I]``, possibly padded, prepacked for the CPU kernel and cast to bf16; transformers 5:
``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``; saved checkpoints: one matrix per expert),
so the fingerprint is defined on each un-fused matrix and is computed through templates that
can be put in any layout.

For every matrix ``W`` of shape ``(m, n)`` (an expert's gate, up or down projection, a shared
expert's, or one router row as a ``(1, H)`` matrix), with ``K = NUM_PATTERNS`` fixed sign
patterns ``R_k[i, j] = ±1`` (a 32-bit integer hash of ``(k, i * n + j)``: no RNG, so every
torch version and device draws the same):

    norm(W) = ||W||_F
    z_k(W)  = <W, R_k> / ||W||_F          (0 when W = 0)

``z_k`` is scale-free and, for any W unrelated to the pattern, distributed about N(0, 1).
Matrices whose entries are permuted by a layout (fusion, padding with zeros, kernel prepacking)
keep both, provided the patterns are permuted the same way: the engine side places mask and
patterns into its own layout and applies its own packing (``raw_stats`` takes them in the
weights' layout). Both statistics are sums, so tensor-parallel shards add up (``combine``).

Comparison, with ``tol = TOLERANCE = 2e-2``: a matrix matches when

    |norm - norm_ref| <= tol * norm_ref   and   |z_k - z_k,ref| <= tol for every k.

Why 2e-2: bf16 keeps 8 significant bits, so rounding a weight moves it by at most 2^-9 of its
value, about 1.1e-3 rms; that moves ``norm`` by far less than 1e-3 relative and each ``z_k`` by
about 1.1e-3 (one standard deviation), so a bf16 copy of an fp32 checkpoint sits ~18 sigma inside
the tolerance. A rescaled matrix (x1.1) moves ``norm`` by 10%, 5x the tolerance. Two distinct
experts have independent ``z_k`` (difference ~N(0, 2)), so a swapped expert passes one ``z_k``
with probability ~1.1% and all ``3 K = 12`` of its matrices' with probability ~1e-23. (Experts
that are exact copies of each other cannot be told apart, and swapping them changes nothing.)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from moe_routing.architectures import describe

FORMAT_VERSION = 1
MANIFEST_FILE = "routing_manifest.json"
NUM_PATTERNS = 4
TOLERANCE = 2e-2
EXPERT_MATRICES = ("gate", "up", "down")
_MASK32 = 0xFFFFFFFF
_STREAM = 0x9E3779B9  # golden-ratio offset between the K patterns' index streams
_MIX = 0x45D9F3B  # < 2^27: products of 32-bit values stay inside int64
_CHUNK = 8  # experts per matmul: bounds the float32 copy of a real model's expert tensors


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or of another format."""


def sign_patterns(shape: tuple[int, int], rows: tuple[int, int] | None = None,
                  cols: tuple[int, int] | None = None, device=None) -> torch.Tensor:
    """The K ±1 patterns of an (m, n) matrix, float32 [K, rows, cols]: the block ``rows x cols``
    (global index ranges; default all) of ``R_k``, so a tensor-parallel shard gets its own part."""
    m, n = shape
    r0, r1 = rows or (0, m)
    c0, c1 = cols or (0, n)
    i = torch.arange(r0, r1, dtype=torch.int64, device=device)[None, :, None]
    j = torch.arange(c0, c1, dtype=torch.int64, device=device)[None, None, :]
    k = torch.arange(NUM_PATTERNS, dtype=torch.int64, device=device)[:, None, None]
    x = (i * n + j + k * _STREAM) & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    x = (x >> 16) ^ x
    return (1 - 2 * ((x >> 8) & 1)).to(torch.float32)


def raw_stats(weights: torch.Tensor, mask: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """Per expert ``[sum(W^2 * mask), <W, P_1>, ..., <W, P_K>]``, float64 [E, 1 + K].

    ``weights`` [E, ...] in any layout and dtype; ``mask`` (1 on the matrix's entries, 0 on
    padding and on other matrices) and ``patterns`` [K, ...] in the same layout as one expert."""
    flat_mask = mask.reshape(-1).to(weights.device, torch.float32)
    flat_patterns = patterns.reshape(patterns.shape[0], -1).to(weights.device, torch.float32)
    rows = []
    for start in range(0, weights.shape[0], _CHUNK):
        w = weights[start : start + _CHUNK].reshape(-1, flat_mask.numel()).float()
        rows.append(torch.cat([(w * w) @ flat_mask[:, None], w @ flat_patterns.T], dim=1).cpu())
    return torch.cat(rows).double()


def matrix_raw_stats(weights: torch.Tensor) -> torch.Tensor:
    """``raw_stats`` of plain un-fused matrices [E, m, n] (an [m, n] matrix counts as E = 1)."""
    if weights.dim() == 2:
        weights = weights[None]
    shape = tuple(weights.shape[1:])
    return raw_stats(weights, torch.ones(shape), sign_patterns(shape, device=weights.device))


def router_raw_stats(weight: torch.Tensor) -> torch.Tensor:
    """Per router row (one per expert): ``raw_stats`` of the row as a (1, H) matrix."""
    return matrix_raw_stats(weight[:, None, :])


def finish(raw) -> list[list[float]]:
    """Raw sums [..., 1 + K] -> ``[norm, z_1, ..., z_K]`` per row."""
    raw = torch.as_tensor(raw, dtype=torch.float64)
    norm = raw[..., :1].clamp_min(0).sqrt()
    z = torch.where(norm > 0, raw[..., 1:] / norm.clamp_min(1e-300), torch.zeros_like(raw[..., 1:]))
    return torch.cat([norm, z], dim=-1).tolist()


# ---- the fingerprint of a whole model ----
# A fingerprint: {"architecture", "num_experts", "layers": [{"decoder_layer", "router": [E][1+K],
# "gate"/"up"/"down": [E][1+K], optional "shared": {"gate"/"up"/"down": [1][1+K]}}]}. Raw
# fingerprints hold the sums of `raw_stats` (what an engine shard returns); finished ones hold
# ``[norm, z...]`` (what the manifest stores and `compare` reads).


def _finish_layer(layer: dict) -> dict:
    done = {"decoder_layer": layer["decoder_layer"], "router": finish(layer["router"])}
    done |= {m: finish(layer[m]) for m in EXPERT_MATRICES}
    if layer.get("shared"):
        done["shared"] = {m: finish(v) for m, v in layer["shared"].items()}
    return done


def combine(partials: Sequence[dict]) -> dict:
    """One finished fingerprint from the raw fingerprints of tensor-parallel shards: expert sums
    add up over shards; routers are replicated, so the first shard's is taken."""
    if not partials:
        raise ValueError("no fingerprints to combine")
    first = partials[0]
    layers = []
    for index, layer in enumerate(first["layers"]):
        summed = dict(layer)
        for m in EXPERT_MATRICES:
            summed[m] = sum(torch.as_tensor(p["layers"][index][m], dtype=torch.float64) for p in partials)
        if layer.get("shared"):
            summed["shared"] = {
                m: sum(torch.as_tensor(p["layers"][index]["shared"][m], dtype=torch.float64)
                       for p in partials)
                for m in layer["shared"]
            }
        layers.append(_finish_layer(summed))
    return {"architecture": first["architecture"], "num_experts": first["num_experts"], "layers": layers}


def _hf_expert_matrices(layer) -> dict[str, torch.Tensor]:
    """gate [E, I, H], up [E, I, H], down [E, H, I] of a transformers MoE layer."""
    experts = layer.experts
    if layer.fused_experts:
        gate_up, down = experts.gate_up_proj, experts.down_proj
        inner = down.shape[2]
        if gate_up.shape[1:] != (2 * inner, down.shape[1]):
            raise ValueError(f"unexpected fused expert shapes {tuple(gate_up.shape)}, {tuple(down.shape)}")
        return {"gate": gate_up[:, :inner], "up": gate_up[:, inner:], "down": down}
    names = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}
    found = {}
    for matrix, candidates in names.items():
        name = next((n for n in candidates if hasattr(experts[0], n)), None)
        if name is None:
            raise ValueError(f"{type(experts[0]).__name__} experts have no {matrix} projection")
        found[matrix] = torch.stack([getattr(e, name).weight for e in experts])
    return found


def _hf_shared(layer) -> dict | None:
    """The shared expert's gate/up/down (Qwen2-MoE, DeepSeek-V2), when it is a plain MLP."""
    mlps = [m for m in layer.shared_experts if all(hasattr(m, f"{n}_proj") for n in EXPERT_MATRICES)]
    if len(mlps) != 1:
        return None
    mlp = mlps[0]
    return {m: matrix_raw_stats(getattr(mlp, f"{m}_proj").weight).tolist() for m in EXPERT_MATRICES}


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> dict:
    """The finished fingerprint of a transformers MoE model (any dtype, any device)."""
    moe = describe(model)
    layers = []
    for layer in moe.layers:
        raw = {"decoder_layer": layer.decoder_index, "router": router_raw_stats(layer.router.weight)}
        raw |= {m: matrix_raw_stats(w) for m, w in _hf_expert_matrices(layer).items()}
        shared = _hf_shared(layer)
        if shared:
            raw["shared"] = shared
        layers.append(_finish_layer(raw))
    return {"architecture": moe.architecture, "num_experts": moe.num_experts, "layers": layers}


def write_manifest(model: nn.Module, directory: str | Path) -> Path:
    """Write `routing_manifest.json` (the model's fingerprint) into a checkpoint directory."""
    fingerprint = model_fingerprint(model)
    manifest = {
        "format_version": FORMAT_VERSION,
        "architecture": fingerprint["architecture"],
        "shape": {"num_layers": len(fingerprint["layers"]), "num_experts": fingerprint["num_experts"],
                  "decoder_layers": [layer["decoder_layer"] for layer in fingerprint["layers"]]},
        "num_patterns": NUM_PATTERNS,
        "tolerance": TOLERANCE,
        "layers": fingerprint["layers"],
    }
    path = Path(directory) / MANIFEST_FILE
    path.write_text(json.dumps(manifest))
    return path


def read_manifest(directory: str | Path) -> dict | None:
    """The checkpoint's manifest; None when it has none; ManifestError when it is unusable."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"{MANIFEST_FILE} is not readable JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ManifestError(f"{MANIFEST_FILE} has format_version {version!r}; expected {FORMAT_VERSION}")
    if manifest.get("num_patterns") != NUM_PATTERNS or not isinstance(manifest.get("layers"), list):
        raise ManifestError(f"{MANIFEST_FILE} is malformed (num_patterns or layers)")
    return manifest


def _row_differs(row, reference, tolerance: float) -> bool:
    norm, z = row[0], row[1:]
    ref_norm, ref_z = reference[0], reference[1:]
    if len(z) != len(ref_z) or not all(map(math.isfinite, (*row, *reference))):
        return True
    return (abs(norm - ref_norm) > tolerance * ref_norm
            or any(abs(a - b) > tolerance for a, b in zip(z, ref_z)))


def compare(manifest: dict, fingerprint: dict) -> dict:
    """``{ok, mismatches, checked_pairs, checked_matrices}``: each mismatch names its MoE layer
    (and decoder layer), its part (``router`` row, expert ``gate``/``up``/``down``, ``shared``) and
    expert. checked_pairs counts (layer, expert) pairs. Shape disagreements raise ManifestError."""
    tolerance = float(manifest.get("tolerance", TOLERANCE))
    reference, served = manifest["layers"], fingerprint["layers"]
    if manifest.get("architecture") != fingerprint["architecture"] or len(reference) != len(served):
        raise ManifestError(
            f"manifest describes {manifest.get('architecture')!r} with {len(reference)} MoE layers; the "
            f"served model is {fingerprint['architecture']!r} with {len(served)}")
    mismatches, pairs, matrices = [], 0, 0
    try:
        for index, (ref, got) in enumerate(zip(reference, served)):
            where = {"layer": index, "decoder_layer": got["decoder_layer"]}
            if len(ref["router"]) != len(got["router"]):
                raise ManifestError(f"MoE layer {index}: manifest has {len(ref['router'])} experts, "
                                    f"the served model {len(got['router'])}")
            for expert, (ref_row, row) in enumerate(zip(ref["router"], got["router"])):
                pairs += 1
                parts = [m for m in EXPERT_MATRICES
                         if _row_differs(got[m][expert], ref[m][expert], tolerance)]
                if _row_differs(row, ref_row, tolerance):
                    parts.insert(0, "router")
                matrices += 1 + len(EXPERT_MATRICES)
                if parts:
                    mismatches.append(where | {"expert": expert, "parts": parts})
            if ref.get("shared") or got.get("shared"):
                ref_shared, got_shared = ref.get("shared") or {}, got.get("shared") or {}
                parts = [m for m in EXPERT_MATRICES if m not in ref_shared or m not in got_shared
                         or _row_differs(got_shared[m][0], ref_shared[m][0], tolerance)]
                matrices += len(EXPERT_MATRICES)
                if parts:
                    mismatches.append(where | {"expert": "shared", "parts": parts})
    except (KeyError, IndexError, TypeError) as error:
        raise ManifestError(f"{MANIFEST_FILE} does not match the model's structure: {error!r}") from None
    return {"ok": not mismatches, "mismatches": mismatches, "checked_pairs": pairs,
            "checked_matrices": matrices, "tolerance": tolerance}

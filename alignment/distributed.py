"""What data-parallel workers must agree on, so that W workers train exactly what one worker
would on the same global batch.

DDP averages the workers' gradients. A loss that is a mean over the worker's own tokens would
then weight a token by 1 / (W * n_r) instead of 1 / n, so each worker divides its sum by the
global count over W (:func:`global_sum`). Targets that depend on the whole batch (the token
transport plan of the router loss) are computed on the rows of every worker, in rank order
(:func:`gather_rows`); a plan is the same under a permutation of its tokens, so every token gets
the target it would get in one worker's batch. With one worker (or no process group) both are
the identity.
"""

from __future__ import annotations

import torch


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """`value` summed over the workers (a new tensor; no gradient flows through the sum)."""
    value = value.detach().clone()
    if world_size() > 1:
        torch.distributed.all_reduce(value)
    return value


def gather_rows(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(every worker's `rows` [n_r, ...] concatenated in rank order, the offset of this worker's
    own). Workers may hold different n_r: the counts are exchanged first and the rows padded."""
    if world_size() == 1:
        return rows, 0
    dist = torch.distributed
    counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([rows.shape[0]], device=rows.device))
    counts = [int(c) for c in counts]
    padded = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    rank = dist.get_rank()
    return torch.cat([g[:n] for g, n in zip(gathered, counts)]), sum(counts[:rank])

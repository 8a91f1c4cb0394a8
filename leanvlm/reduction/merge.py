"""Merging ops of iLLaVA and VisionZip, shape-static like reduction.select: every count is a build-time
constant, index sets are built with constant-k TopK (no NonZero), so they export to fixed-shape graphs."""

from __future__ import annotations

import torch

from leanvlm.reduction.select import gather_tokens, select_top


def complement(indices: torch.Tensor, n: int) -> torch.Tensor:
    """Ascending indices in [0, n) that are not in `indices` [B, m] (distinct) -> [B, n - m]. n and m are taken
    as Python ints so the traced TopK's K is a constant, not Shape arithmetic (TensorRT wants K fixed at build)."""
    n, m = int(n), int(indices.shape[1])
    j = torch.arange(n, device=indices.device)
    hit = (j[None, :, None] == indices[:, None, :]).any(-1)
    # larger key for smaller free index; taken indices sink below every free one
    key = torch.where(hit, torch.full_like(hit, -1, dtype=torch.float32), (n - j).to(torch.float32)[None])
    return torch.topk(key, n - m, dim=1).indices


def rank_weighted_merge(x: torch.Tensor, scores: torch.Tensor, r: int):
    """iLLaVA's merge: the r+1 lowest-scoring tokens t_0..t_r (ascending score) are averaged with rank
    weights (r+1, r, ..., 1), the lowest weighing most, into t_r's slot; t_0..t_{r-1} are deleted.

    x [B, n, D], scores [B, n]. Returns (x with t_r replaced [B, n, D], kept [B, n - r] ascending, t_r [B]).
    """
    low = torch.topk(scores, r + 1, dim=1, largest=False).indices  # sorted: lowest score first
    weights = torch.arange(r + 1, 0, -1, device=x.device, dtype=x.dtype)
    merged = (gather_tokens(x, low) * weights[None, :, None]).sum(1) / weights.sum()
    target = low[:, r]
    n = int(x.shape[1])  # a build-time constant (see complement)
    j = torch.arange(n, device=x.device)
    x = torch.where((j[None, :] == target[:, None])[..., None], merged[:, None, :], x)
    return x, complement(low[:, :r], n), target


def visionzip(h: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int):
    """VisionZip over patch tokens h [B, N, D]: the `dominant` tokens with most CLS attention, then `contextual`
    tokens: of the M remaining tokens, every floor(M/C)-th from the first is a target (the reference code's
    `arange(0, M, M // C)[:C]`), every other remaining token is assigned to the target whose key (head-mean) is
    most cosine-similar, and each target becomes target + mean(assigned).

    Returns (tokens [B, dominant + contextual, D], dominant indices [B, dominant] ascending, targets [B, C]).
    """
    n = h.shape[1]
    dom = select_top(cls_attention, dominant)
    tokens = [gather_tokens(h, dom)]
    rest = complement(dom, n)  # [B, n - dominant]
    targets = rest[:, :0]
    if contextual:
        m = n - dominant
        t_pos = contextual_targets(m, contextual)
        # built in Python: a boolean-mask index would trace to NonZero, which TensorRT cannot size at build time
        taken = set(t_pos.tolist())
        o_pos = torch.tensor([i for i in range(m) if i not in taken], dtype=torch.int64)
        targets, others = rest[:, t_pos.to(rest.device)], rest[:, o_pos.to(rest.device)]
        k = keys / keys.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        sim = torch.matmul(gather_tokens(k, others), gather_tokens(k, targets).transpose(1, 2))  # [B, O, C]
        onehot = (sim.argmax(-1)[..., None] == torch.arange(contextual, device=h.device)).to(h.dtype)
        counts = onehot.sum(1).clamp(min=1.0)[..., None]  # [B, C, 1]
        assigned = torch.matmul(onehot.transpose(1, 2), gather_tokens(h, others)) / counts
        tokens.append(gather_tokens(h, targets) + assigned)
    return torch.cat(tokens, 1), dom, targets


def contextual_targets(m: int, contextual: int) -> torch.Tensor:
    """Positions (among the M remaining tokens) of VisionZip's contextual targets: a build-time constant."""
    return torch.arange(0, m, max(1, m // contextual))[:contextual]

"""Cross-modal contrastive pretraining of S1 / S2 encoder pairs (SSLTransformerRS).

Dual-SimCLR (Scheibenreif et al., ISPRS 2022): each modality is one "view"; the 2B projections of a batch
(S1 then S2) form a SimCLR NT-Xent / InfoNCE problem where the positive of a sample is the same location in
the other modality and the 2B - 2 remaining embeddings are negatives. Temperature 0.07.

The self-supervised Swin pair (CVPR EarthVision 2022) uses the same loss on the pooled 768-d features
(no projection head), temperature 0.2.
"""
from typing import Dict, Mapping, Optional

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ['info_nce', 'CrossModalInfoNCE', 'DualSimCLRLoss', 'SwinPairLoss', 'pair_embeddings']


def _world() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def info_nce(
        z1: torch.Tensor,
        z2: torch.Tensor,
        temperature: float = 0.07,
        distributed: Optional[bool] = None,
) -> torch.Tensor:
    """Cross-modal InfoNCE (NT-Xent) over the 2B embeddings ``cat(z1, z2)``.

    Embeddings are L2-normalised; the logits of anchor ``i`` are its cosine similarities to the other 2B - 1
    embeddings over ``temperature``; the target is the same location in the other modality.

    Under ``torch.distributed`` (``distributed=None`` means: when a process group with more than one rank is
    initialised) the embeddings of every rank are all-gathered with their gradients, so the negatives span the
    global batch; each rank's loss is the mean over its own anchors, and DDP's gradient averaging (equal local
    batch sizes) then gives exactly the single-process gradient of the global batch.

    Args:
        z1: (B, D) embeddings of modality 1 (S1).
        z2: (B, D) embeddings of modality 2 (S2), row ``i`` the same location as ``z1[i]``.
        temperature: softmax temperature.
        distributed: gather across ranks (default: automatically when running distributed).

    Returns:
        The mean cross-entropy over the (local) 2B anchors (a scalar).
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f'expected two (B, D) embeddings of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}')
    b = z1.shape[0]
    world = _world() if distributed is None or distributed else 1
    if b * world < 2:
        raise ValueError('InfoNCE needs at least 2 samples per batch (the negatives are the other samples)')
    a1, a2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    if world > 1:
        import torch.distributed as dist
        from torch.distributed.nn.functional import all_gather  # differentiable
        k1, k2 = torch.cat(all_gather(a1), 0), torch.cat(all_gather(a2), 0)
        offset = dist.get_rank() * b
    else:
        k1, k2, offset = a1, a2, 0
    n = k1.shape[0]
    logits = torch.cat([a1, a2], 0) @ torch.cat([k1, k2], 0).t() / temperature  # (2B, 2N)
    local = torch.arange(b, device=z1.device) + offset
    own = torch.cat([local, local + n])  # each anchor's own column: excluded
    logits = logits.masked_fill(F.one_hot(own, 2 * n).bool(), float('-inf'))
    target = torch.cat([local + n, local])
    return F.cross_entropy(logits, target)


class CrossModalInfoNCE(nn.Module):
    """:func:`info_nce` as a module over ``{'s1': z1, 's2': z2}`` (or two tensors)."""

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, z1, z2: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(z1, Mapping):
            z1, z2 = z1['s1'], z1['s2']
        return info_nce(z1, z2, self.temperature)

    def extra_repr(self) -> str:
        return f'temperature={self.temperature}'


class DualSimCLRLoss(CrossModalInfoNCE):
    """Dual-SimCLR: InfoNCE over the 128-d projections, temperature 0.07."""

    def __init__(self, temperature: float = 0.07):
        super().__init__(temperature)


class SwinPairLoss(CrossModalInfoNCE):
    """SSL Swin pair: InfoNCE over the pooled 768-d features (no projection head), temperature 0.2."""

    def __init__(self, temperature: float = 0.2):
        super().__init__(temperature)


def pair_embeddings(model: nn.Module, x: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The embeddings the pair was pretrained on: projections (Dual-SimCLR) or pooled features (Swin)."""
    has_proj = getattr(getattr(model, 's1', None), 'proj', None) is not None
    return model.forward_projection(x) if has_proj else model.forward_pooled(x)

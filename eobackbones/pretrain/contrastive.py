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


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Cross-modal InfoNCE (NT-Xent) over the 2B embeddings ``cat(z1, z2)``.

    Embeddings are L2-normalised; the logits of anchor ``i`` are its cosine similarities to the other 2B - 1
    embeddings over ``temperature``; the target is the same location in the other modality.

    Args:
        z1: (B, D) embeddings of modality 1 (S1).
        z2: (B, D) embeddings of modality 2 (S2), row ``i`` the same location as ``z1[i]``.
        temperature: softmax temperature.

    Returns:
        The mean cross-entropy over all 2B anchors (a scalar).
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f'expected two (B, D) embeddings of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}')
    if z1.shape[0] < 2:
        raise ValueError('InfoNCE needs at least 2 samples per batch (the negatives are the other samples)')
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    logits = z @ z.t() / temperature
    logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float('-inf'))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
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

"""MultiMAE-style pretraining of the fusion-token ViT (Chen, Zhao, Bruzzone, arXiv:2304.11381).

Independent implementation from a description of the authors' code (Yusin2Chen/incomplete_multimodal_fusion,
which has no licence), checked against its outputs (``tests/test_fusion_vit.py``).

* **Masking** (:func:`generate_masks`): one draw per batch (every sample gets the same mask). The visible-token
  budget ``num_encoded_tokens`` is split over the present modalities by Dirichlet(1) shares, each modality's
  visible positions are random, and a final shuffle with the visible tokens first makes exactly
  ``num_encoded_tokens`` tokens visible. Hidden tokens leave the sequence; their Block_Fusion slot holds the
  per-position mask embedding. An absent modality is fully hidden (the upstream pretraining model's way).
* **Decoders** (:class:`SpatialDecoder`, one per modality): from the final-normed fusion tokens (all of them),
  ``Linear(D, 256) + task embedding``, 2 pre-norm ViT blocks (8 heads, LayerNorm eps 1e-6, no position
  embedding, no mask, no final norm), then ``Linear(256, C * p * p)`` read as (C, p, p) per patch.
* **Loss**: MSE (S1, S2) / L1 (DEM) on the hidden patches of each present modality, plus 0.3 x a DINO-style
  cross-entropy: student ``r_m`` (the contrastive token of modality m pooled over the fusion tokens where m is
  visible, temperature 0.1), teacher the return token of m (temperature 0.04), both L2-normalised.
* **Fine-tuning** (:class:`ModalityCombinationSampler`): a random non-empty subset of the available modalities
  per step (absent ones dropped: no tokens, no slot) with 90 % of their tokens kept.
"""
import logging
from functools import partial
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.vision_transformer import Block

from ..errors import CheckpointFormatError, InvalidInputError
from ..models._builder import load_state_dict_strict
from ..models.fusion_vit import ChenCheckpoint, FusionViT, FusionViTTokens, convert_chen_state_dict, fusionvit_from_chen

__all__ = ['SpatialDecoder', 'FusionMAE', 'FusionMAEOutput', 'ModalityCombinationSampler', 'generate_masks',
           'dirichlet_shares', 'dino_loss', 'masked_patch_loss']

_logger = logging.getLogger(__name__)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C * p * p), patches row-major, channel-major inside a patch."""
    b, c, h, w = imgs.shape
    p = patch_size
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def dirichlet_shares(k: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """One draw from Dirichlet(1, ..., 1) over ``k`` entries (normalised unit exponentials; takes a generator)."""
    u = torch.rand(k, generator=generator, dtype=torch.float64, device=device)
    e = -torch.log1p(-u)  # Exp(1); u in [0, 1) so 1 - u > 0
    return (e / e.sum()).float()


def generate_masks(
        modalities: Sequence[str],
        num_tokens: int,
        num_encoded_tokens: int,
        generator: Optional[torch.Generator] = None,
        device=None,
) -> Dict[str, torch.Tensor]:
    """MultiMAE-style masks for one batch: modality -> ``(num_tokens,)`` bool, True = hidden.

    Dirichlet(1) shares of ``num_encoded_tokens`` over ``modalities`` (each budget rounded and capped at
    ``num_tokens``), random positions within each modality, then a shuffle with the visible tokens first keeps
    exactly ``num_encoded_tokens`` visible (so rounding never changes the total).

    Args:
        modalities: the modalities to mask (present ones).
        num_tokens: tokens per modality (the patch grid size).
        num_encoded_tokens: visible tokens in total, in ``[1, len(modalities) * num_tokens]``.
        generator: random source; pass the same seed on every rank under DDP (one mask per global batch).
    """
    m = len(modalities)
    if m == 0:
        raise ValueError('generate_masks needs at least one modality')
    if not 1 <= num_encoded_tokens <= m * num_tokens:
        raise ValueError(f'num_encoded_tokens must be in [1, {m * num_tokens}] for {m} modalities of {num_tokens} '
                         f'tokens, got {num_encoded_tokens}')
    budget = (dirichlet_shares(m, generator, device) * num_encoded_tokens).round().long().clamp(max=num_tokens)
    hidden = torch.ones(m, num_tokens, device=device)
    for i in range(m):
        perm = torch.randperm(num_tokens, generator=generator, device=device)
        hidden[i, perm[:int(budget[i])]] = 0
    hidden = hidden.flatten()
    order = torch.argsort(hidden + torch.rand(hidden.shape, generator=generator, device=device))  # visible first
    final = torch.ones_like(hidden, dtype=torch.bool)
    final[order[:num_encoded_tokens]] = False
    return {name: final[i * num_tokens:(i + 1) * num_tokens] for i, name in enumerate(modalities)}


class ModalityCombinationSampler:
    """Fine-tuning sampler: a random non-empty subset of the available modalities per step, most tokens kept.

    ``x_sub, masks = sampler(x)`` then ``model(x_sub, masks=masks)``: absent modalities are dropped (no tokens,
    no Block_Fusion slot, the upstream inference path) and ``1 - keep_ratio`` of the kept modalities' tokens are
    hidden (their slots hold the mask embedding). The subset is uniform over the non-empty subsets of the
    modalities present in ``x``.

    Args:
        patch_size: the model's patch size (to count tokens).
        keep_ratio: fraction of the subset's tokens kept visible (0.9).
        generator: random source (same seed on every rank under DDP).
    """

    def __init__(self, patch_size: int = 16, keep_ratio: float = 0.9,
                 generator: Optional[torch.Generator] = None) -> None:
        if not 0 < keep_ratio <= 1:
            raise ValueError(f'keep_ratio must be in (0, 1], got {keep_ratio}')
        self.patch_size = patch_size
        self.keep_ratio = keep_ratio
        self.generator = generator

    def __call__(self, x: Mapping[str, Optional[torch.Tensor]]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        avail = [m for m, t in x.items() if t is not None]
        if not avail:
            raise InvalidInputError('the sampler needs at least one modality in the input')
        while True:  # uniform over the non-empty subsets
            keep = torch.rand(len(avail), generator=self.generator) < 0.5
            if keep.any():
                break
        subset = [m for m, k in zip(avail, keep.tolist()) if k]
        h, w = x[subset[0]].shape[-2:]
        n = (h // self.patch_size) * (w // self.patch_size)
        encoded = max(1, int(round(self.keep_ratio * len(subset) * n)))
        masks = generate_masks(subset, n, encoded, self.generator)
        return {m: x[m] for m in subset}, masks


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor, patch_size: int,
                      kind: str = 'mse') -> torch.Tensor:
    """Mean over the hidden patches of the per-patch mean squared (``mse``) or absolute (``l1``) error."""
    err = patchify(pred.float(), patch_size) - patchify(target.float(), patch_size)
    err = err.square() if kind == 'mse' else err.abs()
    return err.mean(dim=-1)[:, hidden].mean()


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, student_temperature: float = 0.1,
              teacher_temperature: float = 0.04) -> torch.Tensor:
    """DINO-style cross-entropy between L2-normalised vectors (teacher side without gradient), batch mean."""
    s = F.normalize(student.float(), dim=-1) / student_temperature
    t = F.softmax(F.normalize(teacher.float(), dim=-1).detach() / teacher_temperature, dim=-1)
    return -(t * F.log_softmax(s, dim=-1)).sum(dim=-1).mean()


class SpatialDecoder(nn.Module):
    """Shallow per-modality decoder from the final-normed fusion tokens to the modality's pixels."""

    def __init__(self, embed_dim: int, out_chans: int, patch_size: int = 16, dim: int = 256, depth: int = 2,
                 num_heads: int = 8, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.out_chans = out_chans
        self.proj_context = nn.Linear(embed_dim, dim)
        self.task_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(depth)])
        self.out_proj = nn.Linear(dim, out_chans * patch_size * patch_size)
        nn.init.trunc_normal_(self.task_embedding, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """(B, N, D) fusion tokens -> (B, C, grid_h * p, grid_w * p)."""
        x = self.proj_context(tokens) + self.task_embedding
        for blk in self.blocks:
            x = blk(x)
        x = self.out_proj(x)  # (B, N, C * p * p)
        b, p, (gh, gw) = x.shape[0], self.patch_size, grid
        x = x.reshape(b, gh, gw, self.out_chans, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, self.out_chans, gh * p, gw * p)


class FusionMAEOutput(NamedTuple):
    """What :meth:`FusionMAE.forward` returns.

    Attributes:
        loss: total loss (reconstruction sum + ``contrastive_weight`` x contrastive term).
        recon_losses: modality -> reconstruction loss on its hidden patches (present modalities with hidden tokens).
        contrast_loss: mean DINO-style term over the modalities with visible tokens (0 when none).
        preds: modality -> reconstruction ``(B, C, H, W)`` (every modality of the model, as upstream).
        masks: modality -> ``(N,)`` bool, True = hidden (every modality of the model).
        tokens: the encoder's :class:`~eobackbones.models.fusion_vit.FusionViTTokens` (return tokens of every
            modality, in model order, then FUSION).
        contrast_tokens: modality -> ``(B, D)`` student token ``r_m`` (modalities with visible tokens).
    """
    loss: torch.Tensor
    recon_losses: Dict[str, torch.Tensor]
    contrast_loss: torch.Tensor
    preds: Dict[str, torch.Tensor]
    masks: Dict[str, torch.Tensor]
    tokens: FusionViTTokens
    contrast_tokens: Dict[str, torch.Tensor]


class FusionMAE(nn.Module):
    """Fusion-token ViT encoder + per-modality decoders + contrastive return tokens.

    Args:
        encoder: the :class:`FusionViT` to pretrain (its pyramid and head are unused here).
        decoder_dim, decoder_depth, decoder_heads: decoder shape (256, 2, 8 as the reference).
        num_encoded_tokens: visible tokens per batch when no masks are given (default: half of the present
            modalities' tokens; the reference script's 384 of 768).
        losses: modality -> ``mse`` or ``l1`` (default: ``l1`` for ``dem``, ``mse`` otherwise).
        contrastive_weight: weight of the DINO-style term (0.3).
        student_temperature, teacher_temperature: 0.1 and 0.04.
    """

    def __init__(
            self,
            encoder: FusionViT,
            decoder_dim: int = 256,
            decoder_depth: int = 2,
            decoder_heads: int = 8,
            num_encoded_tokens: Optional[int] = None,
            losses: Optional[Mapping[str, str]] = None,
            contrastive_weight: float = 0.3,
            student_temperature: float = 0.1,
            teacher_temperature: float = 0.04,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoders = nn.ModuleDict({
            m: SpatialDecoder(encoder.embed_dim, c, encoder.patch_size, decoder_dim, decoder_depth, decoder_heads)
            for m, c in encoder.modalities.items()})
        self.contrast_tokens = nn.ParameterDict({
            m: nn.Parameter(torch.zeros(1, 1, encoder.embed_dim)) for m in encoder.modalities})
        for p in self.contrast_tokens.values():
            nn.init.trunc_normal_(p, std=0.02)
        losses = dict(losses or {})
        bad = {m: k for m, k in losses.items() if m not in encoder.modalities or k not in ('mse', 'l1')}
        if bad:
            raise ValueError(f'losses must map modalities {list(encoder.modalities)} to "mse" or "l1", got {bad}')
        self.losses = {m: losses.get(m, 'l1' if m == 'dem' else 'mse') for m in encoder.modalities}
        self.num_encoded_tokens = num_encoded_tokens
        self.contrastive_weight = contrastive_weight
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature

    @classmethod
    def from_chen_checkpoint(
            cls, checkpoint: Union[ChenCheckpoint, Mapping[str, torch.Tensor]], **kwargs: Any) -> 'FusionMAE':
        """Build from an upstream pretraining state dict (or its :func:`convert_chen_state_dict` result).

        The encoder gets a parameter-free pyramid (the pretraining file has no pyramid weights). Decoders and
        contrastive tokens load strictly when the file has them; a file saved without decoders leaves them
        freshly initialised (logged).
        """
        ck = checkpoint if isinstance(checkpoint, ChenCheckpoint) else convert_chen_state_dict(checkpoint)
        if ck.layout != 'pretrain':
            raise CheckpointFormatError(f'a {ck.layout} checkpoint has no pretraining heads; build FusionViT from it '
                                        f'and FusionMAE(encoder) around it')
        encoder = fusionvit_from_chen(ck)
        if not ck.objective:
            model = cls(encoder, **dict(ck.objective_args, **kwargs))
            _logger.info('checkpoint has no decoders / contrastive tokens: they are freshly initialised')
            return model
        with torch.device('meta'):
            model = cls(FusionViT(**dict(ck.model_args, pyramid='interpolate')), **dict(ck.objective_args, **kwargs))
        model.encoder = encoder
        load_state_dict_strict(_Heads(model), ck.objective, source='pretraining heads', assign=True)
        return model

    def _contrast_token(self, fusion: torch.Tensor, index: Optional[torch.Tensor], m: str) -> torch.Tensor:
        enc = self.encoder
        ctx = fusion if index is None else fusion[:, index]
        r = enc.attn_pool(self.contrast_tokens[m].expand(fusion.shape[0], -1, -1), context=ctx)
        return (r + enc.pool_mlp(enc.norm(r)))[:, 0]

    def forward(
            self,
            x: Mapping[str, Optional[torch.Tensor]],
            masks: Optional[Mapping[str, Any]] = None,
            generator: Optional[torch.Generator] = None,
            intermediates: Sequence[int] = (),
    ) -> FusionMAEOutput:
        """One pretraining step's forward.

        Args:
            x: modality -> ``(B, C, H, W)``; absent modalities (missing or ``None``) are fully hidden.
            masks: modality -> ``(N,)`` (or identical-row ``(B, N)``) with 1 / True = hidden; default: drawn by
                :func:`generate_masks` with ``num_encoded_tokens``. Present modalities without a mask are visible.
            generator: random source for the mask draw.
            intermediates: layers whose fusion tokens to keep (``tokens.intermediates``).
        """
        enc = self.encoder
        present = [m for m in enc.modalities if m in x and x[m] is not None]
        images, _, grid = enc._check(x, None)
        n = grid[0] * grid[1]
        device = enc.fusion_tokens.device
        if masks is None:
            encoded = self.num_encoded_tokens or max(1, len(present) * n // 2)
            masks = generate_masks(present, n, encoded, generator)  # on the generator's device (CPU by default)
        full = {}
        for m in enc.modalities:
            if m in present:
                t = masks.get(m)
                full[m] = torch.zeros(n, dtype=torch.bool, device=device) if t is None else torch.as_tensor(t)
            else:
                full[m] = torch.ones(n, dtype=torch.bool, device=device)
        tok = enc.forward_tokens(images, full, intermediates)
        hidden = {m: (full[m][0] if full[m].ndim == 2 else full[m]).bool().to(device) for m in enc.modalities}
        preds = {m: self.decoders[m](tok.fusion, grid) for m in enc.modalities}
        recon = {m: masked_patch_loss(preds[m], images[m], hidden[m], enc.patch_size, self.losses[m])
                 for m in present if hidden[m].any()}
        contrast, terms = {}, []
        for m in enc.modalities:
            idx = tok.visible[m]
            if idx is not None and idx.numel() == 0:
                continue
            contrast[m] = self._contrast_token(tok.fusion, idx, m)
            terms.append(dino_loss(contrast[m], tok.return_token(m), self.student_temperature,
                                   self.teacher_temperature))
        c_loss = torch.stack(terms).mean() if terms else tok.fusion.new_zeros(())
        r_loss = sum(recon.values()) if recon else tok.fusion.new_zeros(())
        loss = r_loss + self.contrastive_weight * c_loss
        return FusionMAEOutput(loss, recon, c_loss, preds, hidden, tok, contrast)


class _Heads(nn.Module):
    """The pretraining heads of a :class:`FusionMAE` (everything but ``encoder.``), for strict loading."""

    def __init__(self, model: FusionMAE) -> None:
        super().__init__()
        self.decoders = model.decoders
        self.contrast_tokens = model.contrast_tokens

"""DDPM pretraining objective and ancestral sampler for the diffusion UNet encoders.

Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020 (arXiv:2006.11239), as
lit-diffusion's ``LitDDPM`` implements it for ssl-ddpm-rs (Lontke et al., IGARSS 2024):

- linear beta schedule 1e-4 .. 0.02 over 1000 steps (:func:`eobackbones.models.diffusion_unet.diffusion_schedule`,
  bit-identical to lit-diffusion's buffers);
- ``x_t = q_sample(x0, t, eps) = sqrt(acp_t) x0 + sqrt(1 - acp_t) eps`` with ``t`` uniform in ``[0, T)``;
- loss: mean squared error between the UNet's output and ``eps`` (lit-diffusion averages per sample, then over
  the batch with the uniform sampler's unit weights: the plain mean);
- sampling: ``x0_hat = sqrt(1 / acp_t) x_t - sqrt(1 / acp_t - 1) eps_hat`` (optionally clipped to [-1, 1]),
  posterior mean ``coef1_t x0_hat + coef2_t x_t``, log variance ``posterior_log_variance_clipped``, no noise at
  ``t = 0`` (lit-diffusion ``p_mean_variance`` / ``p_sample`` / ``p_sample_loop``).

:class:`DDPMObjective` wraps a :class:`~eobackbones.models.diffusion_unet.DiffusionEncoder` (conditional or not)
into one module whose ``forward`` returns the loss, ready for ``DistributedDataParallel``.
"""
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.diffusion_unet import DiffusionEncoder, diffusion_schedule

__all__ = ['GaussianDiffusion', 'DDPMObjective']

ModelFn = Callable[..., torch.Tensor]


def _extract(buf: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return buf.to(x.device).gather(0, t.to(x.device)).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def _randn(shape: Sequence[int], like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    if generator is None:
        return torch.randn(shape, device=like.device, dtype=like.dtype)
    # draw on the generator's device (CPU generators give device-independent numbers)
    return torch.randn(shape, generator=generator, device=generator.device).to(like.device, like.dtype)


class GaussianDiffusion(nn.Module):
    """The forward process, the epsilon-prediction loss and the ancestral sampler (schedule as non-persistent buffers).

    ``model`` arguments are callables ``model(x_t, t, **model_kwargs) -> eps`` with integer ``t``, e.g.
    ``encoder.unet`` or ``encoder.denoise`` (which embeds a raw ``context=``).
    """

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        super().__init__()
        self.num_timesteps = int(num_timesteps)
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        for name, t in diffusion_schedule(self.num_timesteps, self.beta_start, self.beta_end).items():
            self.register_buffer(name, t, persistent=False)

    @classmethod
    def from_encoder(cls, encoder: DiffusionEncoder) -> 'GaussianDiffusion':
        """The schedule an encoder was built with."""
        return cls(encoder.num_timesteps, encoder.beta_start, encoder.beta_end)

    def sample_timesteps(self, batch: int, device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``t`` uniform in ``[0, T)`` (lit-diffusion's ``UniformSampler``), int64."""
        gdev = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gdev).to(device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (_extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def loss(
            self,
            model: ModelFn,
            x0: torch.Tensor,
            t: Optional[torch.Tensor] = None,
            noise: Optional[torch.Tensor] = None,
            generator: Optional[torch.Generator] = None,
            **model_kwargs: Any,
    ) -> torch.Tensor:
        """Epsilon-prediction MSE (mean over all elements) at ``t`` (default: uniform) with ``noise`` (default: N(0, 1)).

        Args:
            model: ``model(x_t, t, **model_kwargs) -> eps``.
            x0: clean inputs, already normalised to [-1, 1] and sized for the UNet.
            t: (B,) integer timesteps.
            noise: like ``x0``.
            generator: RNG for ``t`` and ``noise`` when they are drawn here.
        """
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = _randn(x0.shape, x0, generator)
        eps = model(self.q_sample(x0, t, noise), t, **model_kwargs)
        return F.mse_loss(eps.float(), noise.float())

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - _extract(self.sqrt_recip_m1_alphas_cumprod, t, x_t) * eps)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of ``q(x_{t-1} | x_t, x_0)``."""
        mean = _extract(self.posterior_mean_coef1, t, x_t) * x0 + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _extract(self.posterior_variance, t, x_t), _extract(self.posterior_log_variance_clipped, t, x_t)

    def p_mean_variance(self, model: ModelFn, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False,
                        **model_kwargs: Any) -> Dict[str, torch.Tensor]:
        """``p(x_{t-1} | x_t)`` from the model's eps: ``mean``, ``variance``, ``log_variance``, ``pred_x0``."""
        pred_x0 = self.predict_x0(x_t, t, model(x_t, t, **model_kwargs))
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, var, log_var = self.q_posterior(pred_x0, x_t, t)
        return dict(mean=mean, variance=var, log_variance=log_var, pred_x0=pred_x0)

    @torch.no_grad()
    def p_sample(self, model: ModelFn, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False,
                 generator: Optional[torch.Generator] = None, **model_kwargs: Any) -> torch.Tensor:
        """One ancestral step ``x_t -> x_{t-1}`` (no noise where ``t == 0``)."""
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, **model_kwargs)
        noise = _randn(x_t.shape, x_t, generator)
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return out['mean'] + nonzero * torch.exp(0.5 * out['log_variance']) * noise

    @torch.no_grad()
    def p_sample_loop(
            self,
            model: ModelFn,
            shape: Sequence[int],
            x_t: Optional[torch.Tensor] = None,
            start_step: Optional[int] = None,
            clip_denoised: bool = False,
            generator: Optional[torch.Generator] = None,
            device: Optional[torch.device] = None,
            progress: bool = False,
            **model_kwargs: Any,
    ) -> torch.Tensor:
        """Ancestral sampling from ``start_step`` (default ``T - 1``) down to 0.

        Args:
            model: ``model(x_t, t, **model_kwargs) -> eps``.
            shape: (B, C, H, W) of the samples (ignored when ``x_t`` is given).
            x_t: starting point at ``start_step`` (default: standard normal noise, as at ``T - 1``).
            start_step: first timestep; fewer steps give a partial denoising (tests, SDEdit-style use).
            clip_denoised: clip the predicted ``x0`` to [-1, 1] (upstream sampling configs: False).
            generator: RNG of the starting noise and of every step.
            device: device of the samples when ``x_t`` is not given.
            progress: show a tqdm bar.
        """
        start = self.num_timesteps - 1 if start_step is None else int(start_step)
        if not 0 <= start < self.num_timesteps:
            raise ValueError(f'start_step must be in [0, {self.num_timesteps - 1}], got {start}')
        if x_t is None:
            ref = torch.empty(0, device=device or self.betas.device)
            x_t = _randn(tuple(shape), ref, generator)
        steps = range(start, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc='DDPM sampling', total=start + 1)
        for step in steps:
            t = torch.full((x_t.shape[0],), step, dtype=torch.long, device=x_t.device)
            x_t = self.p_sample(model, x_t, t, clip_denoised=clip_denoised, generator=generator, **model_kwargs)
        return x_t


class DDPMObjective(nn.Module):
    """DDPM training of a :class:`DiffusionEncoder`: ``forward(x, context=None) -> loss``.

    ``x`` is what the encoder takes (``{'s2', 's1'}`` dict or the stacked tensor, normalised to [-1, 1]); it is
    zero-padded to the UNet's size multiple exactly as the feature path pads. The conditional model gets the 12
    raw context scalars (embedded on every call, so the embedder trains with the UNet). Wrap this module in
    ``DistributedDataParallel``: every parameter is on the loss path.
    """

    def __init__(self, encoder: DiffusionEncoder):
        super().__init__()
        if encoder.num_classes:
            raise ValueError('DDPM pretraining takes an encoder without classifier (num_classes=0): its decoder is '
                             f'frozen while a classifier is attached, got num_classes={encoder.num_classes}')
        self.encoder = encoder
        self.diffusion = GaussianDiffusion.from_encoder(encoder)

    def prepare(self, x: Any) -> torch.Tensor:
        """Stacked, padded ``x0`` (shape checks only; :meth:`forward` validates the whole call)."""
        x0, _ = self.encoder.pad_input(self.encoder.stack_input(x))
        return x0

    def forward(self, x: Any, context: Any = None, t: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The epsilon-prediction loss of a batch; ``x`` and ``context`` are validated as the encoder validates its
        inputs (:meth:`DiffusionEncoder.check_call`: keys, channels, dtype, finite values, the context)."""
        x0, context, _, _ = self.encoder.check_call(x, context)
        x0, _ = self.encoder.pad_input(x0)
        kwargs = {'context': context} if self.encoder.conditional else {}
        return self.diffusion.loss(self.encoder.denoise, x0, t=t, noise=noise, generator=generator, **kwargs)

    @torch.no_grad()
    def sample(self, shape: Sequence[int], context: Any = None, **kwargs: Any) -> torch.Tensor:
        """Samples ``(B, C, H, W)`` in the normalised [-1, 1] space (see :meth:`GaussianDiffusion.p_sample_loop`)."""
        kwargs.setdefault('device', next(self.encoder.parameters()).device)
        if self.encoder.conditional:
            # embed once: the context token is the same at every step
            ctx = self.encoder.embed_context(context, shape[0])
            return self.diffusion.p_sample_loop(self.encoder.unet, shape, context=ctx, **kwargs)
        self.encoder.embed_context(context)  # raises if a context was given to an unconditional model
        return self.diffusion.p_sample_loop(self.encoder.unet, shape, **kwargs)

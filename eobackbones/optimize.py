"""Inference fast path: ``optimize_for_inference(model)`` -> a frozen copy in the best precision the device computes.

What it does (each step keeps pooled features within cosine 0.9999 of float32 on every registered model,
checked by ``tests/test_optimize.py``):

- eval mode, ``requires_grad`` off, ``torch.inference_mode`` and autocast in the compute dtype around every
  call (models are autocast-safe by contract; with the weights already low-precision, autocast only brings
  float32 tensors a model computes on purpose, e.g. timestep embeddings, to the layers' dtype);
- fused attention (``F.scaled_dot_product_attention``) in every timm attention layer;
- low-precision *weights* (bf16 / fp16) rather than autocast, so no per-call weight casts. What is never
  rounded: parameters of modules that declare ``keep_fp32 = True`` (DOFA's wavelength hypernetwork, which
  casts its generated kernel itself), parameters and statistics of normalisation layers (BatchNorm, LayerNorm,
  GroupNorm: their kernels take bf16 / fp16 input with float32 parameters on CPU and CUDA, which is how
  autocast runs them too, and float32-on-purpose layers such as GroupNorm32 keep working), and every floating buffer
  whose values the low precision cannot hold exactly (DOFA's bound wavelengths, timestep frequency tables).
  Buffers that survive the round trip bit-exactly (Swin's 0 / -100 attention masks) are cast so they do not
  promote activations back to float32;
- channels-last memory format for models with 2-D convolutions (``channels_last=None`` decides: oneDNN and
  cuDNN run bf16 / fp16 convolutions in NHWC; on CPU this is the largest single gain for the ResNets);
- on CPU with bf16 weights, every ``nn.Linear`` runs through oneDNN's linear with the bias in the kernel's
  epilogue, and timm ``Mlp`` blocks with exact GELU run ``fc1`` + bias + GELU as one kernel
  (``torch.ops.mkldnn._linear_pointwise``, weights reordered once into oneDNN's blocked layout, which costs a
  second copy of the linear weights in memory): no separate pass for the bias broadcast (PyTorch's ``addmm``
  writes it into the output first) nor for GELU over the widest activation of every transformer block.
  Done by swapping the class of existing modules (same parameters, same state-dict keys); eager only: with
  ``compile=True`` Inductor does its own fusions;
- optionally ``torch.compile`` of ``forward_features`` with Inductor's weight freezing (``compile=True``).

Inputs: floating tensors passed positionally (a tensor or a dict of tensors) and the keyword conditions the
model's ``input_spec`` declares (``conditions``: data such as a ``context`` vector) are cast to the compute
dtype; other keyword arguments (call arguments such as a ``timestep``, DOFA's ``wavelengths``) pass unchanged,
never rounded. Outputs are returned as float32.
The precision rule (``auto``) is :mod:`eobackbones.precision`'s.
"""
import copy
import logging
from typing import Any, Literal, Optional

import torch
from timm.layers import Mlp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .precision import autocast, resolve_precision

__all__ = ['optimize_for_inference', 'InferenceModel', 'FusedGeluMlp', 'PointwiseLinear', 'cast_for_inference']

_logger = logging.getLogger(__name__)


def _cast(obj: Any, dtype: torch.dtype, channels_last: bool = False) -> Any:
    if isinstance(obj, torch.Tensor) and obj.is_floating_point():
        obj = obj.to(dtype)
        if channels_last and obj.ndim == 4:
            obj = obj.contiguous(memory_format=torch.channels_last)
        return obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(o, dtype, channels_last) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype, channels_last) for k, v in obj.items()}
    return obj


def _to_float(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) and obj.is_floating_point() and obj.dtype != torch.float32:
        return obj.float()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_float(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_float(v) for k, v in obj.items()}
    return obj


class InferenceModel(nn.Module):
    """A frozen model running in ``dtype``; ``forward`` / ``forward_features`` / ``forward_head`` /
    ``forward_intermediates`` take float32 (or any float) inputs and return float32.

    Floating inputs are cast to ``dtype``: the positional input (a tensor or a dict of modality tensors) and
    the keyword arguments the model's ``input_spec`` declares as *conditions* (data such as a normalised
    ``context`` vector). Every other keyword argument (call arguments such as a diffusion ``timestep``, DOFA's
    ``wavelengths``, seeds) passes unchanged, so it is never rounded. Calls run under autocast in ``dtype``
    (models are autocast-safe by contract): tensors a model computes in float32 on purpose (a timestep
    embedding from a float32 frequency table) meet the low-precision layers as they do in mixed precision,
    while the weights are already in ``dtype``, so autocast casts no weight per call.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, channels_last: bool = False,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.channels_last = channels_last
        self._autocast = autocast(device or torch.device('cpu'), dtype)
        self.input_spec = getattr(model, 'input_spec', None)
        self.pretrained_cfg = getattr(model, 'pretrained_cfg', None)
        self._conditions = frozenset(c.name for c in getattr(self.input_spec, 'conditions', None) or ())

    def _run(self, fn, *args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(), self._autocast():
            args = tuple(_cast(a, self.dtype, self.channels_last) for a in args)
            kwargs = {k: _cast(v, self.dtype) if k in self._conditions else v for k, v in kwargs.items()}
            return _to_float(fn(*args, **kwargs))

    def forward(self, x: Any, **kwargs: Any) -> Any:
        return self._run(self.model, x, **kwargs)

    def forward_features(self, x: Any, **kwargs: Any) -> Any:
        return self._run(self.model.forward_features, x, **kwargs)

    def forward_head(self, x: Any, pre_logits: bool = False) -> Any:
        with torch.inference_mode(), self._autocast():  # features come back as float32: into the head in dtype
            return _to_float(self.model.forward_head(_cast(x, self.dtype), pre_logits=pre_logits))

    def forward_intermediates(self, x: Any, **kwargs: Any) -> Any:
        return self._run(self.model.forward_intermediates, x, **kwargs)

    def extra_repr(self) -> str:
        return f'dtype={self.dtype}, channels_last={self.channels_last}'


class PointwiseLinear(nn.Linear):
    """``nn.Linear`` through oneDNN's linear with the bias in the kernel (``torch.ops.mkldnn._linear_pointwise``).

    PyTorch's CPU ``addmm`` first broadcasts the bias into the output and then accumulates the product into it,
    one extra pass over every linear's output; here the bias is added in the GEMM's epilogue, and the weight is
    reordered once into oneDNN's blocked layout (on the first call, again if the weight changes; the reordered
    copy is not part of the state dict and is dropped by ``deepcopy`` / pickling). Same parameters and
    state-dict keys as ``nn.Linear``: optimize_for_inference swaps the class of existing modules in place.
    """

    def packed_weight(self) -> torch.Tensor:
        """The weight in oneDNN's blocked layout, reordered once per weight version."""
        w = self.weight
        key = (w.data_ptr(), w.dtype, 0 if w.is_inference() else w._version)
        cache = self.__dict__.get('_packed')
        if cache is None or cache[0] != key:
            cache = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach()))
            self.__dict__['_packed'] = cache
        return cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # oneDNN wants one dtype (a float32 tensor a model computes on purpose meets a bf16 layer: cast as autocast)
        x = x.to(self.weight.dtype).contiguous()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight(), self.bias, 'none', [], '')

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop('_packed', None)  # an opaque oneDNN tensor: neither copyable nor picklable, and cheap to redo
        return state


class FusedGeluMlp(Mlp):
    """timm ``Mlp`` (``fc1`` -> exact GELU -> ``fc2``) with ``fc1`` + bias + GELU as one oneDNN kernel (CPU).

    Swapped in as the class of an existing ``Mlp`` (same attributes and state-dict keys), see
    :func:`optimize_for_inference`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1 = self.fc1
        w = fc1.packed_weight() if isinstance(fc1, PointwiseLinear) else fc1.weight
        x = torch.ops.mkldnn._linear_pointwise(x.to(w.dtype).contiguous(), w, fc1.bias, 'gelu', [], 'none')
        return self.fc2(x)


def _fusable_gelu_mlp(mod: nn.Module) -> bool:
    return (type(mod) is Mlp and isinstance(mod.fc1, nn.Linear) and isinstance(mod.fc2, nn.Linear)
            and type(mod.act) is nn.GELU and mod.act.approximate == 'none' and isinstance(mod.norm, nn.Identity)
            and all(isinstance(d, (nn.Identity, nn.Dropout)) for d in (mod.drop1, mod.drop2)))


def _use_onednn_linear(device: torch.device, dtype: torch.dtype) -> bool:
    # measured on CPUs with AMX / AVX512-BF16 (bf16 weights): GELU over (B * N, 4 D) costs 10-50 % of fc1 on its
    # own, and addmm's bias broadcast 10-30 % of a linear; both vanish in oneDNN's epilogue; the reordered
    # (prepacked) weights gained another 5-9 % on DOFA-base
    return (device.type == 'cpu' and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, '_linear_pointwise'))


def _swap_modules(model: nn.Module, device: torch.device, dtype: torch.dtype) -> int:
    """Give modules faster forwards for ``device`` / ``dtype`` (class swap: same parameters and keys).

    Returns the number of modules changed.
    """
    if not _use_onednn_linear(device, dtype):
        return 0
    n = 0
    for mod in model.modules():
        if _fusable_gelu_mlp(mod):
            mod.__class__ = FusedGeluMlp
            n += 1
    for mod in model.modules():
        if type(mod) is nn.Linear and mod.bias is not None and mod.weight.dtype == dtype:
            mod.__class__ = PointwiseLinear
            n += 1
    return n


# normalisation layers keep float32 parameters: their kernels take bf16 / fp16 input with float32 parameters on
# CPU and CUDA (as under autocast), statistics are never rounded, and layers that compute in float32 on purpose
# (OpenAI's GroupNorm32: x.float()) find float32 parameters
_FP32_NORMS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _exact_in(t: torch.Tensor, dtype: torch.dtype) -> bool:
    low = t.to(dtype)
    return bool(torch.equal(low.to(t.dtype), t))


def cast_for_inference(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model`` in place to ``dtype`` by the rules in the module docstring (parameters, exact buffers)."""
    if dtype == torch.float32:
        return
    keep = set()
    for m in model.modules():
        if getattr(m, 'keep_fp32', False) or isinstance(m, _FP32_NORMS):
            keep.update(id(t) for t in m.parameters())
            keep.update(id(t) for t in m.buffers())
    for p in model.parameters():
        if id(p) not in keep and p.is_floating_point():
            p.data = p.data.to(dtype)
    for mod in model.modules():
        for name, b in list(mod._buffers.items()):
            if b is None or id(b) in keep or not b.is_floating_point() or b.dtype == dtype:
                continue
            if _exact_in(b, dtype):
                mod._buffers[name] = b.to(dtype)


def _has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def optimize_for_inference(
        model: nn.Module,
        precision: Literal['auto', 'fp32', 'bf16', 'fp16'] = 'auto',
        compile: bool = False,
        copy_model: bool = True,
        channels_last: Optional[bool] = None,
) -> InferenceModel:
    """A fast, frozen copy of ``model`` for inference.

    Args:
        model: an eobackbones model (or any module with timm-style forward methods).
        precision: ``auto`` (bf16 where the device computes it natively, else fp32; see
            :mod:`eobackbones.precision`) or an explicit ``fp32`` / ``bf16`` / ``fp16``.
        compile: ``torch.compile`` ``forward_features`` with weight freezing (compiles on the first call, and
            again per new input shape or wavelength set).
        copy_model: work on a deep copy (the original stays as it was: trainable, float32).
        channels_last: NHWC weights and inputs; None: on for models with 2-D convolutions.

    Returns:
        :class:`InferenceModel` with ``.dtype`` the precision in use.

    Raises:
        ValueError: an unknown precision, or fp16 on a device other than CUDA.
    """
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device('cpu')
    dtype = resolve_precision(precision, device)
    m = copy.deepcopy(model) if copy_model else model
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    for mod in m.modules():
        if hasattr(mod, 'fused_attn'):
            mod.fused_attn = True
    cast_for_inference(m, dtype)
    # Inductor fuses these itself, and its weight freezing needs the plain modules (graph-constant weights)
    swapped = 0 if compile else _swap_modules(m, device, dtype)
    if channels_last is None:
        channels_last = _has_conv2d(m)
    if channels_last:
        m.to(memory_format=torch.channels_last)
    if compile:
        # freezing turns weights into constants so Inductor can pre-pack them (needs inference mode, which
        # InferenceModel always uses); the model is frozen here anyway
        m.forward_features = torch.compile(m.forward_features, options={'freezing': True})
    _logger.info('optimize_for_inference: %s on %s, channels_last=%s, %d modules swapped', dtype, device,
                 channels_last, swapped)
    return InferenceModel(m, dtype, channels_last, device)

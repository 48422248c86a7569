"""Input-channel adaptation of fixed-band models by band name (``create_model(name, pretrained=True, bands=[...])``).

A family declares which weights index input channels: ``input_convs = {modality: ((state-dict key, dim), ...)}``
(``None`` for the single modality of a tensor-input model; several modalities naming one key are stacked in the
spec's modality order, as the diffusion UNet's input conv; a third element ``'out'`` marks weights whose rows
*produce* one value per band, as the diffusion UNet's noise-prediction conv: copied, never scaled) and how to build
the model for other channel counts: ``args_for_channels({modality: n}, args) -> constructor kwargs`` (``args``: the
constructor arguments before the change).

Rules (by band identity, never by position):

* a band the weights saw keeps its filter (a subset or a permutation of the bands gives exactly the pretrained
  model on those bands);
* a band the weights never saw gets the filter of the spectrally nearest pretrained band (centre wavelength from the
  sensor catalogue, nearest in log-wavelength); a source filter used by k bands is scaled by 1/k in each copy, so
  activations keep their magnitude;
* a band without a centre wavelength (elevation, class maps) cannot be matched: an error.

The report (logged, kept as ``model.band_adaptation`` and written into ``config.json``) lists every band and where
its filter came from. Without band names (``in_chans=`` only) timm's count-based rule (``adapt_input_conv``) is the
fallback, with a warning.
"""
import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from ..errors import UnknownBandError
from ..sensors import resolve_band
from ..spec import InputSpec

__all__ = ['band_plan', 'adapt_state_dict_by_name', 'adapt_state_dict_by_count', 'normalise_bands']

_logger = logging.getLogger(__name__)


def normalise_bands(spec: InputSpec, bands: Any) -> Dict[str, Tuple[str, ...]]:
    """``bands=`` as ``{modality: names}``: a list means the model's only modality."""
    if isinstance(bands, Mapping):
        unknown = [k for k in bands if k not in spec.modality_names]
        if unknown:
            raise UnknownBandError(f'bands= names modalities {unknown}; the model has {list(spec.modality_names)}')
        return {k: tuple(v) for k, v in bands.items()}
    if isinstance(bands, str) or not isinstance(bands, Sequence):
        raise UnknownBandError(f'bands must be a list of band names (or a dict per modality), got {bands!r}')
    if len(spec.modalities) != 1:
        raise UnknownBandError(f'this model takes {list(spec.modality_names)}: give bands= as a dict per modality')
    return {spec.modalities[0].name: tuple(bands)}


def _qualified(spec: InputSpec, modality: str, names: Sequence[str]) -> List[str]:
    m = spec.modality(modality)
    sensor = m.sensor if m.sensor not in ('any', 'unknown', '') else None
    out = []
    for b in names:
        band = resolve_band(b, None if ':' in b else sensor) if sensor and ':' not in b else resolve_band(b)
        out.append(band.qualified_name)
    return out


def _wavelength(qualified: str) -> Optional[float]:
    return resolve_band(qualified).wavelength_um


def band_plan(spec: InputSpec, new: Mapping[str, Sequence[str]]) -> Dict[str, List[Dict[str, Any]]]:
    """For every modality (changed or not), where each new band's filter comes from (by qualified band name)."""
    plan: Dict[str, List[Dict[str, Any]]] = {}
    for m in spec.modalities:
        old_q = [m.qualified(b) for b in m.bands]
        names = list(new.get(m.name, m.bands))
        new_q = _qualified(spec, m.name, names) if m.name in new else old_q
        dup = sorted({b for b in new_q if new_q.count(b) > 1})
        if dup:
            raise UnknownBandError(f'{m.name}: duplicate bands {dup} in bands=')
        rows = []
        for name, q in zip(names, new_q):
            if q in old_q:
                rows.append(dict(band=name, qualified=q, source=m.bands[old_q.index(q)], how='pretrained filter'))
                continue
            w = _wavelength(q)
            if w is None:
                raise UnknownBandError(f'{m.name}: band {name} has no centre wavelength, so no pretrained filter can stand '
                                       f'in for it; pass in_chans= for a count-only adaptation')
            cands = [(abs(math.log(w / _wavelength(o))), i) for i, o in enumerate(old_q) if _wavelength(o)]
            if not cands:
                raise UnknownBandError(f'{m.name}: the pretrained bands {list(m.bands)} have no wavelengths to match {name}')
            _, i = min(cands)
            rows.append(dict(band=name, qualified=q, source=m.bands[i], how=f'nearest wavelength ({w:g} um <- '
                                                                f'{_wavelength(old_q[i]):g} um)'))
        counts: Dict[str, int] = {}
        for r in rows:
            counts[r['source']] = counts.get(r['source'], 0) + 1
        for r in rows:
            r['scale'] = 1.0 / counts[r['source']]
        plan[m.name] = rows
    return plan


Conv = Tuple[Any, ...]  # (state-dict key, dim) or (key, dim, 'out')


def _layout(spec: InputSpec, input_convs: Mapping[Optional[str], Sequence[Conv]]) -> Dict[Tuple[str, int, bool], List[str]]:
    """(key, dim, is_output) -> the modalities whose channels it holds, in the spec's order (stacked inputs)."""
    out: Dict[Tuple[str, int, bool], List[str]] = {}
    for m in spec.modalities:
        convs = input_convs.get(m.name) or (input_convs.get(None, ()) if len(spec.modalities) == 1 else ())
        for conv in convs:
            key, dim = conv[0], conv[1]
            out.setdefault((key, dim, len(conv) > 2 and conv[2] == 'out'), []).append(m.name)
    return out


def adapt_state_dict_by_name(state_dict: Dict[str, torch.Tensor], spec: InputSpec,
                             input_convs: Mapping[Optional[str], Sequence[Conv]],
                             plan: Mapping[str, List[Dict[str, Any]]]) -> Dict[str, torch.Tensor]:
    """The pretrained tensors re-indexed along their channel dim by ``plan`` (see :func:`band_plan`)."""
    sd = dict(state_dict)
    for (key, dim, is_out), mods in _layout(spec, input_convs).items():
        if key not in sd:
            continue
        w = sd[key]
        parts, offset = [], 0
        for m in mods:
            old = list(spec.modality(m).bands)
            for r in plan[m]:
                idx = offset + old.index(r['source'])
                parts.append(w.narrow(dim, idx, 1) * (1.0 if is_out else r['scale']))
            offset += len(old)
        if offset != w.shape[dim]:
            raise UnknownBandError(f'{key}: {w.shape[dim]} channels in the weights but the spec lists {offset} bands')
        sd[key] = torch.cat(parts, dim=dim).contiguous()
    return sd


def _repeat_channels(w: torch.Tensor, n: int, dim: int = 1, scale: bool = True) -> torch.Tensor:
    """timm's ``adapt_input_conv`` rule for any pretrained channel count (timm < 1.0.20 assumes 3): one channel sums
    the filters, more repeat them cyclically scaled by ``old / n`` (activations keep their magnitude). Output rows
    (``scale=False``) are repeated or truncated unscaled."""
    old = w.shape[dim]
    wf = w.float().movedim(dim, 0)
    if n == 1 and scale:
        out = wf.sum(dim=0, keepdim=True)
    else:
        out = wf.repeat(math.ceil(n / old), *([1] * (wf.ndim - 1)))[:n] * ((old / n) if scale else 1.0)
    return out.movedim(0, dim).to(w.dtype).contiguous()


def adapt_state_dict_by_count(state_dict: Dict[str, torch.Tensor], spec: InputSpec,
                              input_convs: Mapping[Optional[str], Sequence[Conv]],
                              counts: Mapping[str, int]) -> Dict[str, torch.Tensor]:
    """timm's count-only ``adapt_input_conv`` (band identities unknown: repeated / summed filters)."""
    sd = dict(state_dict)
    for (key, dim, is_out), mods in _layout(spec, input_convs).items():
        if key not in sd or len(mods) != 1:
            continue
        n = counts.get(mods[0])
        if n is not None and n != sd[key].shape[dim]:
            _logger.warning('%s: adapting %d pretrained channels to %d by count (band names unknown; pass bands= to '
                            'map filters by band identity)', key, sd[key].shape[dim], n)
            sd[key] = _repeat_channels(sd[key], n, dim, scale=not is_out)
    return sd

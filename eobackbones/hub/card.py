"""Model cards (``README.md``) for saved, converted and pushed model directories, built from the cfg and input spec.

Follows the Hub's conventions for timm-style models: YAML front matter (``library_name``, ``license``, ``tags``,
``pipeline_tag``), then model details, the input table (modality, band, wavelength, unit, normalisation step by
step), usage and citation. One writer for ``save_pretrained``, ``eobackbones convert`` and ``push-to-hub``.
"""
import json
from typing import Any, Dict, Optional, Sequence

from ..cfg import PretrainedCfg, Provenance
from ..spec import InputSpec

__all__ = ['model_card']

_HF_LICENSES = {'MIT': 'mit', 'Apache-2.0': 'apache-2.0', 'BSD-2-Clause': 'bsd-2-clause', 'BSD-3-Clause': 'bsd-3-clause',
                'CC-BY-4.0': 'cc-by-4.0', 'CC-BY-SA-4.0': 'cc-by-sa-4.0', 'CC-BY-NC-4.0': 'cc-by-nc-4.0',
                'CC-BY-NC-SA-4.0': 'cc-by-nc-sa-4.0', 'CC0-1.0': 'cc0-1.0', 'CDLA-Permissive-1.0': 'cdla-permissive-1.0',
                'CDLA-Permissive-2.0': 'cdla-permissive-2.0', 'GPL-3.0-only': 'gpl-3.0'}


def _step(s: Dict[str, Any]) -> str:
    args = ', '.join(f'{k}={json.dumps(v)}' for k, v in s.items() if k != 'op')
    return f'{s["op"]}({args})'


def _paper_link(paper: Optional[str]) -> str:
    if not paper:
        return ''
    if paper.startswith('arXiv:'):
        return f'[{paper}](https://arxiv.org/abs/{paper[6:]})'
    if paper.startswith('doi:'):
        return f'[{paper}](https://doi.org/{paper[4:]})'
    return paper


def _input_table(spec: InputSpec) -> str:
    rows = ['| modality | band | wavelength (um) | unit | normalisation, in order |', '|---|---|---:|---|---|']
    for m in spec.modalities:
        wl = m.wavelengths_um or (None,) * m.in_chans
        for i, (b, w) in enumerate(zip(m.bands, wl)):
            steps = []
            for s in m.normalization:
                d = {k: (v[i] if isinstance(v, (list, tuple)) and k != 'out' else v) for k, v in s.items()}
                steps.append(_step(d))
            rows.append(f'| {m.name} ({m.sensor}) | {b} | {"" if w is None else f"{w:g}"} | {m.unit} | '
                        f'{"; ".join(steps) or "none stated"} |')
    lines = ['\n'.join(rows), '']
    for m in spec.modalities:
        size = f'{m.image_size[0]}x{m.image_size[1]}'
        extra = [f'native size {size}']
        if m.fixed_size:
            extra.append('fixed size')
        elif m.size_multiple > 1:
            extra.append(f'H, W multiples of {m.size_multiple}')
        if m.gsd_m:
            extra.append(f'GSD {m.gsd_m:g} m')
        if m.processing_level:
            extra.append(m.processing_level)
        if m.any_bands:
            extra.append('any band set (wavelength-conditioned): pass `bands=` or `wavelengths=`')
        lines.append(f'- `{m.name}`: ' + ', '.join(extra) + (f'. {m.notes}' if m.notes else ''))
    for c in spec.conditions:
        steps = '; '.join(_step(s) for s in c.normalization) or 'none stated'
        lines.append(f'- conditioning input `{c.name}=` ({len(c.features)} values: {", ".join(c.features)}), unit '
                     f'{c.unit}, normalisation {steps}{"" if c.required else " (optional)"}. {c.notes}'.rstrip())
    for a in spec.call_args:
        lines.append(f'- call argument `{a.name}={a.default!r}`: {a.description}')
    if spec.input_format == 'dict':
        lines.append(f'- input: a dict keyed by {", ".join(f"`{n}`" for n in spec.modality_names)}; '
                     f'missing modality policy `{spec.missing_modality}`')
    return '\n'.join(lines)


def model_card(
        architecture: str,
        spec: Optional[InputSpec],
        provenance: Provenance,
        cfg: Optional[PretrainedCfg] = None,
        num_params: Optional[int] = None,
        gflops: Optional[float] = None,
        num_classes: int = 0,
        repo_id: Optional[str] = None,
        conversion: str = '',
        extra_tags: Sequence[str] = (),
) -> str:
    """The ``README.md`` of a model directory.

    Args:
        architecture: registered architecture name.
        spec: the model's input spec.
        provenance: which weights the directory holds.
        cfg: the weights' cfg (licence, paper, provenance text), if any.
        num_params: parameter count.
        gflops: GFLOPs per sample at the native size (FLOPs = 2 x MACs).
        num_classes: classifier outputs (0: a backbone).
        repo_id: Hub repository the card is for (usage snippet).
        conversion: what a converter kept and dropped.
        extra_tags: more Hub tags.
    """
    lic = (cfg.license if cfg else None) or 'NOASSERTION'
    backbone = num_classes == 0
    tags = ['eobackbones', 'earth-observation', 'remote-sensing', architecture.split('_')[0]]
    if spec is not None:
        tags += sorted({m.sensor.replace('sentinel', 'sentinel-') for m in spec.modalities if m.sensor != 'any'})
    if backbone and provenance.root.kind != 'none':
        tags.append('self-supervised')
    tags += list(extra_tags)
    front = ['---', 'library_name: eobackbones', f'license: {_HF_LICENSES.get(lic, "other")}']
    if lic not in _HF_LICENSES:
        front.append(f'license_name: {lic.lower()}')
    front.append(f'pipeline_tag: {"image-feature-extraction" if backbone else "image-classification"}')
    front.append('tags:')
    front += [f'- {t}' for t in dict.fromkeys(tags)]
    front.append('---')
    where = f'hf-hub:{repo_id}' if repo_id else 'local-dir:<this directory>'
    details = [f'- Architecture: `{architecture}`' + (f' ({num_classes} classes)' if num_classes else ' (backbone)')]
    if num_params is not None:
        details.append(f'- Parameters: {num_params / 1e6:.1f} M')
    if gflops is not None and spec is not None:
        h, w = spec.modalities[0].image_size
        details.append(f'- GFLOPs per sample at {h}x{w}: {gflops:.2f} (FLOPs = 2 x multiply-accumulates)')
    details.append(f'- Weights: {provenance.describe()}')
    root = provenance.root
    if root.kind == 'manifest' and root.sha256:
        details.append(f'- Source file sha256: `{root.sha256}`')
    if cfg is not None and cfg.provenance:
        details.append(f'- Provenance: {cfg.provenance.strip()}')
    if cfg is not None and cfg.paper:
        details.append(f'- Paper: {_paper_link(cfg.paper)}')
    details.append(f'- Licence: {lic}' + (' (not stated upstream: ask the authors before redistributing)'
                                          if lic == 'NOASSERTION' else ''))
    if conversion:
        details.append(f'- Conversion: {conversion}')
    parts = ['\n'.join(front), f'# {architecture}' + (f' ({cfg.name})' if cfg is not None and cfg.tag else ''), '',
             '## Model details', '', '\n'.join(details), '']
    if spec is not None:
        parts += ['## Input', '', _input_table(spec), '',
                  '`eobackbones.transforms.for_model(model, source_bands=[...])` applies this preprocessing, selecting '
                  'bands by name.', '']
    parts += ['## Usage', '', '```python', 'import eobackbones', '',
              f'model = eobackbones.create_model("{where}").eval()',
              'pre = eobackbones.transforms.for_model(model, source_bands=...)  # your data\'s band names',
              'x, kwargs = eobackbones.transforms.example_call(model)            # or pre(raw_batch)',
              'pooled = model.forward_head(model.forward_features(x, **kwargs), pre_logits=True)', '```', '']
    if cfg is not None and cfg.paper:
        parts += ['## Citation', '', f'Please cite {_paper_link(cfg.paper)} when you use these weights.', '']
    return '\n'.join(parts)

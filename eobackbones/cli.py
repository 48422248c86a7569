"""The ``eobackbones`` command: list, info, download, verify, convert, push-to-hub, probe.

Errors print one line (``error: ...``) and exit with status 2; ``--debug`` shows the traceback.
"""
import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ['main', 'build_parser']

# family name on the command line -> module with convert_checkpoint(checkpoint, out_dir, **opts)
CONVERT_FAMILIES = {
    'dofa': 'eobackbones.models.dofa',
    'sslrs': 'eobackbones.models.sslrs',
}
# families whose weights exist only outside the Hub: without --out, convert installs them into the cache
INSTALLABLE = {'sslrs'}


def _cmd_list(args: argparse.Namespace) -> int:
    from .models import get_pretrained_cfg, list_models
    names = list_models(args.pattern, pretrained=args.pretrained, modality=args.modality, sensor=args.sensor)
    if not names:
        print(f'no models match {args.pattern!r}' + (' with weights' if args.pretrained else ''), file=sys.stderr)
        return 1
    for n in names:
        if args.pretrained:
            cfg = get_pretrained_cfg(n)
            kind = 'hub' if cfg.has_weights else 'manual'
            print(f'{n:44s} {kind:6s} {cfg.license}')
        else:
            print(n)
    return 0


def _count_params(name: str) -> int:
    import torch
    from .models import create_model
    with torch.device('meta'):  # shapes only: no memory, no random init
        model = create_model(name.split('.')[0])
    return sum(p.numel() for p in model.parameters())


def _cmd_info(args: argparse.Namespace) -> int:
    from .models import get_pretrained_cfg, list_tags, split_model_name_tag
    from .models._registry import default_tag, get_arch_cfg
    cfg = get_pretrained_cfg(args.model)
    arch, tag = split_model_name_tag(args.model)
    tags = list_tags(arch)
    out = {'model': arch, 'parameters': _count_params(arch)}
    if tags:
        out['weights'] = [f'{arch}.{t}' + (' (default)' if t == default_tag(arch) else '') for t in tags]
    else:
        note = getattr(get_arch_cfg(arch), 'notes', '')
        out['weights'] = f'none published{": " + note if note else ""}'
    if cfg is not None and cfg.tag:
        out['selected'] = cfg.name
        out['source'] = cfg.source.describe() if cfg.source else None
        if getattr(cfg.source, 'sha256', None) or getattr(cfg.source, 'sha256_prefix', None):
            out['sha256'] = cfg.source.sha256 or f'{cfg.source.sha256_prefix}... (published prefix)'
        out.update(format=cfg.format, converter=cfg.converter, license=cfg.license, paper=cfg.paper,
                   provenance=cfg.provenance, model_args=cfg.model_args or None, notes=cfg.notes or None)
    spec = cfg.input_spec if cfg is not None else None
    if args.json:
        out['input_spec'] = spec.to_dict() if spec else None
        print(json.dumps(out, indent=2))
        return 0
    for k, v in out.items():
        if v is None:
            continue
        if isinstance(v, list):
            print(f'{k}:')
            for item in v:
                print(f'  - {item}')
        else:
            print(f'{k}: {v}')
    if spec is not None:
        print(f'input: {spec.input_format}, native size {spec.image_size[0]}x{spec.image_size[1]}'
              + (', any bands via wavelengths=/bands=' if spec.any_bands else '')
              + (f', H/W multiple of {spec.size_multiple}' if spec.size_multiple > 1 else ''))
        for m in spec.modalities:
            print(f'  [{m.name}] sensor {m.sensor}, unit {m.unit}' + (f', GSD {m.gsd_m} m' if m.gsd_m else '')
                  + (f', {m.processing_level}' if m.processing_level else ''))
            wl = m.wavelengths_um or [None] * len(m.bands)
            print('    bands: ' + ', '.join(f'{b} ({w:g} um)' if w is not None else b for b, w in zip(m.bands, wl)))
            for s in m.normalization:
                print('    norm: ' + ', '.join(f'{k}={v}' for k, v in s.items()))
            if m.notes:
                print(f'    notes: {m.notes}')
    return 0


def _select_pretrained(pattern: str):
    from .models import get_pretrained_cfg, list_pretrained
    from .errors import UnknownModelError
    names = list_pretrained(pattern)
    if not names:
        raise UnknownModelError(f'no weights match {pattern!r}; see `eobackbones list --pretrained`')
    return [get_pretrained_cfg(n) for n in names]


def _cmd_download(args: argparse.Namespace) -> int:
    from .hub.download import prefetch, _manual_message
    status = 0
    for cfg in _select_pretrained(args.pattern):
        if not cfg.has_weights:
            print(f'skip {cfg.name}: {_manual_message(cfg)}', file=sys.stderr)
            status = 1
            continue
        path = prefetch(cfg)
        print(f'{cfg.name}: {path}')
    return status


def _cmd_verify(args: argparse.Namespace) -> int:
    from .hub.download import verify_cached
    status = 0
    for cfg in _select_pretrained(args.pattern):
        state, detail = verify_cached(cfg)
        print(f'{cfg.name:44s} {state:8s} {detail}')
        if state == 'corrupt':
            status = 1
    return status


def _cmd_convert(args: argparse.Namespace) -> int:
    from .errors import UnknownModelError
    if args.family not in CONVERT_FAMILIES:
        raise UnknownModelError(f'unknown family {args.family!r}; known: {", ".join(CONVERT_FAMILIES)}')
    mod = importlib.import_module(CONVERT_FAMILIES[args.family])
    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        raise FileNotFoundError(f'checkpoint {ckpt} does not exist')
    opts = dict(kv.split('=', 1) for kv in args.option or [])
    if args.out:
        out_dir = Path(args.out)
    elif args.family in INSTALLABLE:  # install where create_model(..., pretrained=True) finds them
        from .hub.download import cache_home
        out_dir = cache_home() / 'manual'
    else:
        raise ValueError(f'convert {args.family} needs --out DIR (its published weights load from the Hub directly)')
    for out in mod.convert_checkpoint(ckpt, out_dir, **opts):
        print(out)
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from huggingface_hub import HfApi
    from .models._base import CONFIG_NAME, WEIGHTS_NAME
    folder = Path(args.dir)
    for f in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / f).is_file():
            raise FileNotFoundError(f'{folder} has no {f}; write it with model.save_pretrained or `eobackbones convert`')
    api = HfApi()
    api.create_repo(args.repo, private=args.private, exist_ok=True)
    info = api.upload_folder(repo_id=args.repo, folder_path=str(folder), commit_message=args.message)
    print(f'pushed {folder} to {args.repo}: {info}')
    print(f'load it with create_model("hf-hub:{args.repo}@<commit>")')
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='eobackbones', description='Pretrained Earth-observation backbones.')
    p.add_argument('--debug', action='store_true', help='show tracebacks')
    sub = p.add_subparsers(dest='command', required=True)

    s = sub.add_parser('list', help='list architectures (or weights with --pretrained)')
    s.add_argument('pattern', nargs='?', default='*')
    s.add_argument('--pretrained', action='store_true', help='list arch.tag names that have weights')
    s.add_argument('--modality', help='e.g. s1, s2')
    s.add_argument('--sensor', help='e.g. sentinel2 (wavelength-conditioned models match every sensor)')
    s.set_defaults(func=_cmd_list)

    s = sub.add_parser('info', help='input spec, bands, wavelengths, licence, source, parameters')
    s.add_argument('model')
    s.add_argument('--json', action='store_true')
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser('download', help='prefetch (and convert) weights for offline use')
    s.add_argument('pattern')
    s.set_defaults(func=_cmd_download)

    s = sub.add_parser('verify', help='re-hash cached weight files against the manifest')
    s.add_argument('pattern', nargs='?', default='*')
    s.set_defaults(func=_cmd_verify)

    s = sub.add_parser('convert', help='upstream checkpoint -> safetensors + config.json + model card')
    s.add_argument('family', help=', '.join(CONVERT_FAMILIES))
    s.add_argument('--checkpoint', required=True)
    s.add_argument('--out', help='output directory (sslrs default: install into the cache, so that '
                                 'create_model(NAME, pretrained=True) loads them)')
    s.add_argument('--option', action='append', metavar='KEY=VALUE', help='family-specific option')
    s.set_defaults(func=_cmd_convert)

    s = sub.add_parser('push-to-hub', help='upload a converted/saved model directory to the Hub')
    s.add_argument('dir')
    s.add_argument('repo')
    s.add_argument('--private', action='store_true')
    s.add_argument('--message', default='Upload eobackbones model')
    s.set_defaults(func=_cmd_push)

    try:
        from .eval.linear_probe import add_probe_args, main_probe
    except ImportError:
        pass
    else:
        s = sub.add_parser('probe', help='linear probe on frozen features (embedded real data by default)')
        add_probe_args(s)
        s.set_defaults(func=main_probe)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.debug:
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
    except Exception as e:  # one clear line; --debug for the traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f'error: {msg}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())

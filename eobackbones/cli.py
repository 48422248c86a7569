"""The ``eobackbones`` command: list, info, download, verify, convert, push-to-hub, probe.

Every option is validated when the command line is parsed; errors print one line (``error: ...``) and exit with
status 2; ``--debug`` (before or after the subcommand) shows the traceback. A closed pipe (``| head``) ends quietly.
"""
import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import UnknownModelError, first_line
from .bench import add_bench_args, main_bench
from .eval.linear_probe import add_probe_args, main_probe, validate_probe_args

__all__ = ['main', 'build_parser']


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and an optional help epilogue computed on demand."""
    extra_help = None  # () -> str, appended to --help (computed only when help is asked for)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f'error: {self.prog}: {message} (see {self.prog} --help)\n')

    def format_help(self) -> str:
        text = super().format_help()
        return text + self.extra_help() if self.extra_help is not None else text


def _converter_help() -> str:
    """Every registered converter with its options (imports the families only when ``convert --help`` asks)."""
    from .hub.weights import get_converter, list_converters
    from . import models  # noqa: F401  (families register their converters)
    lines = ['', 'converters and their --option names:']
    for name in list_converters():
        conv = get_converter(name)
        install = ' (without --out: installs into the cache)' if conv.installable else ' (needs --out)'
        lines.append(f'  {name}{install}')
        for k, o in conv.options.items():
            default = '' if o.default is None else f' [default {o.default}]'
            choices = f' {{{",".join(map(str, o.choices))}}}' if o.choices else ''
            lines.append(f'      {k}={getattr(o.type, "__name__", "value")}{choices}{default}: {o.help}')
    return '\n'.join(lines) + '\n'


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


def _describe_spec(spec: Any) -> List[str]:
    lines = []
    if spec.input_format == 'dict':
        lines.append(f'input: a dict of {", ".join(spec.modality_names)}; missing modality policy '
                     f'{spec.missing_modality}')
    for m in spec.modalities:
        size = f'{m.image_size[0]}x{m.image_size[1]}'
        extra = (', fixed size' if m.fixed_size else f', H/W multiple of {m.size_multiple}' if m.size_multiple > 1 else '')
        lines.append(f'  [{m.name}] sensor {m.sensor}, unit {m.unit}, native size {size}{extra}'
                     + (', any bands via wavelengths=/bands=' if m.any_bands else '')
                     + (f', GSD {m.gsd_m} m' if m.gsd_m else '') + (f', {m.processing_level}' if m.processing_level else ''))
        wl = m.wavelengths_um or [None] * len(m.bands)
        lines.append('    bands: ' + ', '.join(f'{b} ({w:g} um)' if w is not None else b for b, w in zip(m.bands, wl)))
        for s in m.normalization:
            lines.append('    norm: ' + ', '.join(f'{k}={v}' for k, v in s.items()))
        if m.notes:
            lines.append(f'    notes: {m.notes}')
    for c in spec.conditions:
        lines.append(f'  condition {c.name}=: {len(c.features)} values ({", ".join(c.features)}), unit {c.unit}'
                     + ''.join(f'; norm: {", ".join(f"{k}={v}" for k, v in s.items())}' for s in c.normalization))
    for a in spec.call_args:
        lines.append(f'  argument {a.name}={a.default!r}: {a.description}')
    return lines


def _cmd_info(args: argparse.Namespace) -> int:
    import torch
    from .models import create_model, list_tags, resolve_model
    from .models._registry import default_tag, get_arch_cfg
    r = resolve_model(args.model, pretrained=False)
    with torch.device('meta'):  # the real instance (its spec and parameters), no memory, no weights
        model = create_model(args.model) if r.cfg is None or r.pretrained else \
            create_model(r.arch, pretrained=False, pretrained_cfg=r.cfg)
    cfg = r.cfg
    tags = list_tags(r.arch)
    out: Dict[str, Any] = {'model': r.arch, 'parameters': sum(p.numel() for p in model.parameters())}
    if tags:
        out['weights'] = [f'{r.arch}.{t}' + (' (default)' if t == default_tag(r.arch) else '') for t in tags]
    else:
        note = getattr(get_arch_cfg(r.arch), 'notes', '')
        out['weights'] = f'none published{": " + note if note else ""}'
    if r.pretrained:  # a directory: what it holds
        from .hub.weights import read_model_dir
        from .cfg import Provenance
        conf, _, canonical = read_model_dir(args.model)
        prov = Provenance.from_dict(conf['provenance']) if conf.get('provenance') else None
        out['selected'] = canonical
        out['holds'] = prov.describe() if prov else 'unknown (saved by an older version without provenance)'
        out['sha256'] = conf.get('weights_sha256')
    elif cfg is not None and cfg.tag:
        out['selected'] = cfg.name
        out['source'] = cfg.source.describe() if cfg.source else None
        if getattr(cfg.source, 'sha256', None) or getattr(cfg.source, 'sha256_prefix', None):
            out['sha256'] = cfg.source.sha256 or f'{cfg.source.sha256_prefix}... (published prefix)'
        out.update(format=cfg.format, converter=cfg.converter, license=cfg.license, paper=cfg.paper,
                   provenance=cfg.provenance, model_args=cfg.model_args or None, notes=cfg.notes or None)
    spec = model.input_spec
    if args.json:
        out['input_spec'] = spec.to_dict() if spec else None
        print(json.dumps(out, indent=2, default=str))
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
        print('\n'.join(_describe_spec(spec)))
    return 0


def _select_pretrained(pattern: str):
    from .models import get_pretrained_cfg, list_pretrained
    names = list_pretrained(pattern)
    if not names:
        raise UnknownModelError(f'no weights match {pattern!r}; see `eobackbones list --pretrained`')
    return [get_pretrained_cfg(n) for n in names]


def _cmd_download(args: argparse.Namespace) -> int:
    from .hub.download import manual_message
    from .hub.weights import prefetch
    status = 0
    for cfg in _select_pretrained(args.pattern):
        if not cfg.has_weights:
            print(f'skip {cfg.name}: {manual_message(cfg)}', file=sys.stderr)
            status = 1
            continue
        print(f'{cfg.name}: {prefetch(cfg)}')
    return status


def _cmd_verify(args: argparse.Namespace) -> int:
    from .hub.weights import verify_cached
    status = 0
    for cfg in _select_pretrained(args.pattern):
        state, detail = verify_cached(cfg)
        print(f'{cfg.name:44s} {state:8s} {detail}')
        if state == 'corrupt':
            status = 1
    return status


def _cmd_convert(args: argparse.Namespace) -> int:
    from .models import convert_checkpoint
    for out in convert_checkpoint(args.family, args.checkpoint, args.out, args.options):
        print(out)
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from huggingface_hub import HfApi
    from .hub.weights import CONFIG_NAME, WEIGHTS_NAME, read_model_dir
    folder = Path(args.dir)
    for f in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / f).is_file():
            raise FileNotFoundError(f'{folder} has no {f}; write it with model.save_pretrained or `eobackbones convert`')
    read_model_dir(f'local-dir:{folder}')  # an eobackbones config, readable
    if not (folder / 'README.md').is_file():
        raise FileNotFoundError(f'{folder} has no README.md model card; re-save it with save_pretrained')
    api = HfApi()
    api.create_repo(args.repo, private=args.private, exist_ok=True)
    info = api.upload_folder(repo_id=args.repo, folder_path=str(folder), commit_message=args.message)
    print(f'pushed {folder} to {args.repo}: {info}')
    print(f'load it with create_model("hf-hub:{args.repo}@<commit>")')
    return 0


def _options(items: Optional[List[str]]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for kv in items or []:
        if '=' not in kv:
            raise ValueError(f'--option {kv!r}: expected KEY=VALUE')
        k, v = kv.split('=', 1)
        out[k.strip()] = v
    return out


def _validate(args: argparse.Namespace) -> None:
    """Checks argparse cannot express, done before any work (one line each)."""
    if args.command == 'list':
        if args.modality or args.sensor:
            from .models import known_modalities
            from .sensors import list_sensors
            mods = known_modalities()
            if args.modality and args.modality not in mods:
                raise ValueError(f'--modality {args.modality!r} is not a modality of any model; known: {", ".join(mods)}')
            if args.sensor and args.sensor not in list_sensors():
                raise ValueError(f'--sensor {args.sensor!r} is not in the sensor catalogue; known: '
                                 f'{", ".join(list_sensors())}')
    elif args.command == 'convert':
        from .hub.weights import get_converter, list_converters
        from . import models  # noqa: F401  (families register their converters)
        if args.family not in list_converters():
            raise UnknownModelError(f'unknown family {args.family!r}; known: {", ".join(list_converters())}')
        args.options = _options(args.option)
        get_converter(args.family).parse_options(args.options)  # types and names checked now, not half-way
        if not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f'checkpoint {args.checkpoint} does not exist')
    elif args.command == 'probe':
        validate_probe_args(args)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--debug', action='store_true', default=argparse.SUPPRESS, help='show tracebacks')
    p = _Parser(prog='eobackbones', description='Pretrained Earth-observation backbones.', parents=[common])
    sub = p.add_subparsers(dest='command', required=True, parser_class=_Parser)

    s = sub.add_parser('list', help='list architectures (or weights with --pretrained)', parents=[common])
    s.add_argument('pattern', nargs='?', default='*')
    s.add_argument('--pretrained', action='store_true', help='list arch.tag names that have weights')
    s.add_argument('--modality', help='e.g. s1, s2 (wavelength-conditioned models match every modality)')
    s.add_argument('--sensor', help='e.g. sentinel2 (wavelength-conditioned models match every sensor)')
    s.set_defaults(func=_cmd_list)

    s = sub.add_parser('info', help='input spec, bands, wavelengths, licence, source, parameters', parents=[common])
    s.add_argument('model', help='arch, arch.tag, local-dir:PATH or hf-hub:ORG/REPO[@REV]')
    s.add_argument('--json', action='store_true')
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser('download', help='prefetch (and convert) weights for offline use', parents=[common])
    s.add_argument('pattern')
    s.set_defaults(func=_cmd_download)

    s = sub.add_parser('verify', help='re-hash every cached weight file (exit 1 if one is damaged)', parents=[common])
    s.add_argument('pattern', nargs='?', default='*')
    s.set_defaults(func=_cmd_verify)

    s = sub.add_parser('convert', help='upstream checkpoint -> safetensors + config.json + model card', parents=[common])
    s.extra_help = _converter_help
    s.add_argument('family', help='converter name (see below)')
    s.add_argument('--checkpoint', required=True)
    s.add_argument('--out', help='output directory (converters of weights published outside the Hub default to '
                                 'installing into the cache, so that create_model(NAME, pretrained=True) loads them)')
    s.add_argument('--option', action='append', metavar='KEY=VALUE', help='converter option (listed below)')
    s.set_defaults(func=_cmd_convert)

    s = sub.add_parser('push-to-hub', help='upload a converted/saved model directory to the Hub', parents=[common])
    s.add_argument('dir')
    s.add_argument('repo')
    s.add_argument('--private', action='store_true')
    s.add_argument('--message', default='Upload eobackbones model')
    s.set_defaults(func=_cmd_push)

    s = sub.add_parser('probe', help='linear probe on frozen features (embedded real data by default)', parents=[common])
    add_probe_args(s)
    s.set_defaults(func=main_probe)

    s = sub.add_parser('bench', help='speed, memory, FLOPs, fraction of the matmul peak, fidelity vs fp32',
                       parents=[common])
    add_bench_args(s)
    s.set_defaults(func=main_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a one-line parse error already printed
        return int(e.code or 0)
    debug = getattr(args, 'debug', False)
    try:
        _validate(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`eobackbones list | head`): stop quietly, and keep Python from complaining at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as e:  # one clear line; --debug for the traceback
        if debug:
            raise
        print(f'error: {first_line(e)}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())

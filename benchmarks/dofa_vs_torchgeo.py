"""eobackbones DOFA vs torchgeo DOFA: same weights, same input, one run, ratios.

    python benchmarks/dofa_vs_torchgeo.py [--batch 8] [--channels 13] [--repeats 3] [--arch base]

Modes (timed interleaved, round-robin, so machine load hits every mode alike; median per mode):
  torchgeo_fp32        torchgeo ``DOFA(x, wavelengths)`` in float32 (the baseline of every ratio)
  torchgeo_bf16_ac     the same under ``torch.autocast(bfloat16)``
  ours_fp32            ``eobackbones`` DOFA in float32
  ours_bf16_ac         ours under ``torch.autocast(bfloat16)``
  ours_fast            ``eobackbones.optimize_for_inference(model, precision=...)`` (default ``auto``)
  ours_fast_compiled   the same with ``compile=True`` (Inductor, weight freezing; compiled during warm-up)
All under ``torch.inference_mode()``. Cosines compare pooled features (``forward_head(pre_logits=True)``)
to ours in float32. Writes ``benchmarks/results/dofa_vs_torchgeo.{json,md}``.
"""
import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import eobackbones
from eobackbones.layers import sincos_2d_pos_embed
from eobackbones.optimize import cpu_has_native_bf16

S2_13 = [0.443, 0.49, 0.56, 0.665, 0.705, 0.74, 0.783, 0.842, 0.865, 0.945, 1.375, 1.61, 2.19]
ARCHS = {'base': ('dofa_base', 'dofa_base_patch16_224'), 'large': ('dofa_large', 'dofa_large_patch16_224')}


def _git_commit() -> str:
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--arch', default='base', choices=sorted(ARCHS))
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--channels', type=int, default=13, help='<= 13: the first Sentinel-2 bands')
    ap.add_argument('--size', type=int, default=224)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--precision', default='auto')
    ap.add_argument('--no-compile', action='store_true', help='skip the compiled fast path')
    ap.add_argument('--out', default=str(Path(__file__).parent / 'results'))
    args = ap.parse_args()

    import torchgeo.models.dofa as tgd
    ours_name, tg_name = ARCHS[args.arch]
    torch.manual_seed(0)
    tg = getattr(tgd, tg_name)(num_classes=0).eval()
    with torch.no_grad():  # torchgeo builds a zero pos_embed; use the fixed table DOFA is trained with
        tg.pos_embed.copy_(sincos_2d_pos_embed(tg.embed_dim, 224 // tg.patch_size))
    ours = eobackbones.create_model(ours_name).eval()
    ours.load_state_dict(tg.state_dict(), strict=True)
    fast = eobackbones.optimize_for_inference(ours, precision=args.precision)
    fastc = None if args.no_compile else eobackbones.optimize_for_inference(ours, precision=args.precision, compile=True)

    waves = S2_13[:args.channels]
    x = torch.randn(args.batch, args.channels, args.size, args.size, generator=torch.Generator().manual_seed(1))

    def autocast():
        return torch.autocast('cpu', dtype=torch.bfloat16)

    def tg_ac():
        with autocast():
            return tg(x, waves)

    def ours_ac():
        with autocast():
            return ours(x, wavelengths=waves)

    modes = {
        'torchgeo_fp32': lambda: tg(x, waves),
        'torchgeo_bf16_ac': tg_ac,
        'ours_fp32': lambda: ours(x, wavelengths=waves),
        'ours_bf16_ac': ours_ac,
        'ours_fast': lambda: fast(x, wavelengths=waves),
    }
    if fastc is not None:
        modes['ours_fast_compiled'] = lambda: fastc.forward_head(fastc.forward_features(x, wavelengths=waves))
    times = {k: [] for k in modes}
    with torch.inference_mode():
        ref = ours.forward_head(ours.forward_features(x, wavelengths=waves), pre_logits=True)
        tg_ref = tg.forward_features(x, waves)
        with autocast():
            ac = ours.forward_head(ours.forward_features(x, wavelengths=waves), pre_logits=True).float()
        fast_out = fast.forward_head(fast.forward_features(x, wavelengths=waves), pre_logits=True)
        if fastc is not None:
            t0 = time.perf_counter()
            fastc_out = fastc.forward_head(fastc.forward_features(x, wavelengths=waves), pre_logits=True)
            compile_s = time.perf_counter() - t0
        for fn in modes.values():  # warm-up (kernel caches, oneDNN primitives)
            fn()
        for _ in range(args.repeats):
            for k, fn in modes.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)

    med = {k: statistics.median(v) for k, v in times.items()}
    base = med['torchgeo_fp32']
    res = dict(
        arch=ours_name, batch=args.batch, channels=args.channels, size=args.size, repeats=args.repeats,
        fast_precision=str(fast.dtype).replace('torch.', ''),
        compile_seconds=None if fastc is None else compile_s,
        seconds_median=med, seconds_all=times,
        img_per_s={k: args.batch / v for k, v in med.items()},
        speedup_vs_torchgeo_fp32={k: base / v for k, v in med.items()},
        ratios=dict(
            fp32=med['torchgeo_fp32'] / med['ours_fp32'],
            bf16_autocast=med['torchgeo_bf16_ac'] / med['ours_bf16_ac'],
            fast_vs_torchgeo_fp32=med['torchgeo_fp32'] / med['ours_fast'],
            fast_compiled_vs_torchgeo_fp32=None if fastc is None else med['torchgeo_fp32'] / med['ours_fast_compiled'],
        ),
        max_abs_diff_vs_torchgeo_fp32=(ref - tg_ref).abs().max().item(),
        cosine_min=dict(
            bf16_autocast=F.cosine_similarity(ac, ref).min().item(),
            fast=F.cosine_similarity(fast_out, ref).min().item(),
            fast_compiled=None if fastc is None else F.cosine_similarity(fastc_out, ref).min().item(),
        ),
        env=dict(
            torch=torch.__version__, timm=__import__('timm').__version__, torchgeo=__import__('torchgeo').__version__,
            cpu=platform.processor() or platform.machine(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
            native_bf16=cpu_has_native_bf16(), threads=torch.get_num_threads(), git_commit=_git_commit(),
        ),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'dofa_vs_torchgeo.json').write_text(json.dumps(res, indent=2) + '\n', encoding='utf-8')
    rows = '\n'.join(
        f'| {k} | {med[k]:.3f} | {res["img_per_s"][k]:.2f} | {res["speedup_vs_torchgeo_fp32"][k]:.2f}x |' for k in modes)
    compiled_note = 'skipped' if fastc is None else f'first call {compile_s:.1f} s (compilation)'
    compiled_ratio = '' if fastc is None else \
        f'; compiled fast path: **{res["ratios"]["fast_compiled_vs_torchgeo_fp32"]:.2f}x**'
    compiled_cos = '' if fastc is None else f', compiled {res["cosine_min"]["fast_compiled"]:.6f}'
    md = f"""# DOFA: eobackbones vs torchgeo ({ours_name}, batch {args.batch}, {args.channels}x{args.size}x{args.size})

One run, modes interleaved round-robin, median of {args.repeats}; CPU `{res['env']['cpu_capability']}`,
{res['env']['threads']} threads, native bf16: {res['env']['native_bf16']}; torch {torch.__version__}.
Fast path precision: {res['fast_precision']}; compiled fast path: {compiled_note}.

| mode | s / batch | img/s | vs torchgeo fp32 |
|---|---:|---:|---:|
{rows}

- fp32 ratio (torchgeo / ours): **{res['ratios']['fp32']:.2f}x**; bf16 autocast ratio: **{res['ratios']['bf16_autocast']:.2f}x**;
  fast path vs torchgeo fp32: **{res['ratios']['fast_vs_torchgeo_fp32']:.2f}x**{compiled_ratio}
- pooled-feature cosine to fp32 (min over batch): autocast {res['cosine_min']['bf16_autocast']:.6f},
  fast {res['cosine_min']['fast']:.6f}{compiled_cos}; max |ours - torchgeo| fp32: {res['max_abs_diff_vs_torchgeo_fp32']:.2e}
"""
    (out / 'dofa_vs_torchgeo.md').write_text(md, encoding='utf-8')
    print(md)


if __name__ == '__main__':
    main()

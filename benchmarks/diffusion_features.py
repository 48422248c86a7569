"""Diffusion UNet encoder: classification features (encoder + first middle block) vs the full UNet, one run.

    python benchmarks/diffusion_features.py [--model diffusion_sr3_s2s1] [--batch 2] [--size 128] [--repeats 3]
                                            [--device auto] [--threads 0]

Modes (timed interleaved, round-robin, so machine load hits every mode alike; median per mode), all under
``torch.inference_mode()`` on the same input (``eobackbones.transforms.example_call``: ``{'s2', 's1'}`` at ``--size``
px, and the 12 context values for the conditional model), with the manifest's ``feature_kwargs`` (timestep, noise
seed) as the probe passes them:
  features_{fp32,bf16}   ``forward_head(forward_features(x), pre_logits=True)``: q_sample + encoder (+ SR3's first
                         middle block) + average pooling; what the classification probe computes
  seg_level_{fp32,bf16}  ``forward_intermediates(x, indices=[seg_feature_index], stop_early=True)``: the one decoder
                         level the segmentation probe reads (the manifest's ``seg_feature_index``)
  seg_levels_{fp32,bf16} ``forward_intermediates(x, stop_early=True)``: all five decoder levels (segmentation heads)
  full_{fp32,bf16}       q_sample + the whole UNet to the noise prediction (what upstream's feature extractor ran
                         for every feature: ``feat_need=True`` goes through the decoder)
``bf16`` = ``torch.autocast(bfloat16)``. Reported: seconds per batch, speed-up of the pooled features over the full
UNet, and the cosine of the bf16 outputs to fp32 (pooled features and the segmentation level's map, per sample,
min over the batch). Random weights (no weights are published) built through ``create_model``; the CM models'
zero-initialised convs are re-drawn so every block contributes. fp32 on CUDA runs with TF32 off. Writes
``benchmarks/results/diffusion_features-<model>-<device>.{json,md}``.
"""
import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import eobackbones
from eobackbones._io import git_commit
from eobackbones.models.diffusion_unet import RELEASE_ARCHS, DiffusionEncoder
from eobackbones.transforms import example_call



def _build(name: str, device: torch.device) -> DiffusionEncoder:
    torch.manual_seed(0)
    model = eobackbones.create_model(name)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # zero_module'd convs of the OpenAI UNet: give them weights like a trained model's
                p.normal_(0, 0.02)
    return model.to(device).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--model', default='diffusion_sr3_s2s1', help=f'a diffusion encoder: {", ".join(RELEASE_ARCHS.values())}')
    ap.add_argument('--batch', type=int, default=2)
    ap.add_argument('--size', type=int, default=128)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--device', default='auto', help='auto, cpu or cuda')
    ap.add_argument('--threads', type=int, default=0, help='CPU threads (0: torch default)')
    ap.add_argument('--out', default=str(Path(__file__).parent / 'results'))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if args.device == 'auto' else args.device)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    t0 = time.perf_counter()
    model = _build(args.model, device)
    build_s = time.perf_counter() - t0
    x, kw = example_call(model, batch_size=args.batch, image_size=args.size, seed=0, device=device)
    kw.update(model.pretrained_cfg.feature_kwargs)
    seg_index = model.pretrained_cfg.seg_feature_index

    def features():
        return model.forward_head(model.forward_features(x, **kw), pre_logits=True)

    def seg_level():
        return model.forward_intermediates(x, indices=[seg_index], stop_early=True, intermediates_only=True, **kw)[0]

    def seg_levels():
        return model.forward_intermediates(x, stop_early=True, intermediates_only=True, **kw)[0]

    def full():
        # what the feature path does, then the whole UNet (upstream's extractor runs it for any feature)
        x_t, t, ctx, _ = model.feature_input(x, **kw)
        return model.unet(x_t, t, context=ctx)

    fns = {'features': features, 'seg_level': seg_level, 'seg_levels': seg_levels, 'full': full}
    modes = [(name, prec) for name in fns for prec in ('fp32', 'bf16')]

    def run(name: str, prec: str):
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == 'bf16'):
            out = fns[name]()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        return out

    outs = {}
    for name, prec in modes:  # warm-up (oneDNN / cuDNN primitives), and the outputs compared below
        out = run(name, prec)
        if name in ('features', 'seg_level'):
            outs[name, prec] = out.float().flatten(1)
    times = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in modes:
            t = time.perf_counter()
            run(*m)
            times[m].append(time.perf_counter() - t)
    med = {f'{n}_{p}': statistics.median(v) for (n, p), v in times.items()}
    cos = {n: float(F.cosine_similarity(outs[n, 'bf16'], outs[n, 'fp32'], dim=1).min()) for n in ('features', 'seg_level')}
    result = dict(
        model=args.model, batch=args.batch, size=args.size, repeats=args.repeats, device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine(),
        threads=torch.get_num_threads(), torch=torch.__version__, commit=git_commit(Path(__file__).parent) or 'unknown',
        params=sum(p.numel() for p in model.parameters()), build_s=round(build_s, 2),
        seconds=med,
        speedup_features_vs_full={p: med[f'full_{p}'] / med[f'features_{p}'] for p in ('fp32', 'bf16')},
        speedup_seg_levels_vs_full={p: med[f'full_{p}'] / med[f'seg_levels_{p}'] for p in ('fp32', 'bf16')},
        feature_kwargs=dict(model.pretrained_cfg.feature_kwargs), seg_feature_index=seg_index,
        bf16_pooled_cosine_min=cos['features'], bf16_seg_level_cosine_min=cos['seg_level'],
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f'diffusion_features-{args.model}-{device.type}'
    stem.with_suffix('.json').write_text(json.dumps(result, indent=2) + '\n')
    lines = [f'# Diffusion encoder features vs full UNet: {args.model}, batch {args.batch}, {args.size} px, '
             f'{result["device_name"]} ({device.type}, {result["threads"]} threads), torch {torch.__version__}', '',
             '| mode | fp32 s/batch | bf16 s/batch | full / mode (fp32) | full / mode (bf16) |', '|---|---:|---:|---:|---:|']
    for n in fns:
        lines.append(f'| {n} | {med[f"{n}_fp32"]:.3f} | {med[f"{n}_bf16"]:.3f} | '
                     f'{med["full_fp32"] / med[f"{n}_fp32"]:.2f}x | {med["full_bf16"] / med[f"{n}_bf16"]:.2f}x |')
    lines += ['', f'bf16 autocast vs fp32, cosine (min over the batch): pooled features '
                  f'{result["bf16_pooled_cosine_min"]:.6f}, segmentation level {seg_index} map '
                  f'{result["bf16_seg_level_cosine_min"]:.6f}. Feature kwargs {result["feature_kwargs"]}. '
                  f'Parameters: {result["params"]:,}. Commit {result["commit"][:10]}.']
    stem.with_suffix('.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()

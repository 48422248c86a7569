"""DDPM pretraining of a diffusion UNet encoder (Lontke, Mommert, Borth, IGARSS 2024) on Sentinel-2 + Sentinel-1
data, so you can make the weights nobody published. Plain PyTorch; the same run under ``torchrun --nproc_per_node N``
(gloo on CPU, NCCL on GPUs, DistributedDataParallel).

    python examples/pretrain_diffusion.py --steps 200 --out runs/ddpm                        # embedded sample
    python examples/pretrain_diffusion.py --out runs/ddpm --steps 400 --resume               # continue to 400 steps
    python examples/pretrain_diffusion.py --dataset bigearthnet --root DATA/ben --max-per-split 20000 \\
        --model diffusion_cm_s2s1 --steps 50000 --batch-size 32 --device cuda --amp bf16 --out runs/cm
    torchrun --nproc_per_node 4 examples/pretrain_diffusion.py --device cuda --dataset bigearthnet --root DATA/ben ...
    python examples/pretrain_diffusion.py --dataset folder --root DIR --bands B04 B03 B02 B08 VH VV --out runs/f

Objective: :class:`eobackbones.pretrain.ddpm.DDPMObjective` (epsilon-prediction MSE, linear beta schedule, uniform
timesteps: upstream's LitDDPM). Optimiser AdamW (lr 1e-4 as upstream; ``--opt sgd`` to compare process counts).

Data: the model's bands are selected by name (S2 B04, B03, B02, B08; S1 VH, VV) and normalised with its input spec
(S2 reflectance x 1e4 and S1 dB, each clipped and min-max scaled to [-1, 1]); samples with non-finite pixels are
dropped. ``--dataset bigearthnet-mini`` (default): the NaN-free S1 + S2 patches of the embedded real BigEarthNet
sample (48 px; 40 in the train split: a smoke test, not a pretraining corpus). ``bigearthnet`` / ``bigearthnet-v2``:
read by torchgeo from ``--root`` (S2 + S1, loaded into memory; ``--max-per-split`` for a subset). ``folder``: every
``.npy`` / ``.tif`` under ``--root`` (any depth), one ``(C, H, W)`` or ``(H, W, C)`` array per sample holding the bands
``--bands`` names in channel order (S1 names VV / VH, the rest Sentinel-2), S2 in reflectance x 1e4 and S1 in dB
(``--norm none``: already in the model's [-1, 1] range). ``--splits`` picks the splits to train on (default: train, so
a later probe on the same dataset does not evaluate on images the model was pretrained on). The conditional model
needs the dataset's ``context`` (12 raw values per sample, ``ProbeData.conditions``); none of the loaders here
provides it, so it is refused with a one-line error.

Determinism: every global batch (rows and flips), every timestep and noise draw and every dropout mask is a function
of ``(--seed, step)`` alone. So ``--resume`` continues exactly where the checkpoint left off (the same weights and
loss log as an uninterrupted run), and N processes train what one process trains on the same global batch (each
takes its contiguous share of the rows and of the drawn noise; the loss is scaled so DDP's gradient average is the
global batch mean), up to floating-point summation order, with dropout off (the SR3 model's default dropout is 0.2:
``--model-args '{"unet_args": {"dropout": 0}}'``); see examples/_common.py on Adam vs SGD.

Output (``--out DIR``): ``checkpoint.pt`` (model, optimiser, step, loss log; every ``--save-every`` steps and at the
end, written atomically), ``loss.csv`` / ``loss.json`` (step, loss, lr, seconds), and ``model/``: the encoder's
``save_pretrained`` directory with the provenance "pretrained by the user on DATASET for N steps", which
``eobackbones.create_model('local-dir:DIR/model')``, ``eobackbones probe --model local-dir:DIR/model`` and
``eobackbones push-to-hub`` take.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import eobackbones  # noqa: E402
from eobackbones import transforms  # noqa: E402
from eobackbones.data.datasets import ProbeData, nan_policy  # noqa: E402
from eobackbones.pretrain import DDPMObjective  # noqa: E402

DATASETS = ('bigearthnet-mini', 'folder', 'bigearthnet', 'bigearthnet-v2')
_S1_BANDS = ('VV', 'VH')
# settings a resumed run should share with its checkpoint (else it is not the run it continues)
_RESUME_KEYS = ('model', 'model_args', 'dataset', 'splits', 'batch_size', 'seed', 'opt', 'lr', 'weight_decay', 'no_augment')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', default='diffusion_sr3_s2s1',
                   help='diffusion encoder: diffusion_sr3_s2s1, diffusion_cm_s2s1, diffusion_cm_s2s1_cond, or a '
                        'local-dir: / hf-hub: directory to continue from')
    p.add_argument('--model-args', default=None, type=json.loads,
                   help='JSON constructor arguments merged into the architecture\'s (nested dicts merged), e.g. '
                        '\'{"unet_args": {"dropout": 0}}\'')
    p.add_argument('--dataset', default='bigearthnet-mini', choices=DATASETS)
    p.add_argument('--root', default=None, help='dataset root (torchgeo root, or the folder of --dataset folder)')
    p.add_argument('--download', action='store_true', help='let torchgeo download the dataset')
    p.add_argument('--max-per-split', type=int, default=None, help='seeded subset per split (torchgeo datasets)')
    p.add_argument('--bands', nargs='+', default=None, help='--dataset folder: band names in channel order')
    p.add_argument('--splits', nargs='+', default=['train'], choices=['train', 'val', 'test'])
    p.add_argument('--norm', default='model', choices=['model', 'none'],
                   help='model: the input spec\'s normalisation of raw values; none: data already in [-1, 1]')
    p.add_argument('--steps', type=int, default=200, help='total optimiser steps (a resumed run continues to this)')
    p.add_argument('--batch-size', type=int, default=8, help='global batch size (over all processes)')
    p.add_argument('--lr', type=float, default=1e-4)
    p.add_argument('--weight-decay', type=float, default=0.0)
    p.add_argument('--opt', default='adamw', choices=['adamw', 'sgd'])
    p.add_argument('--grad-clip', type=float, default=0.0, help='clip the gradient norm (0: off)')
    p.add_argument('--no-augment', action='store_true', help='no random flips')
    p.add_argument('--amp', default='none', choices=['none', 'bf16'], help='autocast dtype')
    p.add_argument('--grad-checkpointing', action='store_true')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='cpu', help='cpu, cuda or auto')
    p.add_argument('--out', default='pretrain_diffusion_out')
    p.add_argument('--save-every', type=int, default=100, help='checkpoint every N steps (and at the end)')
    p.add_argument('--resume', action='store_true', help='continue from --out/checkpoint.pt (if it exists)')
    p.add_argument('--no-progress', action='store_true')
    args = p.parse_args(argv)
    if args.dataset != 'bigearthnet-mini' and not args.root:
        p.error(f'--dataset {args.dataset} needs --root DIR')
    if args.dataset == 'folder' and not args.bands:
        p.error('--dataset folder needs --bands NAME ... (band names in channel order)')
    if args.steps < 1 or args.batch_size < 1:
        p.error('--steps and --batch-size must be >= 1')
    return args


# ---------------------------------------------------------------- data

def _read_sample(path: Path) -> np.ndarray:
    if path.suffix.lower() == '.npy':
        return np.load(path, allow_pickle=False)
    import tifffile
    return tifffile.imread(str(path))


def load_folder(root: Path, bands: List[str]) -> ProbeData:
    """Every ``.npy`` / ``.tif`` under ``root``: one (C, H, W) or (H, W, C) sample each, channels named by ``bands``;
    S1 bands (VV / VH) form ``s1`` (dB), the others ``s2`` (reflectance x 1e4). All samples are the train split."""
    files = sorted(p for p in Path(root).rglob('*') if p.suffix.lower() in ('.npy', '.tif', '.tiff'))
    if not files:
        raise SystemExit(f'error: {root}: no .npy / .tif files')
    s1 = [i for i, b in enumerate(bands) if b in _S1_BANDS]
    s2 = [i for i, b in enumerate(bands) if b not in _S1_BANDS]
    arrays = []
    for f in files:
        x = _read_sample(f)
        if x.ndim != 3 or len(bands) not in (x.shape[0], x.shape[-1]):
            raise SystemExit(f'error: {f}: shape {x.shape} does not hold {len(bands)} bands {bands}')
        x = x if x.shape[0] == len(bands) else np.moveaxis(x, -1, 0)
        if arrays and x.shape != arrays[0].shape:
            raise SystemExit(f'error: {f}: shape {x.shape}, the first sample is {arrays[0].shape}')
        arrays.append(x.astype(np.float32))
    x = np.stack(arrays)
    n = len(x)
    images = {'s2': x[:, s2], 's1': x[:, s1]}
    names = {'s2': tuple(bands[i] for i in s2), 's1': tuple(bands[i] for i in s1)}
    return ProbeData(name=Path(root).name, images={k: v for k, v in images.items() if names[k]},
                     bands={k: v for k, v in names.items() if v}, units={'s2': 'reflectance_1e4', 's1': 'dB'},
                     labels=np.zeros(n, dtype=np.int64), label_names=('none',), multilabel=False,
                     split=np.array(['train'] * n), ids=np.array([str(f.relative_to(root)) for f in files]))


def load_data(args: argparse.Namespace) -> ProbeData:
    """The requested splits with S2 + S1, samples with non-finite pixels dropped."""
    if args.dataset == 'folder':
        data = load_folder(Path(args.root), list(args.bands))
    else:
        from eobackbones.data.catalog import DataRequest, load_dataset
        req = DataRequest(modalities=('s2', 's1'), root=args.root, download=args.download,
                          max_per_split=args.max_per_split) if args.dataset != 'bigearthnet-mini' else DataRequest(('s2', 's1'))
        data = load_dataset(args.dataset, req)
    data, _ = nan_policy(data, 'drop')
    keep = np.isin(data.split, args.splits)
    if not keep.any():
        raise SystemExit(f'error: {data.name}: no samples in the splits {args.splits}')
    return data.subset(np.flatnonzero(keep))


def preprocessing(spec, data: ProbeData, norm: str) -> torch.nn.Module:
    """Band selection by name + the spec's normalisation (or none), keyed by the model's modality names."""
    bands = C.for_model_keys(spec, data.bands)
    if norm == 'none':
        spec = spec.replace_modality('s2', normalization=()).replace_modality('s1', normalization=())
        return transforms.for_model(spec, source_bands=bands, allow_unnormalised=True)
    units = C.for_model_keys(spec, data.units)
    wrong = {m.name: units[m.name] for m in spec.modalities if units[m.name] != m.unit}
    if wrong:
        raise SystemExit(f'error: the model expects {[(m.name, m.unit) for m in spec.modalities]}, the data has '
                         f'{wrong}; convert it, or normalise it yourself and pass --norm none')
    return transforms.for_model(spec, source_bands=bands)


# ---------------------------------------------------------------- model, checkpoint

def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def build_encoder(args: argparse.Namespace):
    """The encoder (no classifier), with ``--model-args`` merged into the architecture's constructor arguments."""
    kwargs: Dict[str, Any] = {}
    if args.model_args:
        with torch.device('meta'):
            base = eobackbones.create_model(args.model).model_args
        kwargs = {k: v for k, v in _merge(base, args.model_args).items() if k in args.model_args}
    enc = eobackbones.create_model(args.model, num_classes=0, **kwargs)
    if not hasattr(enc, 'unet'):
        raise SystemExit(f'error: {args.model} is not a diffusion UNet encoder')
    return enc


def step_draws(seed: int, step: int, batch: int, shape: tuple, num_timesteps: int):
    """The timesteps and noise of one global batch (CPU generator: identical for any process count and device)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    t = torch.randint(0, num_timesteps, (batch,), generator=g)
    return t, torch.randn((batch, *shape), generator=g)


LOG_FIELDS = ('step', 'loss', 'lr', 'seconds')


# ---------------------------------------------------------------- training

def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    rank, world, device = C.setup_distributed(args.device)
    show = rank == 0 and not args.no_progress
    out = Path(args.out)
    data = load_data(args)

    torch.manual_seed(args.seed)  # the same initial weights in every process (DDP also broadcasts rank 0's)
    encoder = build_encoder(args)
    spec = encoder.input_spec
    if encoder.conditional and 'context' not in data.conditions:
        raise SystemExit(f'error: {args.model} is conditional: it needs the 12 context values per sample, which '
                         f'{data.name} does not provide')
    pre = preprocessing(spec, data, args.norm)
    cond_pre = transforms.for_model(spec) if encoder.conditional else None
    images = C.for_model_keys(spec, data.images)
    n = len(data)
    hw = tuple(next(iter(images.values())).shape[-2:])
    shape = tuple(encoder.pad_input(torch.zeros(1, encoder.in_chans, *hw))[0].shape[1:])
    if args.grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    objective = DDPMObjective(encoder).to(device)
    opt = (torch.optim.AdamW(objective.parameters(), lr=args.lr, weight_decay=args.weight_decay) if args.opt == 'adamw'
           else torch.optim.SGD(objective.parameters(), lr=args.lr, weight_decay=args.weight_decay))

    step, history = C.resume_checkpoint(out, encoder, opt, args, rank, _RESUME_KEYS)
    model = DDP(objective, device_ids=[device.index] if device.type == 'cuda' else None) if world > 1 else objective
    steps_per_epoch = max(1, n // args.batch_size)
    if rank == 0:
        print(f'{args.model}: {sum(p.numel() for p in encoder.parameters()) / 1e6:.2f} M parameters; {data.name} '
              f'{"+".join(args.splits)}: {n} S2+S1 samples {hw[0]}x{hw[1]} (UNet input {shape[-2]}x{shape[-1]}), '
              f'{steps_per_epoch} steps per epoch, global batch {args.batch_size}, {world} process(es), '
              f'{args.opt} lr {args.lr}, steps {step} -> {args.steps}', flush=True)

    bar = C.progress(range(step, args.steps), show, desc='DDPM', initial=step, total=args.steps)
    epoch, batches, t0 = None, None, time.time()
    done = history[-1]['seconds'] if history else 0.0
    objective.train()
    for step in bar:
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            batches = C.epoch_batches(n, args.batch_size, epoch, args.seed, world, not args.no_augment)
        pos, flips = batches[step % steps_per_epoch]
        mine = C.shard(np.arange(len(pos)), rank, world)
        x = C.model_input(pre, spec, images, pos[mine], hw, flips[mine], device)
        kw = {}
        if cond_pre is not None:
            raw = torch.from_numpy(np.asarray(data.conditions['context'][pos[mine]], dtype=np.float32))
            kw['context'] = cond_pre.conditions(context=raw)['context'].to(device)
        t, noise = step_draws(args.seed, step, len(pos), shape, encoder.num_timesteps)
        torch.manual_seed(args.seed * 1_000_003 + step * 1009 + rank)  # dropout masks: a function of (seed, step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == 'bf16'):
            loss = model(x, t=t[mine].to(device), noise=noise[mine].to(device), **kw)
        # mean over this share, weighted by its size: DDP's average over processes is the global batch mean
        scaled = loss * (len(mine) / len(pos)) * world
        opt.zero_grad(set_to_none=True)
        scaled.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(objective.parameters(), args.grad_clip)
        opt.step()
        total = C.all_reduce_sum((loss.detach() * (len(mine) / len(pos))).float().cpu())
        history.append(dict(step=step + 1, loss=float(total), lr=opt.param_groups[0]['lr'],
                            seconds=round(done + time.time() - t0, 3)))
        if show:
            bar.set_postfix(loss=f'{float(total):.4f}')
        if rank == 0 and ((step + 1) % args.save_every == 0) and step + 1 < args.steps:
            C.save_checkpoint(out, encoder, opt, step + 1, history, args, LOG_FIELDS)
    steps = args.steps
    final = dict(steps=steps, loss=history[-1]['loss'] if history else None,
                 loss_first=history[0]['loss'] if history else None)
    if rank == 0:
        encoder.cpu()
        C.save_checkpoint(out, encoder, opt, steps, history, args, LOG_FIELDS)
        model_dir = encoder.save_pretrained(out / 'model', note=f'pretrained by the user on {data.name} for {steps} steps')
        print(f'FINAL {json.dumps(final)}', flush=True)
        print(f'saved {model_dir} (eobackbones.create_model("local-dir:{model_dir}")); loss log {out / "loss.csv"}')
    C.cleanup_distributed()
    return final


if __name__ == '__main__':
    main()

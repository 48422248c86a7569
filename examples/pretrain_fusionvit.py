"""MultiMAE-style pretraining of the fusion-token ViT (Chen, Zhao, Bruzzone, arXiv:2304.11381) on Sentinel-1 +
Sentinel-2 data, so you can make the weights nobody published. Plain PyTorch; the same run under
``torchrun --nproc_per_node N`` (gloo on CPU, NCCL on GPUs, DistributedDataParallel).

    python examples/pretrain_fusionvit.py --steps 200 --out runs/fusion                      # embedded sample
    python examples/pretrain_fusionvit.py --steps 400 --out runs/fusion --stop-after 100     # a time-limited job ...
    python examples/pretrain_fusionvit.py --steps 400 --out runs/fusion --resume             # ... continued to 400
    python examples/pretrain_fusionvit.py --model fusionvit_small --dataset bigearthnet --root DATA/ben \\
        --max-per-split 20000 --steps 50000 --batch-size 64 --device cuda --amp bf16 --out runs/fusion_s
    torchrun --nproc_per_node 2 examples/pretrain_fusionvit.py --steps 20 --opt sgd --out runs/fusion_ddp

Objective: :class:`eobackbones.pretrain.FusionMAE` (per-batch masks with Dirichlet shares of the visible-token budget,
per-modality decoders from the fusion tokens, MSE on the hidden patches + 0.3 x the DINO-style return-token term).

Model: ``--model`` (an architecture, or a ``local-dir:`` / ``hf-hub:`` encoder to continue from). An architecture is
bound to the data's bands (``modalities={'s1': [VH, VV], 's2': [12 bands]}``), its native size is the data's size
(rounded up to the patch size) and it is built with the parameter-free pyramid (``pyramid='interpolate'``: masked
pretraining never trains the learned one). ``--model-args`` adds constructor arguments (e.g. a small test model).

Data: ``bigearthnet-mini`` (default: the embedded real BigEarthNet sample, 48 px, 44 train patches: a smoke test, not
a pretraining corpus), or ``bigearthnet`` / ``bigearthnet-v2`` read by torchgeo from ``--root``. Bands are z-scored
with the train split's per-band statistics (the model has no published normalisation). ``--splits`` picks the
splits to train on (default: train, so a later probe does not test on pretraining images).

Missing modalities: BigEarthNet has patches without Sentinel-1 (NaN). With ``--missing batch`` (default) they form
their own S2-only batches (masks are per batch, as upstream; an absent modality has no tokens, its decoder no loss);
``--missing drop`` leaves them out.

Determinism: every global batch (rows and flips) is a function of ``(--seed, epoch)`` and every mask draw of
``(--seed, step)``; the learning rate is a function of the step. So ``--resume`` continues exactly where the
checkpoint left off (the same weights, optimiser state and loss log as an uninterrupted run), and N processes train
what one process trains on the same global batch (each takes a contiguous share; the loss is scaled so DDP's average
is the global batch mean), up to floating-point summation order (see examples/_common.py on Adam vs SGD).

Output (``--out DIR``): ``checkpoint.pt`` (encoder + decoders, optimiser, step, loss log; every ``--save-every``
steps and at the end, written atomically), ``loss.csv`` / ``loss.json``, and ``model/``: the encoder's
``save_pretrained`` directory ("pretrained by the user on DATASET for N steps"), which
``eobackbones.create_model('local-dir:DIR/model')`` and ``eobackbones probe --model local-dir:DIR/model
--modality-subsets all`` take.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import eobackbones  # noqa: E402
from eobackbones.data.datasets import ProbeData  # noqa: E402
from eobackbones.pretrain import FusionMAE  # noqa: E402

DATASETS = ('bigearthnet-mini', 'bigearthnet', 'bigearthnet-v2')
# settings a resumed run should share with its checkpoint (else it is not the run it continues)
_RESUME_KEYS = ('model', 'model_args', 'dataset', 'splits', 'missing', 'batch_size', 'seed', 'opt', 'lr',
                'weight_decay', 'warmup', 'no_augment', 'decoder_dim', 'decoder_depth', 'decoder_heads', 'mask_ratio')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', default='fusionvit_tiny',
                   help='fusionvit_tiny / _small / _base, or a local-dir: / hf-hub: encoder to continue from')
    p.add_argument('--model-args', default=None, type=json.loads,
                   help='JSON constructor arguments, e.g. \'{"depth": 2}\' (architectures only)')
    p.add_argument('--decoder-dim', type=int, default=256)
    p.add_argument('--decoder-depth', type=int, default=2)
    p.add_argument('--decoder-heads', type=int, default=8)
    p.add_argument('--mask-ratio', type=float, default=0.5,
                   help='fraction of the present modalities\' tokens hidden per batch (upstream: 384 of 768 visible)')
    p.add_argument('--dataset', default='bigearthnet-mini', choices=DATASETS)
    p.add_argument('--root', default=None, help='torchgeo root (bigearthnet, bigearthnet-v2)')
    p.add_argument('--download', action='store_true', help='let torchgeo download the dataset')
    p.add_argument('--max-per-split', type=int, default=None, help='seeded subset per split (torchgeo datasets)')
    p.add_argument('--splits', nargs='+', default=['train'], choices=['train', 'val', 'test'])
    p.add_argument('--missing', default='batch', choices=['batch', 'drop'],
                   help='samples without S1: their own S2-only batches, or dropped')
    p.add_argument('--steps', type=int, default=200, help='total optimiser steps (a resumed run continues to this)')
    p.add_argument('--batch-size', type=int, default=8, help='global batch size (over all processes)')
    p.add_argument('--lr', type=float, default=1.5e-4)
    p.add_argument('--warmup', type=int, default=0, help='linear warm-up steps, then cosine decay to 0')
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--opt', default='adamw', choices=['adamw', 'sgd'])
    p.add_argument('--no-augment', action='store_true', help='no random flips')
    p.add_argument('--amp', default='none', choices=['none', 'bf16'], help='autocast dtype')
    p.add_argument('--grad-checkpointing', action='store_true')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='cpu', help='cpu, cuda or auto')
    p.add_argument('--out', default='pretrain_fusionvit_out')
    p.add_argument('--save-every', type=int, default=100, help='checkpoint every N steps (and at the end)')
    p.add_argument('--resume', action='store_true', help='continue from --out/checkpoint.pt (if it exists)')
    p.add_argument('--stop-after', type=int, default=None,
                   help='leave after this step with a checkpoint (a time-limited job); --resume continues the run')
    p.add_argument('--no-progress', action='store_true')
    args = p.parse_args(argv)
    if args.dataset != 'bigearthnet-mini' and not args.root:
        p.error(f'--dataset {args.dataset} needs --root DIR')
    if args.steps < 1 or args.batch_size < 1:
        p.error('--steps and --batch-size must be >= 1')
    if not 0 < args.mask_ratio < 1:
        p.error('--mask-ratio must be in (0, 1)')
    return args


# ---------------------------------------------------------------- data

def load_data(args: argparse.Namespace) -> Tuple[ProbeData, np.ndarray]:
    """The requested splits with S1 + S2, and per sample whether its S1 is usable (all finite). S2 must be finite."""
    from eobackbones.data.catalog import DataRequest, load_dataset
    req = DataRequest(modalities=('s1', 's2'), root=args.root, download=args.download, max_per_split=args.max_per_split)
    data = load_dataset(args.dataset, req if args.dataset != 'bigearthnet-mini' else DataRequest(('s1', 's2')))
    finite = {m: np.isfinite(x.reshape(len(x), -1)).all(1) for m, x in data.images.items()}
    keep = np.isin(data.split, args.splits) & finite['s2']
    if args.missing == 'drop':
        keep &= finite['s1']
    if not keep.any():
        raise SystemExit(f'error: {data.name}: no usable samples in the splits {args.splits}')
    rows = np.flatnonzero(keep)
    return data.subset(rows), finite['s1'][rows]


def epoch_batches(has_s1: np.ndarray, batch_size: int, epoch: int, seed: int, world: int, augment: bool
                  ) -> List[Tuple[Tuple[str, ...], np.ndarray, np.ndarray]]:
    """The global batches of one epoch, identical in every process: (modalities, rows, flip codes).

    Samples with and without S1 are batched apart (one mask per batch covers one set of modalities); each group
    is permuted and split into near-equal batches, and the batches of both groups are shuffled together. A group
    with fewer samples than processes is left out (every process needs a sample per step).
    """
    groups = [(('s1', 's2'), np.flatnonzero(has_s1)), (('s2',), np.flatnonzero(~has_s1))]
    out = []
    for gi, (mods, rows) in enumerate(groups):
        if len(rows) < max(1, world):
            continue
        g = np.random.default_rng([seed, epoch, gi])
        perm = rows[g.permutation(len(rows))]
        flips = g.integers(0, 4, size=len(rows)) if augment else np.zeros(len(rows), dtype=np.int64)
        for part in np.array_split(np.arange(len(rows)), max(1, len(rows) // batch_size)):
            if len(part) >= world:
                out.append((mods, perm[part], flips[part]))
    order = np.random.default_rng([seed, epoch]).permutation(len(out))
    return [out[i] for i in order]


def zscore_stats(data: ProbeData) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Per-band mean and std over the train split (valid pixels), (1, C, 1, 1) each."""
    train = data.indices('train')
    rows = train if len(train) else np.arange(len(data))
    out = {}
    for m, x in data.images.items():
        v = x[rows].astype(np.float64)
        mean, std = np.nanmean(v, axis=(0, 2, 3)), np.nanstd(v, axis=(0, 2, 3))
        out[m] = (mean[None, :, None, None].astype(np.float32), np.where(std > 0, std, 1.0)[None, :, None, None].astype(np.float32))
    return out


def batch_input(data: ProbeData, stats, model_bands: Dict[str, Tuple[str, ...]], mods: Tuple[str, ...],
                rows: np.ndarray, flips: np.ndarray, size: Tuple[int, int], device: torch.device) -> Dict[str, torch.Tensor]:
    """Rows -> {modality: z-scored (B, C, H, W)} with the model's bands (selected by name), resized and flipped."""
    x = {}
    for m in mods:
        idx = [data.bands[m].index(b) for b in model_bands[m]]
        mean, std = stats[m]
        a = (data.images[m][rows][:, idx] - mean[:, idx]) / std[:, idx]
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        if tuple(t.shape[-2:]) != tuple(size):
            t = torch.nn.functional.interpolate(t, size=size, mode='bilinear', align_corners=False)
        x[m] = C.flip(t, flips).to(device)
    return x


# ---------------------------------------------------------------- model, checkpoint

def build(args: argparse.Namespace, data: ProbeData) -> FusionMAE:
    """The encoder (bound to the data's bands for an architecture) inside the pretraining objective."""
    if ':' in args.model:
        if args.model_args:
            raise SystemExit('error: --model-args applies to architectures, not to a saved encoder')
        enc = eobackbones.create_model(args.model, num_classes=0)
    else:
        hw = data.images['s2'].shape[-2:]
        kw = dict(args.model_args or {})
        patch = kw.get('patch_size', 16)
        kw.setdefault('img_size', [int(-(-s // patch) * patch) for s in hw])
        kw.setdefault('pyramid', 'interpolate')
        enc = eobackbones.create_model(args.model, modalities={m: list(data.bands[m]) for m in ('s1', 's2')}, **kw)
    missing = [m for m in enc.modalities if m not in data.images]
    if missing or not hasattr(enc, 'forward_tokens'):
        raise SystemExit(f'error: {args.model} is not a fusion-token ViT on {list(data.images)} (needs {missing})')
    return FusionMAE(enc, decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads)


def lr_at(step: int, args: argparse.Namespace) -> float:
    warm = min(1.0, (step + 1) / args.warmup) if args.warmup else 1.0
    return args.lr * warm * 0.5 * (1 + math.cos(math.pi * step / args.steps))


LOG_FIELDS = ('step', 'loss', 'recon', 'contrast', 'modalities', 'lr', 'seconds')


# ---------------------------------------------------------------- training

def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    rank, world, device = C.setup_distributed(args.device)
    show = rank == 0 and not args.no_progress
    out = Path(args.out)
    data, has_s1 = load_data(args)
    stats = zscore_stats(data)

    torch.manual_seed(args.seed)  # the same initial weights in every process (DDP also broadcasts rank 0's)
    objective = build(args, data)
    enc = objective.encoder
    bands = {m: enc.input_spec.modality(m).bands for m in enc.modalities}
    size = tuple(enc.img_size)
    tokens = (size[0] // enc.patch_size) * (size[1] // enc.patch_size)
    if args.grad_checkpointing:
        enc.set_grad_checkpointing(True)
    objective.to(device)
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay) if args.opt == 'adamw'
           else torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay))

    step, history = C.resume_checkpoint(out, objective, opt, args, rank, _RESUME_KEYS)
    # absent modalities (S2-only batches) leave their patch embedding, decoder and contrastive token unused
    model = DDP(objective, device_ids=[device.index] if device.type == 'cuda' else None,
                find_unused_parameters=True) if world > 1 else objective
    steps_per_epoch = len(epoch_batches(has_s1, args.batch_size, 0, args.seed, world, not args.no_augment))
    if steps_per_epoch == 0:
        raise SystemExit(f'error: {len(has_s1)} samples cannot fill a batch for {world} processes')
    if rank == 0:
        print(f'{args.model}: {sum(p.numel() for p in enc.parameters()) / 1e6:.2f} M encoder parameters '
              f'({sum(p.numel() for p in objective.parameters()) / 1e6:.2f} M with decoders); {data.name} '
              f'{"+".join(args.splits)}: {int(has_s1.sum())} S1+S2 and {int((~has_s1).sum())} S2-only samples, input '
              f'{size[0]}x{size[1]} ({tokens} tokens per modality, {args.mask_ratio:.0%} hidden), {steps_per_epoch} '
              f'steps per epoch, global batch {args.batch_size}, {world} process(es), {args.opt} lr {args.lr}, steps '
              f'{step} -> {args.steps}', flush=True)

    bar = C.progress(range(step, args.steps), show, desc='FusionMAE', initial=step, total=args.steps)
    epoch, batches, t0 = None, None, time.time()
    done = history[-1]['seconds'] if history else 0.0
    objective.train()
    for step in bar:
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            batches = epoch_batches(has_s1, args.batch_size, epoch, args.seed, world, not args.no_augment)
        mods, rows, flips = batches[step % steps_per_epoch]
        mine = C.shard(np.arange(len(rows)), rank, world)
        x = batch_input(data, stats, bands, mods, rows[mine], flips[mine], size, device)
        # one mask draw per global batch, from (seed, step): the same in every process and after a resume
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        objective.num_encoded_tokens = max(1, int(round((1 - args.mask_ratio) * len(mods) * tokens)))
        for group in opt.param_groups:
            group['lr'] = lr_at(step, args)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == 'bf16'):
            res = model(x, generator=g)
        # every term is a mean over this share's samples: weighted by the share, DDP's average is the global mean
        w = len(mine) / len(rows)
        opt.zero_grad(set_to_none=True)
        (res.loss * w * world).backward()
        opt.step()
        recon = sum(res.recon_losses.values(), res.loss.new_zeros(()))
        parts = torch.stack([res.loss.detach(), recon.detach(), res.contrast_loss.detach()])
        total = C.all_reduce_sum((parts * w).float().cpu())
        history.append(dict(step=step + 1, loss=float(total[0]), recon=float(total[1]), contrast=float(total[2]),
                            modalities='+'.join(mods), lr=lr_at(step, args), seconds=round(done + time.time() - t0, 3)))
        if show:
            bar.set_postfix(loss=f'{float(total[0]):.4f}')
        if step + 1 == args.stop_after and step + 1 < args.steps:
            if rank == 0:
                C.save_checkpoint(out, objective.cpu(), opt, step + 1, history, args, LOG_FIELDS)
                print(f'stopped after step {step + 1} of {args.steps}; --resume continues', flush=True)
            C.cleanup_distributed()
            return dict(steps=step + 1, loss=history[-1]['loss'], loss_first=history[0]['loss'], stopped=True)
        if rank == 0 and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            C.save_checkpoint(out, objective, opt, step + 1, history, args, LOG_FIELDS)
    steps = args.steps
    final = dict(steps=steps, loss=history[-1]['loss'] if history else None,
                 loss_first=history[0]['loss'] if history else None)
    if rank == 0:
        objective.cpu()
        C.save_checkpoint(out, objective, opt, steps, history, args, LOG_FIELDS)
        model_dir = enc.save_pretrained(out / 'model', note=f'pretrained by the user (FusionMAE) on {data.name} '
                                                            f'{"+".join(args.splits)} for {steps} steps')
        print(f'FINAL {json.dumps(final)}', flush=True)
        print(f'saved {model_dir} (eobackbones.create_model("local-dir:{model_dir}")); loss log {out / "loss.csv"}')
    C.cleanup_distributed()
    return final


if __name__ == '__main__':
    main()

"""Fine-tune a segmentation model (any eobackbones backbone + FPN / UPerNet / UNet decoder) on the embedded
PASTIS-R mini set. Plain PyTorch; CPU friendly; the same run under ``torchrun --nproc_per_node N``.

    python examples/finetune_segmentation.py --model dualsimclr_resnet18_s2 --decoder unet --epochs 30
    python examples/finetune_segmentation.py --model dofa_base --pretrained --decoder upernet --freeze-until 6
    torchrun --nproc_per_node 2 examples/finetune_segmentation.py --model dualsimclr_resnet18_s2 --epochs 5

The data (``eobackbones.data.segmentation.load_pastis_mini``) is 9 real 32 x 32 patches (5 train, 2 val,
2 test): **a smoke test, not a benchmark**. Default task: 3 groups (background / meadow / crop), void
ignored. Per epoch: train loss and validation mIoU, pixel accuracy and balanced accuracy; at the end the
test metrics, ``metrics.json`` and ``save_pretrained`` into ``--out``.

Inputs are mapped to the model's bands by name (``eobackbones.transforms.for_model``); wavelength-conditioned
models (DOFA) are bound to the data's bands. Normalisation: the weights' own where the data's unit matches
their spec (e.g. the SSLTransformerRS S2 encoders: clip + per-sample max), else a train-split z-score
(``--norm``). The PASTIS S2 data has 10 bands (no B01 / B09 / B10): for a 13-band model (the
SSLTransformerRS S2 encoders) ``--missing-bands zeros`` (the default here, printed at start) zero-fills them after
normalisation; ``--missing-bands error`` refuses.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from eobackbones.data.segmentation import load_pastis_mini  # noqa: E402
from eobackbones import create_segmentation_model  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', default='dualsimclr_resnet18_s2', help='registered backbone, arch.tag, local-dir: or hf-hub:')
    p.add_argument('--pretrained', nargs='?', const=True, default=False, help='load weights (optionally a tag)')
    p.add_argument('--decoder', default='unet', choices=['fpn', 'upernet', 'unet', 'linear', 'swinunet'])
    p.add_argument('--modalities', nargs='+', default=['s2'], help='data modalities: s2, s1 (ascending)')
    p.add_argument('--date', default='median', help='median, clearest or a date index 0..2')
    p.add_argument('--task', default='groups3', choices=['groups3', 'classes'])
    p.add_argument('--norm', default='auto', choices=['auto', 'model', 'zscore'])
    p.add_argument('--missing-bands', default='zeros', choices=['error', 'zeros'],
                   help='model bands the data lacks: zero-filled after normalisation (printed) or refused')
    p.add_argument('--image-size', type=int, default=None, help='resize inputs (default: native / fixed size)')
    p.add_argument('--epochs', type=int, default=30)
    p.add_argument('--batch-size', type=int, default=2, help='global batch size (over all processes)')
    p.add_argument('--lr', type=float, default=1e-3, help='decoder lr; backbone layers get lr * layer_decay^depth')
    p.add_argument('--layer-decay', type=float, default=0.75)
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--opt', default='adamw', choices=['adamw', 'sgd'],
                   help='sgd (momentum 0.9) keeps multi-process runs equal to one process to rounding; AdamW '
                        'amplifies rounding differences in near-zero gradients (see examples/_common.py)')
    p.add_argument('--freeze-until', default=None, help='freeze the backbone up to this stage (int) or module')
    p.add_argument('--no-augment', action='store_true', help='no random flips')
    p.add_argument('--grad-checkpointing', action='store_true')
    p.add_argument('--max-steps', type=int, default=None, help='stop after this many optimiser steps (smoke runs)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='cpu', help='cpu, cuda or auto')
    p.add_argument('--out', default='finetune_segmentation_out')
    p.add_argument('--no-progress', action='store_true')
    return p.parse_args(argv)


def confusion(logits: torch.Tensor, masks: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    pred = logits.argmax(1)
    keep = masks != ignore_index
    idx = masks[keep] * num_classes + pred[keep]
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes).double()


def scores(conf: torch.Tensor) -> Dict[str, float]:
    """mIoU over classes present in target or prediction, pixel accuracy, balanced accuracy (classes in target)."""
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    support = conf.sum(1)
    return dict(miou=float((inter[union > 0] / union[union > 0]).mean()) if (union > 0).any() else float('nan'),
                pixel_acc=float(inter.sum() / conf.sum().clamp_min(1)),
                balanced_acc=float((inter[support > 0] / support[support > 0]).mean()))


@torch.no_grad()
def evaluate(model, rows, data, images, pre, spec, size, device, rank, world) -> Dict[str, float]:
    model.eval()
    conf = torch.zeros(data.num_classes, data.num_classes, dtype=torch.float64)
    nll = torch.zeros(2, dtype=torch.float64)  # summed cross-entropy, labelled pixels
    local = C.shard(rows, rank, world)
    if len(local):
        x = C.model_input(pre, spec, images, local, size, device=device)
        logits = model(x, output_size=data.masks.shape[-2:]).float().cpu()
        y = torch.from_numpy(data.masks[local])
        conf += confusion(logits, y, data.num_classes, data.ignore_index)
        nll[0] += float(F.cross_entropy(logits, y, ignore_index=data.ignore_index, reduction='sum'))
        nll[1] += float((y != data.ignore_index).sum())
    C.all_reduce_sum(nll)
    # the loss is continuous in the weights; argmax metrics of an undertrained model flip on near-ties
    return dict(scores(C.all_reduce_sum(conf)), loss=float(nll[0] / nll[1].clamp_min(1)))


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    rank, world, device = C.setup_distributed(args.device)
    show = rank == 0 and not args.no_progress
    date = int(args.date) if args.date.lstrip('-').isdigit() else args.date
    data = load_pastis_mini(tuple(args.modalities), date=date, task=args.task)

    torch.manual_seed(args.seed)  # same initial weights in every process (DDP also broadcasts rank 0's)
    model = create_segmentation_model(
        args.model, data.num_classes, args.decoder, pretrained=args.pretrained,
        **C.any_band_kwargs(args.model, data.bands))
    spec = model.input_spec
    train_rows = data.indices('train')
    images = C.for_model_keys(spec, data.images)  # keyed by the model's modality names
    pre, norm_used = C.input_plan(spec, C.for_model_keys(spec, data.bands), C.for_model_keys(spec, data.units),
                                  {m: x[train_rows] for m, x in images.items()}, args.norm, args.missing_bands)
    filled = {m: b for m, b in pre.filled.items() if b}
    size = C.target_size(spec, data.masks.shape[-2:], args.image_size)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model, core, groups, opt, sched = C.training_setup(model, args, len(train_rows), device, world)
    if rank == 0:
        print(f'{args.model} + {args.decoder}: {sum(p.numel() for p in core.parameters()) / 1e6:.2f} M parameters, '
              f'input {size}, normalisation {norm_used}, zero-filled bands {filled or "none"}, {world} process(es); '
              f'pastis_mini {args.task}: {len(train_rows)} train / '
              f'{len(data.indices("val"))} val / {len(data.indices("test"))} test (a smoke test, not a benchmark)')

    history, step, t0 = [], 0, time.time()
    masks = torch.from_numpy(data.masks)
    for epoch in range(args.epochs):
        model.train()
        total_loss, n_seen = 0.0, 0
        batches = C.epoch_batches(len(train_rows), args.batch_size, epoch, args.seed, world, not args.no_augment)
        for pos, flips in C.progress(batches, show, desc=f'epoch {epoch + 1}/{args.epochs}', leave=False):
            rows = train_rows[pos]
            mine = C.shard(np.arange(len(rows)), rank, world)
            x = C.model_input(pre, spec, images, rows[mine], size, flips[mine], device)
            y = C.flip(masks[rows[mine]], flips[mine]).to(device)
            n_valid = int((masks[rows] != data.ignore_index).sum())  # of the global batch (flips keep the count)
            logits = model(x, output_size=tuple(y.shape[-2:]))
            loss = F.cross_entropy(logits, y, ignore_index=data.ignore_index, reduction='sum') / max(1, n_valid)
            opt.zero_grad(set_to_none=True)
            (loss * world).backward()  # DDP averages over processes: the gradient of the global batch mean
            opt.step()
            sched.step()
            total_loss += float(C.all_reduce_sum(loss.detach().clone()))
            n_seen += 1
            step += 1
            if args.max_steps is not None and step >= args.max_steps:
                break
        val = evaluate(core, data.indices('val'), data, images, pre, spec, size, device, rank, world)
        history.append(dict(epoch=epoch + 1, loss=total_loss / max(1, n_seen), **{f'val_{k}': v for k, v in val.items()}))
        if rank == 0:
            h = history[-1]
            print(f'epoch {epoch + 1:3d}  loss {h["loss"]:.4f}  val loss {h["val_loss"]:.4f}  mIoU {h["val_miou"]:.3f}  '
                  f'pixel acc {h["val_pixel_acc"]:.3f}  balanced acc {h["val_balanced_acc"]:.3f}  '
                  f'({time.time() - t0:.0f} s)', flush=True)
        if args.max_steps is not None and step >= args.max_steps:
            break

    test = evaluate(core, data.indices('test'), data, images, pre, spec, size, device, rank, world)
    final = dict(steps=step, train_loss=history[-1]['loss'], **{f'test_{k}': v for k, v in test.items()},
                 **{k: v for k, v in history[-1].items() if k.startswith('val_')})
    if rank == 0:
        out = Path(args.out)
        core.save_pretrained(out, note=f'fine-tuned (segmentation) on {data.name} for {step} steps')
        (out / 'metrics.json').write_text(json.dumps(dict(
            args=vars(args), world_size=world, normalisation=norm_used, zero_filled=filled, history=history,
            final=final), indent=2, default=str))
        print(f'test mIoU {final["test_miou"]:.3f}  pixel acc {final["test_pixel_acc"]:.3f}  '
              f'balanced acc {final["test_balanced_acc"]:.3f}  (2 test patches: a smoke test, not a benchmark)')
        print('FINAL ' + json.dumps(final), flush=True)
        print(f'saved to {out} (eobackbones.create_model("local-dir:{out}"))')
    C.cleanup_distributed()
    return final


if __name__ == '__main__':
    main()

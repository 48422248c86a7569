"""Fine-tune any eobackbones backbone + a classification head on the embedded BigEarthNet-mini data (or a
torchgeo dataset). Plain PyTorch; CPU friendly; the same run under ``torchrun --nproc_per_node N``.

    python examples/finetune_classification.py --model dualsimclr_resnet18_s2 --epochs 10
    python examples/finetune_classification.py --model dofa_base --pretrained --layer-decay 0.65 --head mlp
    python examples/finetune_classification.py --model dualsimclr_resnet18 --nan fill     # S1 + S2 pair
    python examples/finetune_classification.py --dataset eurosat --root DATA/eurosat --max-per-split 500
    torchrun --nproc_per_node 2 examples/finetune_classification.py --model dualsimclr_resnet18_s2 --epochs 3

Data: ``bigearthnet-mini`` (default; 101 real patches, 48 x 48 px, S2 12 bands + S1 VH/VV, 19-class
multi-label, official split: **a smoke test, not a benchmark**), or ``eurosat`` / ``bigearthnet`` /
``bigearthnet-v2`` / ``so2sat`` read by torchgeo from ``--root`` (nothing is downloaded unless ``--download``).
Multi-label data trains with BCE-with-logits and reports macro / micro mAP per epoch; single-label data
with cross-entropy and accuracy.

Head: ``--head linear`` is the backbone's own classifier (``create_model(name, num_classes=K)``, timm
behaviour; saved with ``save_pretrained`` and loadable with ``create_model("local-dir:OUT")``); ``--head mlp``
is ``eobackbones.heads.ClassificationHead`` (hidden layer) on ``forward_head(..., pre_logits=True)`` (saved as
the backbone's ``save_pretrained`` directory plus ``head.safetensors``). Layer-wise lr decay:
``eobackbones.finetune.param_groups_layer_decay``.

Inputs are mapped to the model's bands by name; DOFA is bound to the data's bands. The S2 encoders of
SSLTransformerRS expect 13 bands and BigEarthNet has no B10: ``--missing-bands zeros`` (the default here,
printed at start) zero-fills it after normalisation; ``--missing-bands error`` refuses.
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
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import eobackbones  # noqa: E402
from eobackbones import finetune  # noqa: E402
from eobackbones.heads import ClassificationHead  # noqa: E402


class Classifier(nn.Module):
    """Backbone (pooled features) + :class:`ClassificationHead`."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Any, **kwargs: Any) -> torch.Tensor:
        feats = self.backbone.forward_features(x, **kwargs)
        return self.head(self.backbone.forward_head(feats, pre_logits=True))

    def save_pretrained(self, out: Path, note: str = '') -> Path:
        from safetensors.torch import save_model
        self.backbone.save_pretrained(out, note=note)
        save_model(self.head, str(Path(out) / 'head.safetensors'),
                   metadata=dict(in_features=str(self.head.in_features), num_classes=str(self.head.num_classes),
                                 hidden=str(self.head.hidden)))
        return Path(out)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', default='dualsimclr_resnet18_s2', help='registered backbone, arch.tag, local-dir: or hf-hub:')
    p.add_argument('--pretrained', nargs='?', const=True, default=False, help='load weights (optionally a tag)')
    p.add_argument('--dataset', default='bigearthnet-mini',
                   choices=['bigearthnet-mini', 'eurosat', 'bigearthnet', 'bigearthnet-v2', 'so2sat'])
    p.add_argument('--root', default=None, help='torchgeo root directory (torchgeo datasets)')
    p.add_argument('--download', action='store_true', help='let torchgeo download the dataset')
    p.add_argument('--max-per-split', type=int, default=None, help='seeded subset per split (torchgeo datasets)')
    p.add_argument('--nan', default='fill', choices=['drop', 'fill'], help='samples with missing (NaN) S1 pixels')
    p.add_argument('--head', default='linear', choices=['linear', 'mlp'])
    p.add_argument('--hidden', type=int, default=256, help='hidden width of --head mlp')
    p.add_argument('--dropout', type=float, default=0.0, help='head dropout (keep 0 to compare process counts)')
    p.add_argument('--norm', default='auto', choices=['auto', 'model', 'zscore'])
    p.add_argument('--missing-bands', default='zeros', choices=['error', 'zeros'])
    p.add_argument('--image-size', type=int, default=None, help='resize inputs (default: native / fixed size)')
    p.add_argument('--epochs', type=int, default=10)
    p.add_argument('--batch-size', type=int, default=16, help='global batch size (over all processes)')
    p.add_argument('--lr', type=float, default=1e-3, help='head lr; backbone layers get lr * layer_decay^depth')
    p.add_argument('--layer-decay', type=float, default=0.75)
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--opt', default='adamw', choices=['adamw', 'sgd'],
                   help='sgd (momentum 0.9) keeps multi-process runs equal to one process to rounding')
    p.add_argument('--freeze-until', default=None, help='freeze the backbone up to this stage (int) or module')
    p.add_argument('--no-augment', action='store_true', help='no random flips')
    p.add_argument('--grad-checkpointing', action='store_true')
    p.add_argument('--max-steps', type=int, default=None, help='stop after this many optimiser steps (smoke runs)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='cpu', help='cpu, cuda or auto')
    p.add_argument('--out', default='finetune_classification_out')
    p.add_argument('--no-progress', action='store_true')
    return p.parse_args(argv)


def needed_keys(model_name: str) -> tuple:
    """Data modalities (s1 / s2) the model consumes, from its registered spec."""
    if ':' in model_name:
        return ('s2', 's1')
    spec = eobackbones.get_pretrained_cfg(model_name.split('.')[0]).input_spec
    keys = {C._SENSOR_KEY.get(m.sensor, m.name) for m in spec.modalities}
    return tuple(k for k in ('s2', 's1') if k in keys) or ('s2',)


def load_data(args: argparse.Namespace):
    from eobackbones.data.datasets import load_bigearthnet_mini, nan_policy
    keys = needed_keys(args.model)
    if args.dataset == 'bigearthnet-mini':
        data = load_bigearthnet_mini(keys)
    else:
        if args.root is None:
            raise SystemExit(f'error: --dataset {args.dataset} needs --root DIR (torchgeo layout)')
        from eobackbones.data import load_torchgeo
        data = load_torchgeo(args.dataset, args.root, modalities=keys, download=args.download,
                             max_per_split=args.max_per_split, seed=args.seed)
    # NaN samples: dropped, or kept for the preprocessing's NaN rule (statistics over valid pixels, 0 after
    # normalisation: transforms.for_model(nan='fill'))
    data, report = nan_policy(data, 'drop' if args.nan == 'drop' else 'keep')
    return data, report


@torch.no_grad()
def evaluate(model, rows, data, images, pre, spec, size, device, rank, world, batch_size) -> Dict[str, float]:
    from eobackbones.eval.metrics import multilabel_metrics
    model.eval()
    local = C.shard(rows, rank, world)
    outs = []
    for i in range(0, len(local), batch_size):
        x = C.model_input(pre, spec, images, local[i:i + batch_size], size, device=device)
        outs.append(model(x).float().cpu())
    k = data.num_classes
    logits = C.all_gather_rows(torch.cat(outs) if outs else torch.zeros(0, k))
    y = torch.from_numpy(data.labels[rows])
    if data.multilabel:
        loss = F.binary_cross_entropy_with_logits(logits, y.float()).item()
        m = multilabel_metrics(y.numpy(), logits.sigmoid().numpy())
        return dict(loss=loss, map_macro=m['map_macro'], map_micro=m['map_micro'])
    return dict(loss=F.cross_entropy(logits, y).item(), acc=float((logits.argmax(1) == y).float().mean()))


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    rank, world, device = C.setup_distributed(args.device)
    show = rank == 0 and not args.no_progress
    data, nan_report = load_data(args)
    k = data.num_classes

    torch.manual_seed(args.seed)  # same initial weights in every process (DDP also broadcasts rank 0's)
    bind = C.any_band_kwargs(args.model, data.bands)
    if args.head == 'linear':
        model = eobackbones.create_model(args.model, pretrained=args.pretrained, num_classes=k, drop_rate=args.dropout
                                         if args.dropout else None, **bind)
        backbone = model
    else:
        backbone = eobackbones.create_model(args.model, pretrained=args.pretrained, **bind)
        model = Classifier(backbone, ClassificationHead(backbone.num_features, k, hidden=args.hidden,
                                                        dropout=args.dropout))
    spec = backbone.input_spec
    train_rows = data.indices('train')
    images = C.for_model_keys(spec, data.images)
    pre, norm_used = C.input_plan(spec, C.for_model_keys(spec, data.bands), C.for_model_keys(spec, data.units),
                                  {m: x[train_rows] for m, x in images.items()}, args.norm, args.missing_bands)
    filled = {m: b for m, b in pre.filled.items() if b}
    size = C.target_size(spec, data.images[next(iter(data.images))].shape[-2:], args.image_size)
    x0 = C.model_input(pre, spec, images, train_rows[:1], size)
    unused = finetune.unreached_parameters(model, x0)
    for n, p in model.named_parameters():
        if n in unused:  # e.g. a contrastive projection head off the classification path
            p.requires_grad_(False)
    if args.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    model, core, groups, opt, sched = C.training_setup(model, args, len(train_rows), device, world)
    if rank == 0:
        print(f'{args.model} + {args.head} head: {sum(p.numel() for p in core.parameters()) / 1e6:.2f} M parameters, '
              f'{len(groups)} lr groups (layer decay {args.layer_decay}), input {size}, normalisation {norm_used}, '
              f'zero-filled bands {filled or "none"}, frozen as unused {len(unused)}, {world} process(es); '
              f'{data.name}: {len(train_rows)} train / {len(data.indices("val"))} val / {len(data.indices("test"))} '
              f'test, NaN policy {args.nan}' + (' (a smoke test, not a benchmark)' if args.dataset == 'bigearthnet-mini' else ''))

    labels = torch.from_numpy(data.labels)
    history, step, t0 = [], 0, time.time()
    for epoch in range(args.epochs):
        model.train()
        total_loss, n_seen = 0.0, 0
        batches = C.epoch_batches(len(train_rows), args.batch_size, epoch, args.seed, world, not args.no_augment)
        for pos, flips in C.progress(batches, show, desc=f'epoch {epoch + 1}/{args.epochs}', leave=False):
            rows = train_rows[pos]
            mine = C.shard(np.arange(len(rows)), rank, world)
            x = C.model_input(pre, spec, images, rows[mine], size, flips[mine], device)
            y = labels[rows[mine]].to(device)
            logits = model(x)
            if data.multilabel:  # the global batch mean over samples and classes
                loss = F.binary_cross_entropy_with_logits(logits, y.float(), reduction='sum') / (len(rows) * k)
            else:
                loss = F.cross_entropy(logits, y, reduction='sum') / len(rows)
            opt.zero_grad(set_to_none=True)
            (loss * world).backward()  # DDP averages over processes: the gradient of the global batch mean
            opt.step()
            sched.step()
            total_loss += float(C.all_reduce_sum(loss.detach().clone()))
            n_seen += 1
            step += 1
            if args.max_steps is not None and step >= args.max_steps:
                break
        val = evaluate(core, data.indices('val'), data, images, pre, spec, size, device, rank, world, args.batch_size)
        history.append(dict(epoch=epoch + 1, loss=total_loss / max(1, n_seen), **{f'val_{k_}': v for k_, v in val.items()}))
        if rank == 0:
            h = history[-1]
            shown = '  '.join(f'{k_[4:]} {v:.4f}' for k_, v in h.items() if k_.startswith('val_'))
            print(f'epoch {epoch + 1:3d}  loss {h["loss"]:.4f}  val {shown}  ({time.time() - t0:.0f} s)', flush=True)
        if args.max_steps is not None and step >= args.max_steps:
            break

    test = evaluate(core, data.indices('test'), data, images, pre, spec, size, device, rank, world, args.batch_size)
    final = dict(steps=step, train_loss=history[-1]['loss'], **{f'test_{k_}': v for k_, v in test.items()},
                 **{k_: v for k_, v in history[-1].items() if k_.startswith('val_')})
    if rank == 0:
        out = Path(args.out)
        core.save_pretrained(out, note=f'fine-tuned (classification) on {data.name} for {step} steps')
        (out / 'metrics.json').write_text(json.dumps(dict(
            args=vars(args), world_size=world, normalisation=norm_used, zero_filled=filled, nan_policy=nan_report,
            history=history, final=final), indent=2, default=str))
        shown = '  '.join(f'{k_[5:]} {v:.4f}' for k_, v in final.items() if k_.startswith('test_'))
        print(f'test {shown}' + ('  (31 test patches: a smoke test, not a benchmark)' if args.dataset == 'bigearthnet-mini' else ''))
        print('FINAL ' + json.dumps(final), flush=True)
        print(f'saved to {out}' + (f' (eobackbones.create_model("local-dir:{out}"))' if args.head == 'linear' else ''))
    C.cleanup_distributed()
    return final


if __name__ == '__main__':
    main()

"""Train eobackbones models with torchgeo's Lightning tasks (``ClassificationTask``, ``SemanticSegmentationTask``).

torchgeo (0.8) builds its models by name: ``ClassificationTask`` calls ``timm.create_model(model, num_classes=,
in_chans=, pretrained=)`` and ``SemanticSegmentationTask`` builds a segmentation_models_pytorch model
(``unet``, ``deeplabv3+``, ``upernet``, ``segformer``, ``dpt``) around the smp encoder named ``backbone``. Every
eobackbones architecture is in timm's registry as ``eob_<arch>``, so fixed-band models need no code at all:

    ClassificationTask(model='eob_dualsimclr_resnet18_s2', in_channels=13, num_classes=10)
    SemanticSegmentationTask(model='unet', backbone='tu-eob_dualsimclr_resnet18_s2', in_channels=13, num_classes=4)

(``in_channels`` must equal the model's band count; ``weights=True`` loads the default tag). Channel counts do not
say which bands they are, so DOFA (bound to any bands) needs the tasks below, which override
``configure_models``; everything else (losses, metrics, optimiser, schedulers, logging, the Lightning ``Trainer``)
stays torchgeo's:

    task = EOSegmentationTask(model='upernet', backbone='dofa_base', num_classes=3, in_channels=10,
                              ignore_index=255, lr=1e-4, backbone_kwargs=dict(bands=[...]))
    lightning.Trainer(max_epochs=10).fit(task, datamodule=...)

``EOSegmentationTask`` reads ``model`` as our decoder name (``fpn``, ``upernet``, ``unet``) and ``backbone`` as an
eobackbones name; ``weights=True`` loads the backbone's default pretrained tag. ``in_channels`` is not used:
channels come from the model's bands (DOFA: ``backbone_kwargs=dict(bands=[...])``).

Run ``python examples/torchgeo_tasks.py`` for a few Lightning steps on the embedded PASTIS-R mini set (a smoke
test, not a benchmark).
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

import torch
from torchgeo.trainers import ClassificationTask, SemanticSegmentationTask

import eobackbones
from eobackbones import create_segmentation_model


class EOClassificationTask(ClassificationTask):
    """torchgeo's ClassificationTask with an eobackbones model (``model`` = an eobackbones name).

    Extra keyword: ``backbone_kwargs`` (e.g. ``dict(bands=[...])`` for DOFA).
    """

    def __init__(self, *args: Any, backbone_kwargs: Optional[Dict[str, Any]] = None, **kwargs: Any):
        self._backbone_kwargs = dict(backbone_kwargs or {})
        super().__init__(*args, **kwargs)

    def configure_models(self) -> None:
        self.model = eobackbones.create_model(
            self.hparams['model'], pretrained=self.weights is True,
            num_classes=self.hparams['num_classes'] or self.hparams['num_labels'] or 1, **self._backbone_kwargs)
        if self.hparams['freeze_backbone']:
            from eobackbones import finetune
            finetune.freeze(self.model)


class EOSegmentationTask(SemanticSegmentationTask):
    """torchgeo's SemanticSegmentationTask with ``create_segmentation_model(backbone, decoder=model)``.

    Extra keywords: ``backbone_kwargs``, ``decoder_kwargs``.
    """

    def __init__(self, *args: Any, backbone_kwargs: Optional[Dict[str, Any]] = None,
                 decoder_kwargs: Optional[Dict[str, Any]] = None, **kwargs: Any):
        self._backbone_kwargs = dict(backbone_kwargs or {})
        self._decoder_kwargs = dict(decoder_kwargs or {})
        super().__init__(*args, **kwargs)

    def configure_models(self) -> None:
        self.model = create_segmentation_model(
            self.hparams['backbone'], self.hparams['num_classes'] or self.hparams['num_labels'] or 1,
            decoder=self.hparams['model'], pretrained=self.weights is True, decoder_kwargs=self._decoder_kwargs,
            **self._backbone_kwargs)
        if self.hparams['freeze_backbone']:
            from eobackbones import finetune
            finetune.freeze(self.model)


def main(argv: Optional[List[str]] = None) -> None:
    import lightning
    from torch.utils.data import DataLoader

    from eobackbones.data.segmentation import load_pastis_mini

    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--backbone', default='dualsimclr_resnet18_s2')
    p.add_argument('--decoder', default='unet', choices=['fpn', 'upernet', 'unet'])
    p.add_argument('--max-steps', type=int, default=20)
    args = p.parse_args(argv)

    data = load_pastis_mini(('s2',))
    spec = eobackbones.create_model(args.backbone).input_spec
    pre = eobackbones.transforms.for_model(spec.replace_modality(spec.modalities[0].name, normalization=()),
                                           source_bands=list(data.bands['s2']), missing_bands='zeros',
                                           allow_unnormalised=True)  # z-scored below
    x = torch.from_numpy(data.images['s2'])
    x = pre((x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True))  # dataset z-score, model bands
    samples = {split: [dict(image=x[i], mask=torch.from_numpy(data.masks[i])) for i in data.indices(split)]
               for split in ('train', 'val')}
    task = EOSegmentationTask(model=args.decoder, backbone=args.backbone, num_classes=data.num_classes,
                              ignore_index=data.ignore_index, lr=1e-3)
    trainer = lightning.Trainer(max_steps=args.max_steps, accelerator='cpu', logger=False, enable_checkpointing=False,
                                log_every_n_steps=1)
    # drop_last: a last batch of one 32 px patch leaves the ResNet's stride-32 BatchNorm a single value per channel
    trainer.fit(task, train_dataloaders=DataLoader(samples['train'], batch_size=2, shuffle=True, drop_last=True),
                val_dataloaders=DataLoader(samples['val'], batch_size=2))  # torchgeo's scheduler monitors val_loss


if __name__ == '__main__':
    main()

"""Classification heads over pooled backbone features (``model.forward_head(x, pre_logits=True)``).

:class:`ClassificationHead` is the head to use: linear, or an MLP with one hidden layer, returning logits;
single- versus multi-label is a choice of loss (cross-entropy versus BCE-with-logits), not of the head.

:class:`ClassifierHead` is the older variant that also carries its loss and activation (SSLTransformerRS
fine-tunes a linear layer over ``concat(pooled_s1, pooled_s2)`` for SEN12MS / DFC2020 scene
classification); kept for existing callers.
"""
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InvalidInputError

__all__ = ['ClassificationHead', 'ClassifierHead']


class ClassificationHead(nn.Module):
    """Logits from a pooled feature: ``Dropout -> Linear`` or ``Dropout -> Linear -> GELU -> Dropout -> Linear``.

    Args:
        in_features: width of the pooled feature (``model.num_features``; a pair model's is S1 + S2).
        num_classes: outputs (logits; apply softmax / sigmoid in the loss or at prediction time).
        hidden: width of the hidden layer; None: a linear head.
        dropout: dropout on the input feature (and after the hidden activation).
    """

    def __init__(self, in_features: int, num_classes: int, hidden: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        if in_features <= 0 or num_classes <= 0 or (hidden is not None and hidden <= 0):
            raise ValueError(f'in_features, num_classes and hidden must be positive, got {in_features}, '
                             f'{num_classes}, {hidden}')
        self.in_features = in_features
        self.num_classes = num_classes
        self.hidden = hidden
        self.drop = nn.Dropout(dropout)
        if hidden:
            self.fc1 = nn.Linear(in_features, hidden)
            self.act = nn.GELU()
            self.drop1 = nn.Dropout(dropout)
            self.fc = nn.Linear(hidden, num_classes)
        else:
            self.fc = nn.Linear(in_features, num_classes)

    @classmethod
    def for_model(cls, model: nn.Module, num_classes: int, **kwargs) -> 'ClassificationHead':
        """A head sized for ``model.forward_head(x, pre_logits=True)`` (``model.num_features``)."""
        return cls(model.num_features, num_classes, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) from pooled features (B, in_features)."""
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise InvalidInputError(f'expected pooled features (B, {self.in_features}), got {tuple(x.shape)}')
        x = self.drop(x)
        if self.hidden:
            x = self.drop1(self.act(self.fc1(x)))
        return self.fc(x)


class ClassifierHead(nn.Module):
    """Linear or one-hidden-layer MLP classifier; single-label (softmax) or multi-label (sigmoid).

    Args:
        in_features: width of the pooled feature (``model.num_features``; a pair model's is S1 + S2).
        num_classes: outputs.
        hidden_dim: width of a hidden layer (Linear -> ReLU -> Dropout -> Linear); None: a linear head.
        dropout: dropout on the input feature (and after the hidden layer).
        multilabel: ``predict`` applies a sigmoid and ``loss`` is binary cross-entropy (else softmax / CE).
    """

    def __init__(
            self,
            in_features: int,
            num_classes: int,
            hidden_dim: Optional[int] = None,
            dropout: float = 0.,
            multilabel: bool = False,
    ):
        super().__init__()
        if in_features <= 0 or num_classes <= 0:
            raise ValueError(f'in_features and num_classes must be positive, got {in_features}, {num_classes}')
        self.in_features = in_features
        self.num_classes = num_classes
        self.multilabel = multilabel
        self.drop = nn.Dropout(dropout)
        if hidden_dim:
            self.mlp = nn.Sequential(nn.Linear(in_features, hidden_dim), nn.ReLU(inplace=True), nn.Dropout(dropout))
            self.fc = nn.Linear(hidden_dim, num_classes)
        else:
            self.mlp = nn.Identity()
            self.fc = nn.Linear(in_features, num_classes)

    @classmethod
    def for_model(cls, model: nn.Module, num_classes: int, **kwargs) -> 'ClassifierHead':
        """A head sized for ``model.forward_head(x, pre_logits=True)``."""
        return cls(model.num_features, num_classes, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) from pooled features (B, in_features)."""
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise InvalidInputError(f'expected pooled features (B, {self.in_features}), got {tuple(x.shape)}')
        return self.fc(self.mlp(self.drop(x)))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities: sigmoid per class (multi-label) or softmax."""
        logits = self.forward(x)
        return logits.sigmoid() if self.multilabel else logits.softmax(-1)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """BCE-with-logits over a multi-hot (B, K) target (multi-label) or CE over class indices (B,)."""
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))
        return F.cross_entropy(logits, target.long())

"""Classification heads over pooled backbone features (e.g. the concatenated S1 + S2 features of a pair).

SSLTransformerRS fine-tunes a linear layer over ``concat(pooled_s1, pooled_s2)`` for SEN12MS / DFC2020
scene classification (single- and multi-label); :class:`ClassifierHead` is that layer, with an optional
hidden MLP layer.
"""
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ['ClassifierHead']


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
            raise ValueError(f'expected pooled features (B, {self.in_features}), got {tuple(x.shape)}')
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

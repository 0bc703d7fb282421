"""Pretraining on the cloud's public data: MistNet assumes the head arrives pretrained."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("mistnet.cloud.pretrain")


def pretrain_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 0.05,
    seed: int = 0,
) -> float:
    """Full-precision supervised training; returns the final epoch's training accuracy."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    accuracy = 0.0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images))
        correct = 0
        for start in range(0, len(images), batch_size):
            idx = order[start : start + batch_size]
            out = model(images[idx])
            loss = F.cross_entropy(out, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += int((out.argmax(1) == labels[idx]).sum())
        accuracy = correct / len(images)
        log.debug("pretrain epoch %d accuracy %.3f", epoch + 1, accuracy)
    return accuracy

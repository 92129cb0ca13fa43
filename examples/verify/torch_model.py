"""A user's PyTorch model: a small LeNet-like CNN with BatchNorm and dropout."""

import torch
from torch import nn


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 5, padding=2), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 5), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(16 * 5 * 5, 64),
                                  nn.GELU(), nn.Linear(64, 10))

    def forward(self, x):  # x: (batch, 1, 28, 28)
        return self.head(self.features(x))


def make():
    torch.manual_seed(0)
    return Classifier()

"""The optimisers (SGD, Adam, AdamW, with PyTorch's formulas) and the learning-rate schedules."""

from ddptrain.optim.optimizers import OPTIMIZERS, SGD, Adam, AdamW

__all__ = ["OPTIMIZERS", "SGD", "Adam", "AdamW"]

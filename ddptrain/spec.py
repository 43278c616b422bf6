"""The --model grammar: an MLP in one word, such as ``784-512-bn-drop0.2-256-bn-10``.

Tokens joined by ``-``:

* a number is a layer size: the first is the input (pixels per image), the
  last the output (classes), and each one between is a hidden ``Linear``
  layer followed by a ``ReLU``;
* ``bn`` right after a hidden size puts a ``BatchNorm`` after that Linear
  layer, before its ReLU (the Linear layer then has no bias: the
  normalisation would cancel it);
* ``drop<p>`` after a hidden size (and its ``bn``) puts a ``Dropout`` with
  probability ``p`` (0 <= p < 1) after that layer's ReLU.

The model starts with ``Flatten`` (images to rows) and ends with the output
Linear layer's logits. Hidden layers use He initialisation, the output layer
Glorot's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple

from .errors import UserError

GRAMMAR = ("layer sizes joined by '-', input first and classes last, a hidden size optionally followed by 'bn' "
           "(batch normalisation) and 'drop<p>' (dropout), such as 784-512-256-10 or 784-512-bn-drop0.2-256-bn-10")
_SIZE = re.compile(r"[0-9]+")
_DROP = re.compile(r"drop([0-9]*\.?[0-9]+)")


@dataclass(frozen=True)
class HiddenLayer:
    size: int
    batchnorm: bool = False
    dropout: Optional[float] = None

    def __str__(self):
        return "-".join([str(self.size)] + ["bn"] * self.batchnorm
                        + ([f"drop{self.dropout:g}"] if self.dropout is not None else []))


@dataclass(frozen=True)
class MLPSpec:
    n_inputs: int
    hidden: Tuple[HiddenLayer, ...]
    n_outputs: int

    def __str__(self):
        return "-".join([str(self.n_inputs), *map(str, self.hidden), str(self.n_outputs)])

    def sizes(self):
        """The layer sizes, input first: ``[784, 512, 256, 10]``."""
        return [self.n_inputs, *(layer.size for layer in self.hidden), self.n_outputs]

    def layers(self):
        """The layers, in order: Flatten, then per hidden layer Linear, [BatchNorm], ReLU, [Dropout]; Linear."""
        from .dropout import Dropout
        from .nn import Flatten, Linear, ReLU
        from .normalization import BatchNorm
        layers, n_in = [Flatten()], self.n_inputs
        for layer in self.hidden:
            layers.append(Linear(n_in, layer.size, init="he", bias=not layer.batchnorm))
            if layer.batchnorm:
                layers.append(BatchNorm(layer.size))
            layers.append(ReLU())
            if layer.dropout is not None:
                layers.append(Dropout(layer.dropout))
            n_in = layer.size
        layers.append(Linear(n_in, self.n_outputs, init="glorot"))
        return layers


def parse_spec(spec):
    """The MLPSpec of a --model string, or a UserError naming the token that is wrong."""
    text = str(spec)
    tokens = text.split("-")

    def refuse(problem):
        raise UserError(f"--model {text!r}: {problem}; expected {GRAMMAR}")

    if not _SIZE.fullmatch(tokens[0]):
        refuse(f"it must start with the input size, not {tokens[0]!r}")
    sizes, hidden = [int(tokens[0])], []
    current = None   # the hidden layer the bn/drop tokens apply to
    for position, token in enumerate(tokens[1:], start=1):
        if _SIZE.fullmatch(token):
            if current is not None:
                hidden.append(current)
            sizes.append(int(token))
            current = HiddenLayer(int(token))
        elif token == "bn":
            if current is None or current.batchnorm or current.dropout is not None:
                refuse("'bn' must follow a hidden layer size directly (it puts a BatchNorm after that Linear "
                       "layer, before its ReLU)")
            current = HiddenLayer(current.size, batchnorm=True)
        elif token.startswith("drop"):
            match = _DROP.fullmatch(token)
            if match is None or not 0 <= float(match.group(1)) < 1:
                refuse(f"{token!r} is not a dropout probability in [0, 1), such as drop0.2")
            if current is None or current.dropout is not None:
                refuse(f"{token!r} must follow a hidden layer size (or its 'bn')")
            current = HiddenLayer(current.size, current.batchnorm, float(match.group(1)))
        else:
            refuse(f"{token!r} (token {position + 1}) is not a layer size, 'bn' or 'drop<p>'")
    if current is None:
        refuse("it needs at least an input and an output size")
    if current.batchnorm or current.dropout is not None:
        refuse(f"it must end with the output size, not {tokens[-1]!r}")
    if any(size <= 0 for size in sizes):
        refuse("every layer size must be positive")
    return MLPSpec(n_inputs=sizes[0], hidden=tuple(hidden), n_outputs=current.size)

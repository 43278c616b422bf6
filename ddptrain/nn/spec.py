"""The --model grammar: a network in one word, an MLP or a CNN, or the name of a ready-made one.

Tokens joined by ``-``, read left to right:

* ``<n>``, a number: a fully connected layer of ``n`` outputs followed by a
  ``ReLU``; the last number is the output layer (one output per class, no
  ReLU: logits). In an **MLP** the first number is the input size (pixels per
  image), as in ``784-512-256-10``;
* ``conv<F>k<K>``, optionally followed by ``s<S>`` and ``p<P>``: a
  convolution with ``F`` filters of ``K x K`` pixels, stride ``S`` (default
  1) and ``P`` zeros of padding around the image (default 0, as in PyTorch;
  ``p1`` keeps the size of a ``k3`` convolution), followed by a ``ReLU``:
  ``conv32k3p1``, ``conv64k5s2p2``;
* ``maxpool<K>`` / ``avgpool<K>``, optionally followed by ``s<S>``: max or
  average pooling over ``K x K`` windows, stride ``S`` (default ``K``). Right
  after a convolution's ReLU, max pooling is put before that ReLU: the same
  function and gradient (max and ReLU commute), with the ReLU on the smaller
  array;
* ``flatten``: images to rows, once, between the last convolution or pooling
  and the first fully connected layer;
* ``bn`` right after a layer size or a convolution puts a ``BatchNorm``
  before its ReLU (and that layer has no bias: the normalisation would
  cancel it); ``drop<p>`` after it (and its ``bn``) a ``Dropout`` of
  probability ``p`` after the ReLU.

A **CNN** starts with a convolution or pooling; its input is the data's
images (``C x H x W``; ``H x W`` images get one channel), and every layer's
size follows from the one before, so ``conv32k3-bn-maxpool2-flatten-128-10``
needs no input size. A token that does not fit the shape it receives is
refused with one line naming the token and the shape.

Named models are shorthands for a spec, with training defaults of their own
(``NAMED_MODELS``): ``--model cnn``, ``--model cnn-fast``, ``--model lenet5``. Fully connected
layers use He initialisation, the output layer Glorot's; convolutions He's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Tuple

from ddptrain.errors import UserError
from ddptrain.nn.conv import Conv2d
from ddptrain.nn.dropout import Dropout
from ddptrain.nn.layer import ShapeError
from ddptrain.nn.layers import Flatten, Linear, ReLU
from ddptrain.nn.normalization import BatchNorm
from ddptrain.nn.pooling import AvgPool2d, MaxPool2d

GRAMMAR = ("tokens joined by '-': layer sizes (an MLP starts with its input size: 784-512-256-10), "
           "conv<F>k<K>[s<S>][p<P>], maxpool<K>[s<S>], avgpool<K>[s<S>], flatten, and after a size "
           "or conv 'bn' (batch normalisation) and 'drop<p>' (dropout), such as "
           "conv32k3p1-bn-maxpool2-flatten-128-10; or a named model (cnn, cnn-fast, lenet5)")
_SIZE = re.compile(r"[0-9]+")
_DROP = re.compile(r"drop([0-9]*\.?[0-9]+)")
_CONV = re.compile(r"conv([0-9]+)k([0-9]+)(?:s([0-9]+))?(?:p([0-9]+))?")
_POOL = re.compile(r"(max|avg)pool([0-9]+)(?:s([0-9]+))?")


@dataclass(frozen=True)
class NamedModel:
    spec: str
    about: str
    # training options (Config fields) unless set otherwise
    defaults: dict = field(default_factory=dict)


NAMED_MODELS = {
    "cnn": NamedModel(
        "conv16k5-bn-maxpool2-conv32k5-bn-maxpool2-flatten-128-drop0.3-10",
        "two 5x5 convolutions (16 and 32 filters) with batch normalisation and max pooling, then "
        "128 units with dropout: at least 99.3% test accuracy on MNIST with its defaults",
        {"epochs": 20, "batch_size": 128, "lr": 0.05, "momentum": 0.9, "nesterov": True,
         "weight_decay": 5e-4, "lr_schedule": "cosine"}),
    # the same network in a quarter of the epochs: one epoch of warmup to a higher peak, then
    # cosine to 0 (one cycle); docs/cnn.md's "99.3% in half a minute" has the runs
    "cnn-fast": NamedModel(
        "conv16k5-bn-maxpool2-conv32k5-bn-maxpool2-flatten-128-drop0.3-10",
        "cnn's network trained in 4 epochs, one of warmup then cosine: 99.3% test accuracy on "
        "MNIST in under a minute on 2 ranks",
        {"epochs": 4, "batch_size": 128, "lr": 0.2, "warmup_epochs": 1, "momentum": 0.9,
         "nesterov": True, "weight_decay": 5e-4, "lr_schedule": "cosine"}),
    "lenet5": NamedModel(
        "conv6k5p2-avgpool2-conv16k5-avgpool2-flatten-120-84-10",
        "LeCun et al. (1998), with ReLU: 5x5 convolutions and average pooling, then 120 and 84 "
        "units",
        {"epochs": 10, "batch_size": 128, "lr": 0.05, "momentum": 0.9}),
}


@dataclass(frozen=True)
class Token:
    """One layer of the spec (with its bn and dropout, for sizes and convolutions)."""

    kind: str                       # "size", "conv", "maxpool", "avgpool", "flatten"
    size: int = 0                   # outputs (size) or filters (conv)
    kernel: int = 0
    stride: int = 1
    padding: int = 0
    batchnorm: bool = False
    dropout: Optional[float] = None

    def __str__(self):
        if self.kind == "size":
            text = str(self.size)
        elif self.kind == "conv":
            text = (f"conv{self.size}k{self.kernel}"
                    + (f"s{self.stride}" if self.stride != 1 else "")
                    + (f"p{self.padding}" if self.padding else ""))
        elif self.kind in ("maxpool", "avgpool"):
            text = f"{self.kind}{self.kernel}" + (f"s{self.stride}"
                                                  if self.stride != self.kernel else "")
        else:
            text = self.kind
        return "-".join([text] + ["bn"] * self.batchnorm
                        + ([f"drop{self.dropout:g}"] if self.dropout is not None else []))


@dataclass(frozen=True)
class ModelSpec:
    """A parsed --model: its tokens, and the named model it came from, if any."""

    tokens: Tuple[Token, ...]
    name: Optional[str] = None

    def __str__(self):
        return "-".join(map(str, self.tokens))

    @property
    def is_mlp(self):
        return self.tokens[0].kind == "size"

    def describe(self):
        """``cnn (conv32k3p1-...)`` for a named model, the spec itself otherwise."""
        return f"{self.name} ({self})" if self.name else str(self)

    def layers(self, input_shape=None):
        """The layers, in order. ``input_shape``: one sample's shape (CNNs need it; an MLP's is its
        first size).

        ShapeError (a UserError) naming the token that does not fit the shape it receives.
        """
        tokens = self.tokens
        if self.is_mlp:
            shape, tokens, layers = (tokens[0].size,), tokens[1:], [Flatten()]
        else:
            if input_shape is None:
                raise ValueError("a CNN spec needs the input shape (C, H, W) to be built")
            shape, layers = tuple(input_shape), []
            if len(shape) == 2:
                shape = (1, *shape)
        for position, token in enumerate(tokens):
            made, problem = [], _misfit(token, shape)
            if problem is None:
                try:
                    made = self._token_layers(token, shape, last=position == len(tokens) - 1)
                    received = shape
                    for layer in made:
                        received = layer.output_shape(received)
                except ShapeError as error:
                    problem = str(error)
            if problem is not None:
                raise ShapeError(f"--model {self}: {str(token).split('-')[0]!r} "
                                 f"(token {position + 1 + self.is_mlp}) does not fit its input of "
                                 f"{_shape(shape)}: {problem}")
            if token.kind == "maxpool" and layers and isinstance(layers[-1], ReLU):
                # ReLU then max pooling is built as max pooling then ReLU: max and ReLU commute,
                # values and gradients alike (the largest value of a window is the one ReLU keeps
                # largest), and the ReLU then runs on an array k * k times smaller.
                made, layers = made + [layers[-1]], layers[:-1]
            layers.extend(made)
            shape = received
        return layers

    @staticmethod
    def _token_layers(token, shape, last):
        """The layers of one token for an input sample of ``shape``."""
        if token.kind == "size":
            made = [Linear(shape[0], token.size, init="glorot" if last else "he",
                           bias=not token.batchnorm)]
        elif token.kind == "conv":
            made = [Conv2d(shape[0], token.size, token.kernel, stride=token.stride,
                           padding=token.padding, bias=not token.batchnorm)]
        elif token.kind == "flatten":
            made = [Flatten()]
        else:
            made = [(MaxPool2d if token.kind == "maxpool"
                     else AvgPool2d)(token.kernel, stride=token.stride)]
        if token.batchnorm:
            made.append(BatchNorm(token.size))
        if token.kind in ("size", "conv") and not last:
            made.append(ReLU())
        if token.dropout is not None:
            made.append(Dropout(token.dropout))
        return made


def _misfit(token, shape):
    """None, or why a token cannot take a sample of ``shape`` (before its layer's own check)."""
    if token.kind == "size" and len(shape) != 1:
        return "a fully connected layer takes rows: put 'flatten' before it"
    if token.kind in ("conv", "maxpool", "avgpool", "flatten") and len(shape) != 3:
        return f"{token.kind} takes images (C x H x W), and its input is already flat"
    return None


def _shape(shape):
    return "x".join(map(str, shape))


def named_model(text):
    """The NamedModel called ``text``, or None."""
    return NAMED_MODELS.get(str(text))


def parse_spec(spec):
    """The ModelSpec of a --model string (or name), or a UserError naming the token that is
    wrong."""
    text = str(spec)
    named = named_model(text)
    if named is not None:
        parsed = parse_spec(named.spec)
        return ModelSpec(parsed.tokens, name=text)
    words = text.split("-")

    def refuse(problem):
        raise UserError(f"--model {text!r}: {problem}; expected {GRAMMAR}")

    tokens, current = [], None   # current: the size or conv that bn/drop tokens apply to
    for position, word in enumerate(words, start=1):
        conv, pool = _CONV.fullmatch(word), _POOL.fullmatch(word)
        if word == "bn":
            if current is None or current.batchnorm or current.dropout is not None:
                refuse(f"'bn' (token {position}) must follow a layer size or a convolution "
                       "directly (it puts a BatchNorm before its ReLU)")
            current = Token(**{**current.__dict__, "batchnorm": True})
            tokens[-1] = current
            continue
        if word.startswith("drop"):
            match = _DROP.fullmatch(word)
            if match is None or not 0 <= float(match.group(1)) < 1:
                refuse(f"{word!r} (token {position}) is not a dropout probability in [0, 1), "
                       "such as drop0.2")
            if current is None or current.dropout is not None:
                refuse(f"{word!r} (token {position}) must follow a layer size or a convolution "
                       "(or its 'bn')")
            current = Token(**{**current.__dict__, "dropout": float(match.group(1))})
            tokens[-1] = current
            continue
        if _SIZE.fullmatch(word):
            current = Token("size", size=int(word))
            if current.size <= 0:
                refuse(f"layer sizes must be positive, not {word!r} (token {position})")
        elif conv:
            filters, kernel, stride, padding = (int(g) if g is not None else None
                                                for g in conv.groups())
            current = Token("conv", size=filters, kernel=kernel, stride=stride or 1,
                            padding=padding or 0)
            if filters <= 0 or kernel <= 0 or stride == 0:
                refuse(f"{word!r} (token {position}): filters, kernel size and stride "
                       "must be positive")
        elif pool:
            kind, kernel, stride = pool.group(1) + "pool", int(pool.group(2)), pool.group(3)
            tokens.append(Token(kind, kernel=kernel,
                                stride=kernel if stride is None else int(stride)))
            current = None
            if kernel <= 0 or stride == "0" or (stride and int(stride) <= 0):
                refuse(f"{word!r} (token {position}): kernel size and stride must be positive")
            continue
        elif word == "flatten":
            tokens.append(Token("flatten"))
            current = None
            continue
        else:
            refuse(f"{word!r} (token {position}) is not a layer size, conv<F>k<K>, maxpool<K>, "
                   "avgpool<K>, flatten, 'bn' or 'drop<p>'")
        tokens.append(current)
    _check_order(tokens, words, refuse)
    return ModelSpec(tuple(tokens))


def _check_order(tokens, words, refuse):
    """The order rules a single token cannot see: input first, flatten between conv and sizes,
    classes last."""
    if not tokens:
        refuse("it is empty")
    first, last = tokens[0], tokens[-1]
    if first.kind == "flatten":
        refuse("it must start with the input size (an MLP) or a convolution or pooling (a CNN), "
               "not 'flatten'")
    if last.kind != "size" or last.batchnorm or last.dropout is not None:
        refuse(f"it must end with the output size (the number of classes), not {words[-1]!r}")
    if first.kind == "size":
        if first.batchnorm or first.dropout is not None:
            refuse("the input size cannot take 'bn' or 'drop<p>'")
        if len(tokens) < 2:
            refuse("it needs at least an input and an output size")
        if any(token.kind != "size" for token in tokens):
            refuse("an MLP (it starts with its input size) holds only layer sizes; a CNN starts "
                   "with conv or pool")
        return
    flattens = [i for i, token in enumerate(tokens) if token.kind == "flatten"]
    sizes = [i for i, token in enumerate(tokens) if token.kind == "size"]
    if len(flattens) != 1 or flattens[0] > sizes[0]:
        refuse("a CNN needs one 'flatten' between its last convolution or pooling and its "
               "first layer size")
    if any(token.kind != "size" for token in tokens[flattens[0] + 1:]):
        refuse("after 'flatten' come only layer sizes (convolutions and pooling go before it)")

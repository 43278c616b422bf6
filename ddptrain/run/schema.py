"""A small declarative description of JSON values (types and ranges), checked in one pass.

A checkpoint's metadata is JSON that a hostile file may fill with anything: a
string where a step belongs, 1e30, a list nested ten thousand deep. Rather
than a check at each place a value is used, the expected structure is written
down once (``checkpoint_contents.py``) and ``problems`` lists every place that
departs from it, each as one short phrase naming the place: ``state.step must
be an integer from 0 to 9007199254740992, got '7'``.

The check follows the *schema*, never the value: it only descends where the
schema describes a container, so its depth is the schema's, however deep the
value nests.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass

LARGEST_INTEGER = 2 ** 53   # integers above lose their exactness in JSON readers


@dataclass(frozen=True)
class Integer:
    low: int = 0
    high: int = LARGEST_INTEGER

    def problem(self, value):
        if type(value) is not int or not self.low <= value <= self.high:
            return f"must be an integer from {self.low} to {self.high}"
        return None


@dataclass(frozen=True)
class Number:
    """A finite float (or an integer), in [low, high]."""

    low: float = -math.inf
    high: float = math.inf

    def problem(self, value):
        if (type(value) not in (int, float) or not math.isfinite(value)
                or not self.low <= value <= self.high):
            return f"must be a finite number from {self.low:g} to {self.high:g}"
        return None


@dataclass(frozen=True)
class Text:
    pattern: str = r"(?s).*"
    max_length: int = 10_000
    what: str = "a string"

    def problem(self, value):
        if (type(value) is not str or len(value) > self.max_length
                or not re.fullmatch(self.pattern, value)):
            return f"must be {self.what}"
        return None


@dataclass(frozen=True)
class Boolean:
    def problem(self, value):
        return None if type(value) is bool else "must be true or false"


@dataclass(frozen=True)
class OneOf:
    """Any of ``choices`` (schemas, or None for JSON's null)."""

    choices: tuple
    what: str

    def problem(self, value):
        for choice in self.choices:
            if (value is None) if choice is None else choice.problem(value) is None:
                return None
        return f"must be {self.what}"


SCALAR = OneOf((Number(), Text(), Boolean(), None), "a number, a string, true, false or null")


@dataclass(frozen=True)
class Record:
    """A JSON object with these keys; ``optional`` keys may be absent; other keys are refused,
    unless ``others`` (a schema) describes them."""

    keys: dict
    optional: tuple = ()
    others: object = None


@dataclass(frozen=True)
class ListOf:
    item: object
    min_length: int = 0
    max_length: int = 1_000_000


@dataclass(frozen=True)
class MapOf:
    """A JSON object whose keys are any strings and whose values all match ``value``."""

    value: object
    max_length: int = 10_000


def problems(value, schema, where):
    """Every departure of ``value`` from ``schema``, one phrase each, in the order found."""
    found = []
    pending = deque([(value, schema, where)])
    while pending:
        value, schema, where = pending.popleft()
        if isinstance(schema, Record):
            if not isinstance(value, dict):
                found.append(f"{where} must be an object, got {_shown(value)}")
                continue
            missing = [key for key in schema.keys
                       if key not in value and key not in schema.optional]
            found += [f"{where}.{key} is missing" for key in missing]
            for key, item in value.items():
                expected = schema.keys.get(key, schema.others)
                if expected is None:
                    found.append(f"{where} holds an unexpected key {_shown(key)}")
                else:
                    pending.append((item, expected, f"{where}.{key}"))
        elif isinstance(schema, (ListOf, MapOf)):
            kind = list if isinstance(schema, ListOf) else dict
            low = schema.min_length if isinstance(schema, ListOf) else 0
            if not isinstance(value, kind) or not low <= len(value) <= schema.max_length:
                noun = "a list" if kind is list else "an object"
                found.append(f"{where} must be {noun} of {low} to {schema.max_length} items, got "
                             f"{_shown(value)}")
                continue
            items = enumerate(value) if kind is list else value.items()
            pending.extend((item, schema.item if kind is list else schema.value,
                            f"{where}[{key!r}]") for key, item in items)
        else:
            problem = schema.problem(value)
            if problem:
                found.append(f"{where} {problem}, got {_shown(value)}")
    return found


def _shown(value, width=40):
    """A value as a message quotes it: its type for a container (whose text may be huge or
    deep), else its repr, shortened."""
    if isinstance(value, (list, dict)):
        return f"{'a list' if isinstance(value, list) else 'an object'} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."

"""Declared settings: each config dataclass states, beside each field, the values it accepts.

A field declared with :func:`knob` carries its bounds (``ge``, ``gt``, ``le``, ``lt``), its ``choices`` or an
extra ``check``; its type comes from the annotation (int, float, bool, str, ``X | None``, ``tuple[int, ...]``).
Floats must be finite unless the knob says ``nonfinite=True``. A field without a knob is still type-checked.

- :func:`validate` checks a config instance (each config's ``__post_init__`` calls it, so the library API is
  protected as well as the command line);
- :func:`parse_options` turns ``-o NAME=VALUE`` strings into typed values of a config class, checked;
- :func:`check_option` checks one command-line option against bounds.

Every failure is a :class:`~hetcomp.data.errors.HetCompError` whose one-line message names the setting, the
value it got and what it accepts, e.g. ``-o period=abc: period of hetcomp must be an integer ≥ 1 (got 'abc')``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
import types
import typing
from collections.abc import Callable
from functools import cache

from hetcomp.errors import HetCompError

_INT = re.compile(r"[+-]?\d+")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclasses.dataclass(frozen=True)
class Knob:
    """What one setting accepts besides its type: bounds, exact choices, an extra check."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    nonfinite: bool = False  # True: nan / ±inf are valid values of this float
    check: Callable | None = None  # called with the value once type and bounds pass; raises HetCompError
    #: a setting added after runs were made without it, whose default is the behaviour from before it existed:
    #: left out of a run's identity while at that default (:func:`identity_settings`), so adding it reruns nothing
    added_later: bool = False

    def bounds(self) -> str:
        """e.g. ``≥ 1``, ``> 0``, ``≥ 0 and < 1`` ('' when unbounded)."""
        parts = [f"{sign} {_number(limit)}" for sign, limit in
                 (("≥", self.ge), (">", self.gt), ("≤", self.le), ("<", self.lt)) if limit is not None]
        return " and ".join(parts)

    def within(self, value) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return self.nonfinite
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))


def knob(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, **spec):
    """A dataclass field with its accepted values, e.g. ``period: int = knob(10, ge=1)``."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"knob": Knob(**spec)})


def identity_settings(config) -> dict:
    """A config's settings as a run's identity holds them: every field, except an ``added_later`` one at its
    default (runs made before it existed had that behaviour and keep their identity)."""
    knobs = _fields(type(config))
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    return {name: value for name, value in dataclasses.asdict(config).items()
            if not (knobs[name][1].added_later and name in defaults and value == defaults[name])}


def _number(value) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


@cache
def _fields(config_class: type) -> dict[str, tuple[object, Knob]]:
    """Each field's resolved type and knob; a subclass that only changes a default keeps its base's knob."""
    hints = typing.get_type_hints(config_class)
    out = {}
    for field in dataclasses.fields(config_class):
        spec = next((f.metadata["knob"] for base in config_class.__mro__ if dataclasses.is_dataclass(base)
                     for f in dataclasses.fields(base) if f.name == field.name and "knob" in f.metadata), Knob())
        out[field.name] = (hints.get(field.name, object), spec)
    return out


def _split_optional(kind) -> tuple[object, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return (args[0] if len(args) == 1 else object), len(args) < len(typing.get_args(kind))
    return kind, False


def _item_type(kind):
    """int for ``tuple[int, ...]``, else None."""
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        return args[0] if args else object
    return None


def describe(kind, spec: Knob) -> str:
    """What a setting accepts, in words: ``an integer ≥ 1``, ``one of paper, code or none``."""
    base, optional = _split_optional(kind)
    if spec.choices is not None:
        text = "one of " + ", ".join(map(str, spec.choices))
    else:
        item = _item_type(base)
        text = {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(base, "a value")
        if item is not None:
            text = {int: "comma-separated integers", float: "comma-separated numbers"}.get(item, "a list")
        if base is float and not spec.nonfinite:
            text = "a finite number"
        if spec.bounds():
            text += f" {'each ' if item is not None else ''}{spec.bounds()}"
    if optional:
        text = text.replace(" or ", ", ") + " or none"
    return text


def _owner(config_class: type) -> str:
    return getattr(config_class, "owner", None) or config_class.__name__


def _fits(base, spec: Knob, value) -> bool:
    """Whether a (typed) value has the field's type and lies within its knob."""
    if spec.choices is not None:
        return isinstance(value, typing.Hashable) and value in spec.choices  # exact: 'Code' is not 'code'
    item = _item_type(base)
    if item is not None:
        return isinstance(value, tuple | list) and all(_fits(item, spec, v) for v in value)
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and spec.within(value)
    if base is float:
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            return False
        if not spec.nonfinite and not math.isfinite(value):
            return False
        return spec.within(value)
    if base is str:
        return isinstance(value, str) or spec.check is not None  # a check decides what else it takes
    return True


def check_value(config_class: type, name: str, value, owner: str | None = None, label: str = "") -> None:
    """Raise a one-line HetCompError unless ``value`` is valid for field ``name`` of ``config_class``.

    ``label`` starts the message (e.g. ``-o period=abc: ``); ``got`` shows ``shown`` (the text typed) if given.
    """
    kind, spec = _fields(config_class)[name]
    _check(kind, spec, name, value, owner or _owner(config_class), label, value)


def _check(kind, spec: Knob, name: str, value, owner: str, label: str, shown) -> None:
    base, optional = _split_optional(kind)
    if value is None and optional:
        return
    if value is None or not _fits(base, spec, value):
        raise HetCompError(f"{label}{name} of {owner} must be {describe(kind, spec)} (got {shown!r})")
    if spec.check is not None:
        try:
            spec.check(value)
        except HetCompError as error:
            raise HetCompError(f"{label}{error}") from None


def validate(config, owner: str | None = None) -> None:
    """Check every field of a config instance against its declared type and knob."""
    for name, (kind, spec) in _fields(type(config)).items():
        _check(kind, spec, name, getattr(config, name), owner or _owner(type(config)), "", getattr(config, name))


def settings_summary(config_class: type) -> str:
    """``k (an integer ≥ 1), preset (one of paper, code), …`` for error messages; '(none)' when empty."""
    fields = _fields(config_class)
    return ", ".join(f"{name} ({describe(kind, spec)})" for name, (kind, spec) in fields.items()) or "(none)"


def unknown_settings(config_class: type, names, owner: str | None = None, label: str = "") -> None:
    """Raise if any of ``names`` is not a field of ``config_class``, listing the settings it has."""
    unknown = sorted(set(names) - set(_fields(config_class)))
    if unknown:
        settings = f"its settings: {settings_summary(config_class)}" if _fields(config_class) else "it has none"
        raise HetCompError(f"{label}{owner or _owner(config_class)} has no setting {', '.join(unknown)}; {settings}")


def _convert(kind, spec: Knob, text: str):
    """The text typed after ``NAME=`` as a value of ``kind``; the text itself when it does not convert."""
    base, optional = _split_optional(kind)
    stripped = text.strip()
    if optional and stripped.lower() in ("none", "null"):
        return None
    if base is str or spec.choices is not None and all(isinstance(c, str) for c in spec.choices):
        if len(stripped) >= 2 and stripped[0] == stripped[-1] == '"':  # JSON quotes (as runs record commands)
            try:
                return json.loads(stripped)
            except json.JSONDecodeError:
                pass
        return text
    item = _item_type(base)
    if item is not None:
        return tuple(_convert(item, spec, part) for part in stripped.split(",") if part.strip())
    if base is bool:
        lowered = stripped.lower()
        return True if lowered in _TRUE else False if lowered in _FALSE else text
    if base is int:
        return int(stripped) if _INT.fullmatch(stripped) else text
    if base is float:
        if _INT.fullmatch(stripped):  # an integer stays one, as JSON reads it (run names hash the options)
            return int(stripped)
        try:
            return float(stripped)
        except ValueError:
            return text
    try:
        return json.loads(stripped)
    except json.JSONDecodeError:
        return text


def parse_options(config_class: type, options: dict, owner: str | None = None, flag: str = "-o") -> dict:
    """``{"k": "20"}`` → ``{"k": 20}``: command-line ``-o`` values converted to the fields' types and checked.

    Values that are not strings are checked as they are. An unknown name, a value of the wrong type or out of
    range is a HetCompError such as ``-o period=abc: period of hetcomp must be an integer ≥ 1 (got 'abc')``.
    """
    owner = owner or _owner(config_class)
    for name, value in options.items():
        unknown_settings(config_class, [name], owner, f"{flag} {name}={value}: ")
    parsed = {}
    for name, value in options.items():
        kind, spec = _fields(config_class)[name]
        typed = _convert(kind, spec, value) if isinstance(value, str) else value
        _check(kind, spec, name, typed, owner, f"{flag} {name}={value}: ", value)
        parsed[name] = typed
    return parsed


def check_option(option: str, value, example=None, **bounds) -> None:
    """A command-line option's number within ``bounds`` (``ge``/``gt``/``le``/``lt``; floats finite), or a
    one-line HetCompError such as ``--dim -3: must be an integer ≥ 1, e.g. --dim 6``."""
    if value is None:
        return
    spec = Knob(**bounds)
    kind = int if isinstance(value, numbers.Integral) else float
    if not _fits(kind, spec, value):
        hint = f", e.g. {option} {example}" if example is not None else ""
        raise HetCompError(f"{option} {value}: must be {describe(kind, spec)}{hint}")


def check_choice(option: str, value: str, choices) -> None:
    """A command-line option's text among exact ``choices``, or a one-line HetCompError listing them."""
    if value not in choices:
        raise HetCompError(f"{option} {value!r}: choose one of {', '.join(choices)}")

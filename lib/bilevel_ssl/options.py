"""One declarative validator for every configuration and option class of the package.

Each field of an options dataclass is declared with :func:`option`: its default and a :class:`Spec` (allowed
values, or a numeric range, and an optional short help) in the field's metadata; the type comes from the field's
annotation (``int``, ``float``, ``bool``, ``str``, ``dict``; ``| None`` admits None).  A class derived from
:class:`Options` validates every field on construction (:func:`validate`) and builds from a dict refusing unknown
keys (:meth:`Options.from_dict`); a check across fields goes in the subclass's ``__post_init__`` after
``super().__post_init__()``.  Every message starts with the key, prefixed by the class's ``where``
(``meta_args.mu``, ``bissl.device``, ``hypergrad_args.fd_r``), and says what is allowed:

* ``<key>: unknown value 'x'; allowed: a, b`` - a field with ``choices``;
* ``<key>: must be a finite number > 0, got str '1e-3' (YAML 1.1 ...)`` - a wrong type or a value out of range
  (ints are valid floats; bools are neither; floats must be finite);
* ``<where>: unknown <what>(s) ['x']; allowed: a, b`` - an unknown key.

Errors are :class:`ConfigError` (a ValueError), raised before any compute.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

__all__ = ["ConfigError", "Spec", "option", "Options", "validate", "fail"]


class ConfigError(ValueError):
    """A bad parameter: the message names the key and what is allowed."""


@dataclass(frozen=True)
class Spec:
    """What a field admits beyond its annotated type: one of ``choices``, or a number within ``lo`` / ``hi``
    (``lo_open`` / ``hi_open``: the bound itself excluded).  ``help``: a few words added to the message."""

    choices: tuple = ()
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    help: str = ""


def option(default: Any = MISSING, *, factory: Any = MISSING, **spec) -> Any:
    """A dataclass field with default ``default`` (or ``factory()``) and the :class:`Spec` ``spec``."""
    return field(default=default, default_factory=factory, metadata={"spec": Spec(**spec)})


def fail(where: str, key: str, msg: str) -> ConfigError:
    """The error for ``key`` (prefixed by ``where``, if any)."""
    return ConfigError(f"{where}.{key}: {msg}" if where else f"{key}: {msg}")


# annotation -> (the Python types it admits, the words for them); a bool is neither an int nor a float here
_TYPES = {"int": (int, "an integer"), "float": ((int, float), "a number"), "bool": (bool, "true or false"),
          "str": (str, "a string"), "dict": (dict, "a dict")}


def _kind(annotation) -> tuple[str, bool]:
    """('int' | 'float' | 'bool' | 'str' | 'dict', None allowed) from a field annotation."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = {p.strip() for p in text.split("|")}
    kind = parts - {"None"}
    if len(kind) != 1 or not kind <= set(_TYPES):
        raise TypeError(f"option annotation {annotation!r}: expected one of {', '.join(_TYPES)}, optionally | None")
    return kind.pop(), "None" in parts


def _allowed(kind: str, spec: Spec, optional: bool) -> str:
    """What the field admits, in words: 'a finite number > 0', 'an integer >= 1 or None', 'a number in [0, 1)'."""
    text = _TYPES[kind][1]
    if kind in ("int", "float"):
        lo = None if spec.lo is None else f"{'>' if spec.lo_open else '>='} {spec.lo:g}"
        hi = None if spec.hi is None else f"{'<' if spec.hi_open else '<='} {spec.hi:g}"
        if lo and hi:
            text += f" in {'(' if spec.lo_open else '['}{spec.lo:g}, {spec.hi:g}{')' if spec.hi_open else ']'}"
        else:
            text = ("a finite number" if kind == "float" else text) + "".join(f" {b}" for b in (lo, hi) if b)
    return text + (" or None" if optional else "") + (f" ({spec.help})" if spec.help else "")


def _check(where: str, key: str, value: Any, annotation, spec: Spec) -> None:
    kind, optional = _kind(annotation)
    if optional and value is None:
        return
    if spec.choices:
        if value not in spec.choices:
            names = ", ".join("'' (none)" if c == "" else str(c) for c in spec.choices)
            raise fail(where, key, f"unknown value {value!r}; allowed: {names}{' or None' if optional else ''}")
        return
    typed = isinstance(value, _TYPES[kind][0]) and (kind == "bool" or not isinstance(value, bool))
    ok = typed and (kind != "float" or math.isfinite(value))
    if ok and kind in ("int", "float"):
        ok = ((spec.lo is None or (value > spec.lo if spec.lo_open else value >= spec.lo))
              and (spec.hi is None or (value < spec.hi if spec.hi_open else value <= spec.hi)))
    if not ok:
        got = repr(value) if typed else f"{type(value).__name__} {value!r}"
        hint = " (YAML 1.1 reads 1e-3 as a string: write 1.0e-3)" if kind == "float" and isinstance(value, str) else ""
        raise fail(where, key, f"must be {_allowed(kind, spec, optional)}, got {got}{hint}")


def validate(obj, where: str = "") -> None:
    """Check every field of the dataclass ``obj`` against its annotation and :class:`Spec`; raise
    :class:`ConfigError` naming ``where.key``.  A field declared without :func:`option` is a TypeError."""
    for f in fields(obj):
        if "spec" not in f.metadata:
            raise TypeError(f"{type(obj).__name__}.{f.name}: declare the field with bilevel_ssl.options.option")
        _check(where, f.name, getattr(obj, f.name), f.type, f.metadata["spec"])


class Options:
    """Base of a validated options dataclass.  ``where``: the prefix of its keys in messages (``meta_args``,
    ``bissl``, ...; '' for top-level keys); ``what``: what an unknown key is called (``key``, ``gessl option``)."""

    where: ClassVar[str] = ""
    what: ClassVar[str] = "key"

    def __post_init__(self) -> None:
        validate(self, self.where)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict):
        """``cls(**d)``; unknown keys raise ``<where>: unknown <what>(s) [...]; allowed: ...``."""
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.where or 'options'}: expected a dict of options, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.keys()))
        if unknown:
            raise ConfigError(f"{cls.where + ': ' if cls.where else ''}unknown {cls.what}(s) {unknown}; allowed: "
                              f"{', '.join(cls.keys()) or '(none)'}")
        return cls(**d)

"""Job parameters as a workflow declares them in its ``[params.NAME]`` tables.

One declaration, many readers: the REST validator parses submissions with
:meth:`Param.parse`, the broker fills what was left out with
:meth:`Param.make_default`, the OpenAPI document and ``GET /v1/workflows``
publish :meth:`Param.schema`, and ``onepiece submit`` builds its options from
:meth:`Param.declaration` (the table as written, read back here with
:func:`param_from_table`). A declaration::

    [params.num_frames]
    type = "integer"        # string | integer | number | boolean | image | map
    required = false        # default false; a required param has no default
    default = 81            # integer: "random" draws a fresh value per job (a seed)
    minimum = 1             # integer, number, and the values of a map
    maximum = 161
    multiple_of = 16        # integer
    congruent = [4, 1]      # integer: value % 4 == 1
    max_length = 2000       # string
    description = "Frames in the video."

``image`` is the job's input image: its bytes travel in the job's payload
under the param's name, never among the parameters, so it takes neither a
default nor bounds. ``map`` is a JSON object of short string keys to numbers
within ``minimum``/``maximum`` (the synthetic stages' per-stage work factors).

A value a client sent that is wrong raises :class:`ParamError`, its message
naming the param; a declaration that is wrong raises :class:`DeclarationError`,
its message naming the key (the workflow loader adds the file and the param).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "Boolean",
    "DeclarationError",
    "Image",
    "Integer",
    "Map",
    "Number",
    "Param",
    "ParamError",
    "TYPES",
    "Text",
    "param_from_table",
]

RANDOM = "random"
MAP_MAX_KEYS = 64
MAP_MAX_KEY_LENGTH = 64


class ParamError(ValueError):
    """A parameter value that cannot be accepted.

    ``field`` names the parameter, ``message`` says what is wrong in words a
    client can act on, ``reason`` labels it for metrics: ``unknown_field``,
    ``missing`` or ``invalid``.
    """

    def __init__(self, field: str, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.field = field
        self.message = message
        self.reason = reason


class DeclarationError(ValueError):
    """A ``[params.NAME]`` table that cannot be used; the message names the key."""


def show(value: Any, limit: int = 40) -> str:
    """A value for an error message, cut short: a client's input is never echoed at length."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def type_name(value: Any) -> str:
    """How a JSON value's type reads in a message: "a boolean", "an object", ..."""
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Param:
    """What every parameter type has; subclasses add their bounds and ``TYPE``."""

    TYPE: ClassVar[str] = ""
    KEYS: ClassVar[frozenset[str]] = frozenset({"type", "required", "default", "description"})

    name: str
    required: bool = False
    description: str = ""
    default: Any = None  # None: no default (a param neither required nor defaulted is left out)

    @property
    def has_default(self) -> bool:
        return self.default is not None

    def parse(self, raw: Any, form: bool = False) -> Any:
        """The accepted value of ``raw`` (a JSON value; with ``form``, multipart text too)."""
        raise NotImplementedError

    def make_default(self) -> Any:
        """The value a job gets when the param is left out (None: it stays left out)."""
        return self.default

    def schema(self) -> dict:
        """The JSON Schema of an accepted value, with its default and description."""
        s = {**self._schema(), "description": self.description}
        if self.has_default and self.default != RANDOM:
            s["default"] = self.default
        return s

    def _schema(self) -> dict:
        raise NotImplementedError

    def declaration(self) -> dict:
        """The declaration as a TOML table would write it (``param_from_table`` reads it back)."""
        out: dict[str, Any] = {"type": self.TYPE, "required": self.required}
        if self.has_default:
            out["default"] = self.default
        out.update(self._bounds())
        out["description"] = self.description
        return out

    def _bounds(self) -> dict:
        return {}

    def fail(self, message: str) -> ParamError:
        return ParamError(self.name, f"{self.name} {message}")


@dataclass(frozen=True)
class Text(Param):
    """A string; a required one must not be blank."""

    TYPE: ClassVar[str] = "string"
    KEYS: ClassVar[frozenset[str]] = Param.KEYS | {"max_length"}
    max_length: int | None = None

    def parse(self, raw: Any, form: bool = False) -> str:
        if not isinstance(raw, str):
            raise self.fail(f"must be a string, not {type_name(raw)}")
        if self.required and not raw.strip():
            raise self.fail("must not be empty")
        if self.max_length is not None and len(raw) > self.max_length:
            raise self.fail(f"is {len(raw)} characters long; the limit is {self.max_length}")
        return raw

    def _schema(self) -> dict:
        s: dict[str, Any] = {"type": "string"}
        if self.max_length is not None:
            s["maxLength"] = self.max_length
        if self.required:
            s.update(minLength=1, pattern=r"\S")  # not blank, as parse() checks
        return s

    def _bounds(self) -> dict:
        return {} if self.max_length is None else {"max_length": self.max_length}


_INT_RE = re.compile(r"[+-]?\d{1,25}")


@dataclass(frozen=True)
class Integer(Param):
    """An integer within bounds, optionally a multiple of a step or ``m k + r``; default may be "random"."""

    TYPE: ClassVar[str] = "integer"
    KEYS: ClassVar[frozenset[str]] = Param.KEYS | {"minimum", "maximum", "multiple_of", "congruent"}
    minimum: int | None = None
    maximum: int | None = None
    multiple_of: int | None = None
    congruent: tuple[int, int] | None = None  # (m, r): value % m == r, as for 4k+1 frames

    def parse(self, raw: Any, form: bool = False) -> int:
        if form and isinstance(raw, str):
            if not _INT_RE.fullmatch(raw.strip()):
                raise self.fail(f"must be an integer, got {show(raw)}")
            raw = int(raw)
        if isinstance(raw, float) and raw.is_integer():  # JSON Schema's "integer" admits 480.0
            raw = int(raw)
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise self.fail(f"must be an integer, not {type_name(raw)}")
        self._check_range(raw)
        return raw

    def _check_range(self, value: int) -> None:
        lo, hi = self.minimum, self.maximum
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            if lo is not None and hi is not None:
                raise self.fail(f"must be between {lo} and {hi}, got {show(value)}")
            raise self.fail(f"must be at least {lo}, got {show(value)}" if lo is not None
                            else f"must be at most {hi}, got {show(value)}")
        if self.multiple_of and value % self.multiple_of:
            raise self.fail(f"must be a multiple of {self.multiple_of}, got {value}")
        if self.congruent and value % self.congruent[0] != self.congruent[1]:
            m, r = self.congruent
            examples = ", ".join(str(m * k + r) for k in range(1, 4))
            raise self.fail(f"must be {m}k+{r} ({examples}, ...), got {value}")

    def make_default(self) -> int | None:
        if self.default == RANDOM:
            return self.minimum + secrets.randbelow(self.maximum - self.minimum + 1)
        return self.default

    def values(self) -> list[int] | None:
        """Every accepted value, if the bounded range of a congruent integer is short enough to list."""
        if not self.congruent or self.minimum is None or self.maximum is None:
            return None
        m, r = self.congruent
        first = self.minimum + (r - self.minimum) % m
        if (self.maximum - first) // m >= 256:
            return None
        return [v for v in range(first, self.maximum + 1, m) if not self.multiple_of or v % self.multiple_of == 0]

    def _schema(self) -> dict:
        s: dict[str, Any] = {"type": "integer"}
        if self.minimum is not None:
            s["minimum"] = self.minimum
        if self.maximum is not None:
            s["maximum"] = self.maximum
        if self.multiple_of:
            s["multipleOf"] = self.multiple_of
        if self.congruent:
            m, r = self.congruent
            s["x-congruent"] = {"modulus": m, "remainder": r}
            # JSON Schema has no "x % m == r"; a bounded range can list its values instead
            values = self.values()
            if values is not None:
                s["enum"] = values
        if self.default == RANDOM:
            s["x-default"] = RANDOM
        return s

    def _bounds(self) -> dict:
        out: dict[str, Any] = {}
        for key in ("minimum", "maximum", "multiple_of"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.congruent:
            out["congruent"] = list(self.congruent)
        return out


@dataclass(frozen=True)
class Number(Param):
    """A finite number within bounds; always handed on as a float."""

    TYPE: ClassVar[str] = "number"
    KEYS: ClassVar[frozenset[str]] = Param.KEYS | {"minimum", "maximum"}
    minimum: float | None = None
    maximum: float | None = None

    def parse(self, raw: Any, form: bool = False) -> float:
        if form and isinstance(raw, str):
            try:
                raw = float(raw)
            except ValueError:
                raise self.fail(f"must be a number, got {show(raw)}") from None
        if not _is_number(raw):
            raise self.fail(f"must be a number, not {type_name(raw)}")
        return _bounded_float(raw, self.minimum, self.maximum, self.fail)

    def _schema(self) -> dict:
        return {"type": "number", **_number_bounds(self.minimum, self.maximum)}

    def _bounds(self) -> dict:
        return {k: v for k, v in (("minimum", self.minimum), ("maximum", self.maximum)) if v is not None}


def _bounded_float(raw: int | float, lo: float | None, hi: float | None, fail) -> float:
    """``raw`` as a float, refused (by ``fail(message)``) if not finite or out of bounds."""
    try:
        value = float(raw)
    except OverflowError:  # an integer beyond any float
        value = math.inf
    if math.isfinite(value) and (lo is None or value >= lo) and (hi is None or value <= hi):
        return value
    if lo is not None and hi is not None:
        raise fail(f"must be between {lo:g} and {hi:g}, got {show(raw)}")
    if lo is not None:
        raise fail(f"must be at least {lo:g}, got {show(raw)}")
    if hi is not None:
        raise fail(f"must be at most {hi:g}, got {show(raw)}")
    raise fail(f"must be a finite number, got {show(raw)}")


def _number_bounds(lo: float | None, hi: float | None) -> dict:
    return {k: v for k, v in (("minimum", lo), ("maximum", hi)) if v is not None}


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class Boolean(Param):
    """true or false; a form may also write 1/0, yes/no, on/off."""

    TYPE: ClassVar[str] = "boolean"

    def parse(self, raw: Any, form: bool = False) -> bool:
        if form and isinstance(raw, str):
            word = raw.strip().lower()
            if word in _TRUE or word in _FALSE:
                return word in _TRUE
            raise self.fail(f"must be true or false, got {show(raw)}")
        if not isinstance(raw, bool):
            raise self.fail(f"must be true or false, not {type_name(raw)}")
        return raw

    def _schema(self) -> dict:
        return {"type": "boolean"}


@dataclass(frozen=True)
class Image(Param):
    """The job's input image. Its bytes travel in the payload under the param's name, so it is
    never among the resolved parameters; the REST layer decodes and checks it."""

    TYPE: ClassVar[str] = "image"
    KEYS: ClassVar[frozenset[str]] = frozenset({"type", "required", "description"})

    def parse(self, raw: Any, form: bool = False) -> str | bytes:
        """The image as sent (base64 text or raw bytes), still to be decoded and checked."""
        if not isinstance(raw, (str, bytes, bytearray)):
            raise self.fail(f"must be a base64 string, not {type_name(raw)}")
        return raw if isinstance(raw, str) else bytes(raw)

    def _schema(self) -> dict:
        return {"type": "string", "minLength": 1, "contentEncoding": "base64"}


@dataclass(frozen=True)
class Map(Param):
    """A JSON object of short string keys to numbers within bounds (a form sends it as JSON text)."""

    TYPE: ClassVar[str] = "map"
    KEYS: ClassVar[frozenset[str]] = Param.KEYS | {"minimum", "maximum"}
    minimum: float | None = None
    maximum: float | None = None

    def parse(self, raw: Any, form: bool = False) -> dict[str, float]:
        if form and isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except (ValueError, RecursionError):
                raise self.fail(f"must be a JSON object, got {show(raw)}") from None
        if not isinstance(raw, Mapping):
            raise self.fail(f"must be an object of numbers, not {type_name(raw)}")
        if len(raw) > MAP_MAX_KEYS:
            raise self.fail(f"has {len(raw)} keys; the limit is {MAP_MAX_KEYS}")
        out: dict[str, float] = {}
        for key, value in raw.items():
            if not isinstance(key, str) or not 1 <= len(key) <= MAP_MAX_KEY_LENGTH:
                raise self.fail(f"keys must be strings of 1 to {MAP_MAX_KEY_LENGTH} characters, got {show(key)}")
            if not _is_number(value):
                raise ParamError(self.name, f"{self.name}[{show(key)}] must be a number, not {type_name(value)}")
            out[key] = _bounded_float(value, self.minimum, self.maximum,
                                      lambda msg, k=key: ParamError(self.name, f"{self.name}[{show(k)}] {msg}"))
        return out

    def _schema(self) -> dict:
        return {"type": "object", "maxProperties": MAP_MAX_KEYS,
                "propertyNames": {"minLength": 1, "maxLength": MAP_MAX_KEY_LENGTH},
                "additionalProperties": {"type": "number", **_number_bounds(self.minimum, self.maximum)}}

    def _bounds(self) -> dict:
        return {k: v for k, v in (("minimum", self.minimum), ("maximum", self.maximum)) if v is not None}


TYPES: dict[str, type[Param]] = {t.TYPE: t for t in (Text, Integer, Number, Boolean, Image, Map)}


# -- declarations ----------------------------------------------------------------------


def param_from_table(name: str, table: Mapping[str, Any]) -> Param:
    """Build the param a ``[params.NAME]`` table declares; DeclarationError names the bad key."""
    if not isinstance(table, Mapping):
        raise DeclarationError("must be a table")
    kind = table.get("type")
    if kind not in TYPES:
        raise DeclarationError(f"'type' must be one of {', '.join(TYPES)}, not {show(kind)}")
    cls = TYPES[kind]
    unknown = sorted(set(table) - cls.KEYS)
    if unknown:
        article = "an" if kind[0] in "aeiou" else "a"
        raise DeclarationError(f"unknown key(s) {unknown} for {article} {kind} param; its keys: {sorted(cls.KEYS)}")
    required = table.get("required", False)
    if not isinstance(required, bool):
        raise DeclarationError(f"'required' must be true or false, not {show(required)}")
    description = table.get("description", "")
    if not isinstance(description, str):
        raise DeclarationError(f"'description' must be a string, not {show(description)}")
    if required and "default" in table:
        raise DeclarationError("'default' is given but the param is required: a required param has no default")
    common = dict(name=name, required=required, description=description)

    if cls is Text:
        max_length = _int_key(table, "max_length", least=0)
        param: Param = Text(**common, max_length=max_length)
    elif cls is Integer:
        congruent = table.get("congruent")
        if congruent is not None:
            if (not isinstance(congruent, list) or len(congruent) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in congruent)
                    or congruent[0] < 2 or not 0 <= congruent[1] < congruent[0]):
                raise DeclarationError(f"'congruent' must be [m, r] with m >= 2 and 0 <= r < m, not {show(congruent)}")
            congruent = tuple(congruent)
        param = Integer(**common, minimum=_int_key(table, "minimum"), maximum=_int_key(table, "maximum"),
                        multiple_of=_int_key(table, "multiple_of", least=1), congruent=congruent)
        _check_order(param.minimum, param.maximum)
        if param.minimum is not None and param.maximum is not None and _no_value(param):
            raise DeclarationError(f"no integer between 'minimum' {param.minimum} and 'maximum' {param.maximum}"
                                   " meets 'multiple_of' and 'congruent'")
    elif cls in (Number, Map):
        lo, hi = _number_key(table, "minimum"), _number_key(table, "maximum")
        _check_order(lo, hi)
        param = cls(**common, minimum=lo, maximum=hi)
    else:
        param = cls(**common)

    if "default" in table:
        param = _with_default(param, table["default"])
    return param


def _with_default(param: Param, default: Any) -> Param:
    """``param`` with its declared default, checked as a client's value would be."""
    if isinstance(param, Integer) and default == RANDOM:
        if param.minimum is None or param.maximum is None or param.multiple_of or param.congruent:
            raise DeclarationError("'default' = \"random\" needs 'minimum' and 'maximum', and neither"
                                   " 'multiple_of' nor 'congruent'")
        return dataclasses.replace(param, default=RANDOM)
    try:
        value = param.parse(default)
    except ParamError as exc:
        raise DeclarationError(f"'default' {show(default)} is not an accepted value: {exc.message}") from None
    return dataclasses.replace(param, default=value)


def _int_key(table: Mapping[str, Any], key: str, least: int | None = None) -> int | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
        floor = "" if least is None else f" >= {least}"
        raise DeclarationError(f"{key!r} must be an integer{floor}, not {show(value)}")
    return value


def _number_key(table: Mapping[str, Any], key: str) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value):
        raise DeclarationError(f"{key!r} must be a finite number, not {show(value)}")
    return float(value)


def _check_order(lo: float | None, hi: float | None) -> None:
    if lo is not None and hi is not None and lo > hi:
        raise DeclarationError(f"'minimum' ({lo:g}) is above 'maximum' ({hi:g})")


def _no_value(param: Integer) -> bool:
    """Whether a bounded integer's multiple_of and congruent leave no accepted value."""
    step = param.multiple_of or 1
    m, r = param.congruent or (1, 0)
    first = param.minimum + (-param.minimum) % step
    # multiples of step repeat their residues mod m with period m: m tries decide it
    return not any(v % m == r for v in range(first, min(param.maximum, first + step * m) + 1, step))

"""Validated config sections from frozen dataclasses whose fields carry their own rules.

Every section of fedlora's config (``participation``, ``dp``, each method's ``<name>.*`` ...) is a
frozen dataclass; a field's default is the one default of that key, and its metadata says how to
check a given value and what it means::

    init_samples: int = setting(256, "examples whose summed gradient sets B, R, A", check=POSITIVE)
    objective: str = setting("cos", "cos: the paper's Adam objective | ls: closed form",
                             choices=("cos", "ls"))

``parse_section(SettingsClass, raw, "section")`` turns a user's dict (Hydra's, Flower's run config
or a saved ``config.yaml``) into an instance, or raises a one-line ``ConfigError`` naming the key,
the bad value and the fix. ``None`` (or a missing key) means the default.
"""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, field, fields

from fedlora.core.errors import ConfigError

POSITIVE = "positive"  # > 0
NONNEGATIVE = "nonnegative"  # >= 0
AT_MOST_ONE = "at most one"  # <= 1 (with one of the above: a probability)
BELOW_ONE = "below one"  # < 1
OPEN_UNIT_INTERVAL = "in (0, 1)"
_RULES = {
    POSITIVE: (lambda v: v > 0, "must be > 0"),
    NONNEGATIVE: (lambda v: v >= 0, "must be >= 0"),
    AT_MOST_ONE: (lambda v: v <= 1, "is a probability; set it <= 1"),
    BELOW_ONE: (lambda v: v < 1, "is a probability; set it < 1"),
    OPEN_UNIT_INTERVAL: (lambda v: 0 < v < 1, "must be in (0, 1)"),
}


def setting(default, help: str, *, check: str | tuple[str, ...] = (), choices: tuple = (),
            names_section: bool = False):
    """A dataclass field with its default, its help text and its rules (``check``: one rule or a
    tuple of rules, tested in order; ``choices``: the allowed values). ``names_section``: the
    field picks a named preset (``partition=dirichlet``), so errors name the section itself."""
    checks = (check,) if isinstance(check, str) else tuple(check)
    return field(default=default, metadata={"help": help, "checks": checks, "choices": choices,
                                            "names_section": names_section})


def help_text(settings_class, name: str) -> str:
    return next(f.metadata.get("help", "") for f in fields(settings_class) if f.name == name)


def defaults(settings_class) -> dict:
    """``{field: default}`` of a settings dataclass (its config section as plain values)."""
    return {f.name: f.default for f in fields(settings_class) if f.default is not MISSING}


def _kind(annotation) -> tuple[type, bool]:
    """(base type, may be None) of a field annotation such as ``int``, ``float | None``."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing))  # noqa: S307 (our own annotations)
    args = typing.get_args(annotation)
    if args:
        kinds = [a for a in args if a is not type(None)]
        return kinds[0], type(None) in args
    return annotation, False


def convert(value, kind: type, key: str):
    """``value`` as ``kind`` (int, float, str, bool), or a one-line ``ConfigError``."""
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false"):
                return str(value).lower() == "true"
            raise ValueError
        if kind is str:
            return str(value)
        if isinstance(value, bool):
            raise TypeError
        number = kind(value)
        if kind is int and number != float(value):
            raise ValueError
    except (TypeError, ValueError):
        what = "a number" if kind in (int, float) else "a value"
        raise ConfigError(f"{key}={value!r} is not {what} of type {kind.__name__}; set {key} to "
                          "one") from None
    if kind is float and not math.isfinite(number):
        raise ConfigError(f"{key}={value!r} must be finite")
    return number


def check_value(value, metadata: dict, key: str) -> None:
    choices = metadata.get("choices") or ()
    if choices and value not in choices:
        raise ConfigError(f"{key} '{value}' is unknown; choose one of: "
                          f"{', '.join(str(c) for c in choices)}")
    for rule in metadata.get("checks", ()):
        valid, requirement = _RULES[rule]
        if isinstance(value, int) and rule == POSITIVE:
            requirement = f"must be a positive integer; set {key} >= 1"
        elif isinstance(value, int) and rule == NONNEGATIVE:
            requirement = "must be an integer >= 0"
        if not valid(value):
            raise ConfigError(f"{key}={value} {requirement}")


def parse_section(settings_class, raw, section: str, replace: dict | None = None):
    """An instance of ``settings_class`` from the user's dict ``raw`` (None: all defaults).

    ``replace``: values already converted by the caller (fields with rules of their own)."""
    raw = dict(raw or {})
    valid = [f.name for f in fields(settings_class)]
    for key in raw:
        if key not in valid:
            raise ConfigError(f"'{section}.{key}' is not a fedlora setting; valid keys under "
                              f"{section}: {', '.join(valid)}")
    hints = typing.get_type_hints(settings_class)
    values = {}
    for f in fields(settings_class):
        key = section if f.metadata.get("names_section") else \
            f"{section}.{f.name}" if section else f.name
        if replace and f.name in replace:
            values[f.name] = replace[f.name]
            continue
        value = raw.get(f.name)
        if value is None:
            values[f.name] = f.default
            continue
        kind, optional = _kind(hints[f.name])
        value = convert(value, kind, key)
        check_value(value, f.metadata, key)
        values[f.name] = value
    return settings_class(**values)


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: a nested config as its dotted leaf keys (the
    command line's and Flower's run config's spelling)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def unflatten(flat: dict) -> dict:
    """``flatten``'s inverse: ``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    nested: dict = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested

"""Validated config sections from frozen dataclasses whose fields carry their own rules.

Every section of fedlora's config (``participation``, ``dp``, each method's ``<name>.*`` ...) is a
frozen dataclass; a field's default is the one default of that key, and its metadata says how to
check a given value and what it means::

    init_samples: int = setting(256, "examples whose summed gradient sets B, R, A", check=POSITIVE)
    objective: str = setting("cos", "cos: the paper's Adam objective | ls: closed form",
                             choices=("cos", "ls"))

The dataclasses are also the schema: ``schema(SettingsClass)`` is the same fields as an OmegaConf
structured config, which Hydra's ConfigStore holds (``fedlora.run.cli``). Merging a user's dict
into it (``validated``) is where unknown keys and values of the wrong type are refused (OmegaConf
struct mode and typing; it also turns "8" into 8 for an int); fedlora adds what OmegaConf cannot
do: each field's own rules (``check_value``), rules relating keys (``fedlora.config``) and a
one-line ``ConfigError`` naming the key, the bad value and the fix instead of OmegaConf's
message (``config_error``). ``None`` (or a missing key) means the default.

``parse_section(SettingsClass, raw, "section")`` does all of that for one section: a user's dict
(Hydra's, Flower's run config or a saved ``config.yaml``) in, an instance out.

Nested configs travel flat, as dotted keys (``partition.alpha``), in Flower's run config and
ConfigRecords; Flower's own ``flatten_dict``/``unflatten_dict`` (``flwr.common.config``) are the
one flattener, and ``run_config_values`` writes a config's leaves as the values they accept.
"""

from __future__ import annotations

import functools
import math
import typing
from dataclasses import MISSING, field, fields, is_dataclass, make_dataclass

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


def check_value(value, metadata: dict, key: str) -> None:
    """The rules of one field (its metadata) for a value of the right type."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value} must be finite")
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


@functools.cache
def schema(settings_class) -> type:
    """``settings_class`` as an OmegaConf structured config: the same fields, types, defaults and
    metadata, with two differences. Every field may be null (null means the default, as Flower's
    run config writes "" for each key it declares) and the class is not frozen (OmegaConf makes a
    frozen dataclass's node read-only, so no value could be merged into it). A field holding a
    settings dataclass holds its schema."""
    return make_dataclass(settings_class.__name__, schema_fields(settings_class))


def schema_fields(settings_class) -> list[tuple]:
    """``schema``'s ``(name, type, field)`` triples (to build a larger schema around them)."""
    hints = typing.get_type_hints(settings_class)
    specs = []
    for f in fields(settings_class):
        kind = hints[f.name]
        if is_dataclass(kind):
            kind = schema(kind)
            default = field(default_factory=kind, metadata=f.metadata)
        elif f.default is MISSING:
            default = field(default_factory=f.default_factory, metadata=f.metadata)
        else:
            kind = typing.Optional[kind]
            default = field(default=f.default, metadata=f.metadata)
        specs.append((f.name, kind, default))
    return specs


def validated(schema_class, raw, section: str = "", lists_keys: bool = False) -> dict:
    """``raw`` (nested; null or a missing key: the default) merged into the structured config
    ``schema_class``, as plain nested values with every key present. OmegaConf refuses an
    unknown key or a value of the wrong type; that is a one-line ``ConfigError`` (``section``,
    ``lists_keys``: as ``config_error``'s)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema_class), _without_nulls(raw or {}))
        return OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as error:
        raise config_error(error, schema_class, section, lists_keys) from None


def _without_nulls(tree: dict) -> dict:
    return {key: _without_nulls(value) if isinstance(value, dict) else value
            for key, value in tree.items() if value is not None}


def config_error(error, schema_class, section: str = "", lists_keys: bool = False) -> ConfigError:
    """OmegaConf's complaint (an unknown key, a value of the wrong type) about a value merged
    into ``schema_class`` as fedlora's one-line message, which names the key, the bad value and
    the fix. ``section``: where ``schema_class`` sits in the whole config (the keys' prefix).
    An unknown key in a section is answered with the section's keys; one at the top with the
    class's keys if ``lists_keys``, else with the file that documents the whole config."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    path = error.full_key or ""
    key = f"{section}.{path}" if section and path else section or path
    owner_path, _, name = path.rpartition(".")
    owner = _section_schema(schema_class, owner_path)
    kinds = typing.get_type_hints(owner) if owner is not None else {}
    if isinstance(error, (ConfigKeyError, ConfigAttributeError)) and name not in kinds:
        where = key.rpartition(".")[0]
        if owner is not None and (where or lists_keys):
            return ConfigError(f"'{key}' is not a fedlora setting; valid keys"
                               f"{f' under {where}' if where else ''}: "
                               f"{', '.join(f.name for f in fields(owner))}")
        return ConfigError(f"'{key}' is not a fedlora setting; see fedlora/conf/config.yaml for "
                           "the valid keys")
    if name in kinds and hasattr(error, "value"):
        kind = next((a for a in typing.get_args(kinds[name]) if a is not type(None)), kinds[name])
        value = error.value
        if typing.get_origin(kind) in (list, tuple):
            return ConfigError(f"{key}={value!r} is not a list; write it as {key}=[a,b] (or "
                               f"{key}=[] for none)")
        what = "a number" if kind in (int, float) else "a value"
        return ConfigError(f"{key}={value!r} is not {what} of type {kind.__name__}; set {key} to "
                           "one")
    message = (str(error).splitlines() or [type(error).__name__])[0]  # OmegaConf's first line
    return ConfigError(f"{key}: {message}" if key else message)


def _section_schema(schema_class, path: str):
    """The schema of the section at dotted ``path`` ("" is ``schema_class``), or None."""
    for part in path.split(".") if path else ():
        kind = typing.get_type_hints(schema_class).get(part)
        if not is_dataclass(kind):
            return None
        schema_class = kind
    return schema_class


def build(settings_class, values: dict, section: str = ""):
    """An instance of ``settings_class`` from ``validated`` values, after each field's own rules
    (``check_value``; a null has none to pass)."""
    for f in fields(settings_class):
        value = values.get(f.name)
        if value is None or not f.metadata:
            continue
        key = section if f.metadata.get("names_section") else \
            f"{section}.{f.name}" if section else f.name
        check_value(value, f.metadata, key)
    return settings_class(**values)


def parse_section(settings_class, raw, section: str = ""):
    """An instance of ``settings_class`` from the user's dict ``raw`` (None: all defaults), the
    ``section`` of the config (its key prefix in messages)."""
    return build(settings_class, validated(schema(settings_class), raw, section, lists_keys=True),
                 section)


def run_config_values(tree: dict, null: str = "") -> dict:
    """``tree`` with every leaf a value Flower's run config and ConfigRecords hold (the values
    ``flwr.common.config.flatten_dict`` accepts): null as ``null`` ("": the key's default), a
    list as its items joined by commas."""
    return {key: run_config_values(value, null) if isinstance(value, dict)
            else null if value is None
            else ",".join(str(item) for item in value) if isinstance(value, (list, tuple))
            else value for key, value in tree.items()}

"""Options declared once, checked in one place, refused with one message format.

Every option of a configuration (`SGLDConfig`, `AnalysisConfig`, `TrainConfig`, `ModelConfig`,
`Intervention`) is a dataclass field made by `option(default, help, ...)`: its type is the field's annotation,
and the field says its allowed range (`ge`, `gt`, `le`, `lt`) or `choices`, its help text (the command line's
`--help`) and its `aliases`, the other libraries' spellings of it (devinterp's `lr` for our `epsilon`, with a
note where the meaning or default differs). Then:

1. `build(cls, values, source=...)` maps aliases to names and refuses unknown keys (one message, naming the
   source, e.g. a config file, and the valid options);
2. `validate(config)`, called by each class's `__post_init__`, checks every option's type (an int is accepted
   as a float, and stored as one), then its range or choices:

       The 'epsilon' option of SGLDConfig must be > 0; got -1.

   Checks that involve several options stay in the class, after `validate`, in the same words.

Options that live in a mapping rather than a dataclass (a task's data spec) are declared as `Declared(hint,
default, Option(...))` and checked by `check_mapping`, with the same messages.

Config files (JSON or TOML tables of option: value) are read by `read_config_file`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
import warnings
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidOptionError, InvalidValueError, MissingFileError


@dataclass(frozen=True)
class Option:
    """One option's constraints, help and other spellings (a field's `metadata["option"]`)."""

    help: str = ""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    why: str = ""  # appended to a range message, e.g. "(the std across chains needs two)"
    aliases: Mapping[str, str | None] = field(default_factory=dict)  # other spelling -> note (None: same meaning)

    def bounds(self) -> list[tuple[str, float]]:
        return [(op, v) for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                if v is not None]

    def allows(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        checks = {">=": value.__ge__, ">": value.__gt__, "<=": value.__le__, "<": value.__lt__}
        return all(checks[op](v) is True for op, v in self.bounds())

    def allowed(self) -> str:
        """The allowed values in words: "> 0", ">= 0 and < 1", "one of ['a', 'b']"."""
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        return " and ".join(f"{op} {_plain(v)}" for op, v in self.bounds())


def option(default: Any = MISSING, help: str = "", *, aliases: Mapping[str, str | None] | tuple[str, ...] = (),
           **constraints: Any) -> Any:
    """A dataclass field with its constraints (`ge`, `gt`, `le`, `lt`, `choices`, `why`), help and aliases.
    A mutable or dataclass default is copied for each instance."""
    aliases = dict(aliases) if isinstance(aliases, Mapping) else dict.fromkeys(aliases)
    if "choices" in constraints and constraints["choices"] is not None:
        constraints["choices"] = tuple(constraints["choices"])
    meta = {"help": help, "option": Option(help=help, aliases=aliases, **constraints)}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return field(default_factory=lambda: dataclasses.replace(default), metadata=meta)
    return field(default=default, metadata=meta)


def spec(f: dataclasses.Field) -> Option:
    """A field's `Option` (a plain field has no constraints)."""
    return f.metadata.get("option") or Option(help=f.metadata.get("help", ""))


def alias_table(cls: type) -> dict[str, tuple[str, str | None]]:
    """alias -> (option name, note) for the options of a configuration class."""
    return {alias: (f.name, note) for f in dataclasses.fields(cls) for alias, note in spec(f).aliases.items()}


def build(cls: type, values: Mapping[str, Any], *, source: str = "the arguments",
          extra: set[str] | None = None) -> dict[str, Any]:
    """`values` with other spellings mapped to option names; an error names any unknown key (`extra`: keys the
    caller takes besides the fields, e.g. a nested configuration's options given flat)."""
    other = alias_table(cls)
    out: dict[str, Any] = {}
    for key, value in values.items():
        name, note = other.get(key, (key, None))
        if name in out or (name != key and name in values):
            raise InvalidOptionError(f"The '{name}' option of {cls.__name__} is given twice (as {name!r} and "
                                     f"{key!r}) in {source}; give it once.")
        if name != key and note:
            warnings.warn(f"{key!r} is read as {cls.__name__}'s {name!r}: {note}", OptionWarning, stacklevel=3)
        out[name] = value
    known = {f.name for f in dataclasses.fields(cls)} | (extra or set())
    unknown = sorted(set(out) - known)
    if unknown:
        raise InvalidOptionError(f"Unknown option(s) {unknown} of {cls.__name__} in {source}; valid options: "
                                 f"{sorted(known)}.")
    return out


class OptionWarning(UserWarning):
    """An option given under another library's name whose meaning or default differs from ours."""


def validate(config: Any, skip: tuple[str, ...] = ()) -> None:
    """Check (and normalise: an int given for a float becomes a float) every option of a dataclass instance."""
    owner = type(config).__name__
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        if f.name in skip:
            continue
        value = check(owner, f.name, getattr(config, f.name), hints[f.name], spec(f))
        object.__setattr__(config, f.name, value)  # frozen dataclasses too


def check(owner: str, name: str, value: Any, hint: Any, opt: Option) -> Any:
    """One option's value, typed; or an InvalidOptionError in the one format. A union other than `X | None`
    (or `Any`) has its type checked by its class."""
    given = value
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None and optional:
        return None
    kind = next(a for a in args if a is not type(None)) if optional and len(args) == 2 else hint
    origin = typing.get_origin(kind) or kind
    typed = _TYPES.get(origin)
    if typed is not None:
        ok, expected = typed
        if origin in (list, dict):
            item = (typing.get_args(kind) or (Any,))[-1]
            words = {str: "strings", int: "integers", float: "numbers"}.get(item)
            expected = f"{expected} of {words}" if origin is list and words else (
                f"{expected} of names to {words}" if words else expected)
        if value is None or not ok(value, kind):
            hint_ = f" (for one: [{value!r}])" if origin is list and isinstance(value, str) else ""
            raise InvalidOptionError(f"The '{name}' option of {owner} must be {expected}{' or None' * optional}; got "
                                     f"{value!r} ({type(value).__name__}){hint_}.")
        value = float(value) if origin is float else list(value) if origin is list else value
    elif dataclasses.is_dataclass(kind) and not isinstance(value, kind):
        raise InvalidOptionError(f"The '{name}' option of {owner} must be a{'n' * (kind.__name__[0] in 'AEIOSU')} "
                                 f"{kind.__name__}; got {value!r}.")
    if (opt.choices is not None or opt.bounds()) and not opt.allows(value):
        raise InvalidOptionError(f"The '{name}' option of {owner} must be {opt.allowed()}"
                                 f"{' ' + opt.why if opt.why else ''}; got {given!r}.")
    return value


REQUIRED: Any = object()
"""The default of a declared option that must be given."""


@dataclass(frozen=True)
class Declared:
    """An option declared in a mapping (a task spec's `OPTIONS`): its type hint, its default (`REQUIRED`: it must
    be given) and its constraints."""

    hint: Any
    default: Any = REQUIRED
    option: Option = Option()


def check_mapping(owner: str, values: Mapping[str, Any], declared: Mapping[str, Declared], *,
                  extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """`values` with defaults filled in, in the order declared, each checked by `check` (kept as given: an int
    stays an int); an InvalidOptionError names an unknown or missing key (`extra`: keys taken besides, dropped)."""
    unknown = sorted(set(values) - set(declared) - set(extra))
    if unknown:
        raise InvalidOptionError(f"Unknown option(s) {unknown} of {owner}; valid options: {sorted(declared)}.")
    out = {}
    for name, d in declared.items():
        value = values.get(name, d.default)
        if value is REQUIRED:
            allowed = d.option.allowed()
            raise InvalidOptionError(f"The '{name}' option of {owner} must be given{f' ({allowed})' * bool(allowed)}.")
        check(owner, name, value, d.hint, d.option)
        out[name] = value
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) or type(v).__module__ == "numpy" and hasattr(v, "__index__")


def _items_are(v: Any, kind: Any) -> bool:
    item = (typing.get_args(kind) or (Any,))[-1]
    check = {str: lambda x: isinstance(x, str), int: _is_int, float: _is_number}.get(item, lambda x: True)
    return all(check(x) for x in (v.values() if isinstance(v, dict) else v))


_TYPES = {
    bool: (lambda v, k: isinstance(v, bool), "true or false"),
    int: (lambda v, k: _is_int(v), "an integer"),
    float: (lambda v, k: _is_number(v), "a finite number"),
    str: (lambda v, k: isinstance(v, str), "a string"),
    list: (lambda v, k: isinstance(v, (list, tuple)) and _items_are(v, k), "a list"),
    dict: (lambda v, k: isinstance(v, dict) and _items_are(v, k), "a mapping"),
}


def _plain(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The option: value table of a JSON (`.json`) or TOML (`.toml`) config file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Config file {path} not found.")
    if path.suffix not in (".json", ".toml"):
        raise InvalidValueError(f"Config file {path} must end in .json or .toml.")
    try:
        if path.suffix == ".json":
            d = json.loads(path.read_text())
        else:
            import tomllib  # Python >= 3.11

            d = tomllib.loads(path.read_text())
    except ImportError:
        raise InvalidValueError(f"Reading {path} needs Python >= 3.11 (tomllib); use a JSON config.") from None
    except ValueError as e:  # JSONDecodeError, TOMLDecodeError, bad UTF-8
        raise InvalidValueError(f"Config file {path} cannot be parsed ({e}); fix its syntax.") from None
    if not isinstance(d, dict):
        raise InvalidValueError(f"Config file {path} must hold a table of option: value pairs.")
    return d

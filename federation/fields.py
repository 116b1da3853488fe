"""Reading wire values: names, typed fields of a JSON object, enum choices.

Every reader raises `InputError` naming the field that was wrong (`what.key`), so a malformed
peer or file is refused with a message instead of corrupting a view (federation/model.py,
federation/drill_model.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from federation.errors import InputError

# DNS-label-like names: lowercase, digits, dashes; what Kubernetes allows for names/namespaces.
# ASCII only, matched whole (`fullmatch`: a `$` would let a trailing newline through).
NAME_PATTERN = "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_NAME = re.compile(NAME_PATTERN)


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InputError(
            f"{what}: {value!r} is not a valid name (lowercase letters, digits and '-', "
            "1-63 characters, starting and ending with a letter or digit)"
        )
    return value


def get_field(obj: Mapping[str, Any], key: str, what: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(obj, Mapping):
        raise InputError(f"{what}: expected an object, got {type(obj).__name__}")
    if key not in obj:
        raise InputError(f"{what}.{key}: missing")
    value = obj[key]
    if isinstance(value, bool) and kind is not bool:
        raise InputError(f"{what}.{key}: expected {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise InputError(f"{what}.{key}: expected {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def choices(kind: type[StrEnum]) -> str:
    return ", ".join(kind)

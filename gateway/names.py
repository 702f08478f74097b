"""Validation of function names and revision ids.

Function names follow Knative service names (Kubernetes DNS-1035 labels), so a function deployed
locally can be deployed to Knative under the same name. Names and revision ids arrive from requests
and the CLI and end up in Redis keys, URLs and log file names: everything that uses them calls these
validators first, so nothing downstream has to think about `..`, `/`, `:` or glob characters.
"""

from __future__ import annotations

import re

MAX_NAME_LEN = 63  # a DNS label
REVISION_DIGITS = 5  # tiny-00001, as Knative numbers revisions

# fullmatch, never match + '$' (which also accepts a trailing newline)
_NAME_CHARS = re.compile(r"[a-z0-9-]*")
_REVISION = re.compile(rf"(?P<name>.+)-(?P<number>[0-9]{{{REVISION_DIGITS}}})")


class InvalidNameError(ValueError):
    """A function name or revision id breaks the naming rules (the message says which rule)."""


def validate_function_name(name: object) -> str:
    """Return `name` if it is a DNS-1035 label (Knative's rule for service names), else raise.

    Rules: 1 to 63 characters; lowercase letters, digits and '-'; starts with a letter; ends with a
    letter or digit.
    """
    if not isinstance(name, str):
        raise InvalidNameError(f"function name must be a string, not {type(name).__name__}")
    if not name:
        raise InvalidNameError("function name must not be empty")
    if len(name) > MAX_NAME_LEN:
        raise InvalidNameError(f"function name {name[:80]!r} is {len(name)} characters long; at most {MAX_NAME_LEN}")
    if not _NAME_CHARS.fullmatch(name):
        raise InvalidNameError(f"function name {name!r} may contain only lowercase letters, digits and '-'")
    if not ("a" <= name[0] <= "z"):
        raise InvalidNameError(f"function name {name!r} must start with a lowercase letter")
    if name.endswith("-"):
        raise InvalidNameError(f"function name {name!r} must end with a lowercase letter or digit")
    return name


def validate_revision_id(rev: object) -> str:
    """Return `rev` if it is `<function name>-<5 digits>` (e.g. `tiny-00001`), else raise."""
    if not isinstance(rev, str):
        raise InvalidNameError(f"revision id must be a string, not {type(rev).__name__}")
    match = _REVISION.fullmatch(rev)
    if match is None:
        raise InvalidNameError(
            f"revision id {rev[:80]!r} must be <function name>-<{REVISION_DIGITS} digits>, e.g. tiny-00001"
        )
    if int(match["number"]) == 0:
        raise InvalidNameError(f"revision id {rev!r}: revision numbers start at 1")
    try:
        validate_function_name(match["name"])
    except InvalidNameError as exc:
        raise InvalidNameError(f"revision id {rev!r}: {exc}") from None
    return rev

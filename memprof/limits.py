"""Bounds on the text memprof parses, checked before parsing it.

Python's parsers recurse per level of nesting and convert numbers whole, so a deeply nested JSON or
TOML file, a number with thousands of digits or a hyperparameter value of thousands of unary
minus signs would end in a ``RecursionError``, ``MemoryError`` or ``ValueError`` traceback. Each
check here refuses such input with one ``UsageError`` line that names the limit. The limits are
far above anything memprof writes or a person types.
"""

from __future__ import annotations

import itertools
import re

from memprof.errors import UsageError

MAX_DEPTH = 64
"""Brackets nested in a JSON run file or a TOML config, and parts of a TOML dotted key; memprof's own
files nest 5 deep."""
MAX_NUMBER_CHARS = 100
"""Characters of one number in a JSON or TOML file; a byte count has at most 20 digits."""
MAX_VALUE_CHARS = 200
"""Characters of one hyperparameter value (``betas=(0.9,0.999)`` has 12)."""
MAX_VALUE_DEPTH = 8
"""Brackets nested in one hyperparameter value."""
MAX_NAME_CHARS = 4096
"""Characters of a model name or path (Linux's PATH_MAX)."""
MAX_CSV_LINE = 20_000
"""Characters of one line of a CSV run file; memprof writes a few hundred (a 4096-character model path fits)."""
MAX_INTEGER_CHARS = 40
"""Characters of an integer written as text (a 64-bit integer has 20, ``12.0`` spellings a few more)."""

_JSON_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_TOML_STRINGS_AND_COMMENTS = re.compile(
    r"'''.*?'''|\"\"\"(?:[^\\]|\\.)*?\"\"\"|'[^'\n]*'|\"(?:[^\"\\\n]|\\.)*\"|#[^\n]*", re.DOTALL)
_LONG_NUMBER = re.compile(rf"(?<![\w.])\d[\w.]{{{MAX_NUMBER_CHARS},}}")
_LONG_DOTTED_KEY = re.compile(rf'(?<![\w"-])(?:[\w-]+|"")(?:\s*\.\s*(?:[\w-]+|"")){{{MAX_DEPTH},}}')
_NESTING = {"[": 1, "{": 1, "(": 1, "]": -1, "}": -1, ")": -1}


def shorten(text: str, keep: int = 40) -> str:
    """``text`` for a message: its start, and how long it is when that is not all of it."""
    return repr(text) if len(text) <= keep else f"{text[:keep]!r}… ({len(text):,} characters)"


def depth(code: str) -> int:
    """How deep brackets nest in ``code`` (text with its strings taken out)."""
    steps = map(_NESTING.get, re.sub(r"[^\[\]{}()]", "", code))
    return max(itertools.accumulate(steps, initial=0))


def check_json(text: str, what: str) -> None:
    """Refuse JSON nested deeper than ``MAX_DEPTH`` or holding a number longer than ``MAX_NUMBER_CHARS``."""
    _check_code(_JSON_STRINGS.sub('""', text), what)


def check_toml(text: str, what: str) -> None:
    """As ``check_json``, for TOML's strings and comments; and no dotted key (``a.b.c``, also in a
    table header) of more than ``MAX_DEPTH`` parts, which nest tables without brackets and take
    Python's TOML parser quadratic time."""
    code = _TOML_STRINGS_AND_COMMENTS.sub('""', text)
    _check_code(code, what)
    if _LONG_DOTTED_KEY.search(code):
        raise UsageError(f"{what} has a dotted key of more than {MAX_DEPTH} parts")


def _check_code(code: str, what: str) -> None:
    if depth(code) > MAX_DEPTH:
        raise UsageError(f"{what} nests brackets more than {MAX_DEPTH} deep")
    number = _LONG_NUMBER.search(code)
    if number:
        raise UsageError(f"{what} has a number of {len(number.group()):,} characters; "
                         f"a number has at most {MAX_NUMBER_CHARS}")


def check_value(text: str, what: str) -> None:
    """Refuse a hyperparameter value longer than ``MAX_VALUE_CHARS`` or nested deeper than
    ``MAX_VALUE_DEPTH`` before Python's parser reads it."""
    if len(text) > MAX_VALUE_CHARS:
        raise UsageError(f"{what}: the value {shorten(text)} is too long; a value has at most "
                         f"{MAX_VALUE_CHARS} characters")
    if depth(_JSON_STRINGS.sub("", re.sub(r"'(?:[^'\\]|\\.)*'", "", text))) > MAX_VALUE_DEPTH:
        raise UsageError(f"{what}: the value {shorten(text)} nests brackets more than {MAX_VALUE_DEPTH} deep")


def check_name(name: str, what: str) -> None:
    """Refuse a model name or path longer than ``MAX_NAME_CHARS``."""
    if len(name) > MAX_NAME_CHARS:
        raise UsageError(f"{what} {shorten(name)} is too long; a name or path has at most {MAX_NAME_CHARS} characters")

"""Config files fuzzed (Hypothesis): any text, and a valid gateway file mutated line by line or
byte by byte, either parses or raises ConfigError whose every problem names the file (never
another exception: a gateway that starts, or a reload, must say what is wrong and where).
The unknown-field property of every section is in test_load.py."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config.schema import parse_config
from gateway.errors import ConfigError
from tests.gateway.config.samples import EXPORT, IMPORT, MINIMAL, SRC

VALID = MINIMAL + EXPORT + IMPORT
LINES = VALID.splitlines(keepends=True)
FEW = settings(max_examples=200, deadline=None)
YAMLISH = st.sampled_from([": ", "- ", "  ", "\n", "{", "}", "[", "]", "&a ", "*a", "!!int ",
                           "'", '"', "#", "? ", "|", ">", "~", "0x1f", "1e9", "-1", "10s",
                           "127.0.0.1:80", "::", "\t", "\x00", "é", "%TAG ! x\n", "---\n"])


def _parses_or_says_where(text: str) -> None:
    try:
        parse_config(text, SRC)
    except ConfigError as e:
        assert e.problems and all(p.file == str(SRC) for p in e.problems), e.problems


def test_the_unmutated_file_parses():  # the mutations start from a valid file
    assert parse_config(VALID, SRC).cluster.name == "east-1"


@FEW
@given(st.text(max_size=300) | st.lists(YAMLISH, max_size=30).map("".join))
def test_any_text_parses_or_says_where(text):
    _parses_or_says_where(text)


@FEW
@given(st.integers(0, len(LINES) - 1), st.lists(YAMLISH, min_size=1, max_size=4).map("".join),
       st.sampled_from(["replace", "insert", "append", "delete"]))
def test_a_line_of_a_valid_file_mutated_parses_or_says_where(i, junk, how):
    lines = list(LINES)
    if how == "replace":
        lines[i] = junk + "\n"
    elif how == "insert":
        lines.insert(i, junk + "\n")
    elif how == "append":
        lines[i] = lines[i].rstrip("\n") + junk + "\n"
    else:
        del lines[i]
    _parses_or_says_where("".join(lines))


@FEW
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.characters()), min_size=1,
                max_size=4))
def test_characters_of_a_valid_file_changed_parse_or_say_where(changes):
    text = list(VALID)
    for at, ch in changes:
        text[at] = ch
    _parses_or_says_where("".join(text))

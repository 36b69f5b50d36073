"""The bounded readers of finqlora.core.safe_input at their bounds (the CLI paths that use them
are in tests/store/test_input_hardening.py)."""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest
import yaml

from finqlora.core.errors import FinqloraError
from finqlora.core.safe_input import (
    MAX_CSV_FIELD_CHARS,
    MAX_DEPTH,
    MAX_YAML_NODES,
    InputError,
    YAMLLimitError,
    csv_rows,
    json_loads,
    yaml_load,
)


def _nested_list(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("as_bytes", [False, True])
def test_json_depth_bound_is_exact(as_bytes: bool) -> None:
    deepest = _nested_list(MAX_DEPTH)
    too_deep = _nested_list(MAX_DEPTH + 1)
    assert json_loads(deepest.encode() if as_bytes else deepest) == json.loads(deepest)
    with pytest.raises(InputError, match=f"nested deeper than {MAX_DEPTH} levels"):
        json_loads(too_deep.encode() if as_bytes else too_deep)


def test_json_many_shallow_brackets_are_not_deep() -> None:
    """The bracket count only decides whether to walk; wide input under the depth bound passes."""
    wide = "[" + ",".join(["[1]"] * (MAX_DEPTH * 3)) + "]"
    assert len(json_loads(wide)) == MAX_DEPTH * 3


def test_json_far_too_deep_input_is_an_input_error_not_a_recursion_error() -> None:
    with pytest.raises(InputError, match="nested deeper"):
        json_loads(_nested_list(100_000))


def test_json_huge_integer_and_syntax_errors_say_what_and_where() -> None:
    digits = sys.get_int_max_str_digits()
    with pytest.raises(InputError, match=f"an integer of more than {digits:,} digits"):
        json_loads('{"ctime": 1' + "0" * digits + "}")
    with pytest.raises(InputError, match=r"^Expecting value at column 7$"):
        json_loads('{"a": }')
    with pytest.raises(InputError, match=r"^Expecting property name enclosed in double quotes at line 2, column 5$"):
        json_loads('{"a":\n  1,,}')
    with pytest.raises(InputError, match=r"not UTF-8 \(byte 6\)"):
        json_loads(b'{"a": \xff}')


def test_json_lone_surrogate_is_refused_and_a_pair_is_text() -> None:
    assert json_loads(r'"\ud83d\ude00"') == "\U0001F600"
    assert json_loads(rb'"\ud83d\ude00"') == "\U0001F600"
    with pytest.raises(InputError, match=r"a lone surrogate \\ud800"):
        json_loads(r'{"x": ["ok", "\ud800"]}')


def test_yaml_alias_bomb_over_the_node_bound_is_refused() -> None:
    # 10 levels of 10 aliases each: 10**9 values once expanded, a few hundred bytes of text.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    with pytest.raises(YAMLLimitError, match=f"more than {MAX_YAML_NODES:,} values"):
        yaml_load("\n".join(lines))


def test_yaml_aliases_within_the_bound_load_as_safe_load_does() -> None:
    text = "base: &b {lr: 0.001, steps: [1, 2, 3]}\nrun1: *b\nrun2: {<<: *b, lr: 0.01}\n"
    assert yaml_load(text) == yaml.safe_load(text)


def test_yaml_depth_bound_is_exact_and_limit_errors_are_yaml_errors() -> None:
    assert yaml_load(_nested_list(MAX_DEPTH - 1)) == json.loads(_nested_list(MAX_DEPTH - 1))
    with pytest.raises(yaml.YAMLError, match=f"nested deeper than {MAX_DEPTH} levels"):
        yaml_load(_nested_list(MAX_DEPTH + 1))


def test_yaml_huge_integer_is_a_limit_error() -> None:
    with pytest.raises(YAMLLimitError, match="digits"):
        yaml_load("steps: 1" + "0" * sys.get_int_max_str_digits())


def test_csv_rows_read_long_fields_and_name_the_line_of_a_bad_one() -> None:
    long_field = "x" * 200_000  # over csv's own default of 131,072
    text = f"id,text\n1,short\n2,{long_field}\n"
    rows = list(csv_rows(csv.DictReader(io.StringIO(text)), "news.csv"))
    assert [(line, row["id"], len(row["text"])) for line, row in rows] == [(2, "1", 5), (3, "2", 200_000)]

    too_long = f"id,text\n1,ok\n2,{'y' * (MAX_CSV_FIELD_CHARS + 1)}\n"
    with pytest.raises(FinqloraError, match=f"news.csv, line 3: a field of more than {MAX_CSV_FIELD_CHARS:,} characters"):
        list(csv_rows(csv.reader(io.StringIO(too_long)), "news.csv"))

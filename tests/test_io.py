"""Strict JSON: what lorabooth writes parses with a reader that rejects NaN."""

import json
import math

import pytest

from helpers import strict_loads
from lorabooth.core.fileio import nan_to_none, to_json, write_json


def test_non_finite_floats_become_null_at_any_depth(tmp_path):
    data = {"mean": math.nan, "rows": [{"std": math.inf}, (1.5, -math.inf)], "n": 0, "s": "nan"}
    assert nan_to_none(data) == {"mean": None, "rows": [{"std": None}, [1.5, None]], "n": 0, "s": "nan"}
    assert strict_loads(to_json(data)) == nan_to_none(data)
    write_json(tmp_path / "x.json", data)
    assert strict_loads((tmp_path / "x.json").read_text())["mean"] is None


def test_finite_data_is_written_as_json_dumps_writes_it():
    data = {"b": [1, 2.5, True, None], "a": "x"}
    assert to_json(data, sort_keys=True) == json.dumps(data, sort_keys=True)


def test_strict_reader_rejects_what_python_writes_by_default():
    with pytest.raises(ValueError, match="NaN"):
        strict_loads(json.dumps({"x": math.nan}))

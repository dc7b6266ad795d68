"""Loading local dataset files, and the one-line errors for broken ones."""

import json

import pytest

from attune.data.sources import DataError, load_rows


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf_cache")


def test_jsonl_csv_and_text_files(tmp_path, cache):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(5))
    )
    rows = load_rows(str(jsonl), cache_dir=cache)
    assert len(rows) == 5 and rows[2] == {"prompt": "q2", "completion": "a2"}
    csv = tmp_path / "data.csv"
    csv.write_text("instruction,output\nsay hi,hi\nsay bye,bye\n")
    assert load_rows(str(csv), cache_dir=cache)[1] == {"instruction": "say bye", "output": "bye"}
    text = tmp_path / "book.txt"
    text.write_text("first line\nsecond line\n")
    assert [r["text"] for r in load_rows(str(text), cache_dir=cache)] == [
        "first line",
        "second line",
    ]


def test_split_slicing_and_filter(tmp_path, cache):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"n": i}) for i in range(10)))
    assert len(load_rows(str(jsonl), split="train[:30%]", cache_dir=cache)) == 3
    evens = load_rows(str(jsonl), filter_fn=lambda row: row["n"] % 2 == 0, cache_dir=cache)
    assert [r["n"] for r in evens] == [0, 2, 4, 6, 8]


def test_missing_file(tmp_path, cache):
    with pytest.raises(DataError, match=r"dataset file not found: .*nope.jsonl"):
        load_rows(str(tmp_path / "nope.jsonl"), cache_dir=cache)


def test_malformed_json_line_is_named(tmp_path, cache):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"a": 1}\n{"a": 2}\n{"a": 3\n{"a": 4}\n')
    with pytest.raises(DataError) as error:
        load_rows(str(jsonl), cache_dir=cache)
    assert str(error.value).startswith(f"{jsonl}:3: malformed JSON line (")


def test_empty_after_filtering(tmp_path, cache):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"a": 1}\n{"a": 2}\n')
    with pytest.raises(DataError, match=r"no rows left after filtering \(2 before\)"):
        load_rows(str(jsonl), filter_fn=lambda row: False, cache_dir=cache)


def test_unsupported_file_type(tmp_path, cache):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '.xlsx'"):
        load_rows(str(path), cache_dir=cache)

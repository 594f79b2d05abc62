"""Tests for alignkit.data: sources, validation, duplicates and the seeded split."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_jsonl
from datasets import Dataset

from alignkit.data import BUNDLED_DATASET, PREFERENCE_COLUMNS, bundled_dataset_path, make_dataset, usable_rows
from alignkit.errors import UserError


def _rows(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"question {i}?", "chosen": f"warm answer {i}!", "rejected": f"formal answer {i}."}
            for i in range(n)]


@pytest.fixture
def jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prefs.jsonl", _rows(20))


def _prompts(ds: Dataset) -> list[str]:
    return list(ds["prompt"])


# --- split ------------------------------------------------------------------------------------


def test_split_is_seeded_and_reproducible(jsonl):
    train_a, test_a = make_dataset(jsonl, test_size=0.25, seed=7)
    train_b, test_b = make_dataset(str(jsonl), test_size=0.25, seed=7)
    assert _prompts(train_a) == _prompts(train_b) and _prompts(test_a) == _prompts(test_b)
    _, test_c = make_dataset(jsonl, test_size=0.25, seed=8)
    assert set(_prompts(test_c)) != set(_prompts(test_a))


def test_split_sizes_cover_every_row_once(jsonl):
    train, test = make_dataset(jsonl, test_size=0.25)
    assert (len(train), len(test)) == (15, 5)
    assert sorted(_prompts(train) + _prompts(test)) == sorted(r["prompt"] for r in _rows(20))
    assert train.column_names == list(PREFERENCE_COLUMNS)
    train, test = make_dataset(jsonl, test_size=3)
    assert (len(train), len(test)) == (17, 3)
    _, test = make_dataset(jsonl, test_size=0.01)  # rounded up so the test split is never empty
    assert len(test) == 1


def test_fraction_is_not_rounded_up_by_float_error(tmp_path):
    path = write_jsonl(tmp_path / "25.jsonl", _rows(25))
    _, test = make_dataset(path, test_size=0.28)  # 0.28 * 25 is 7.000000000000001 in floats
    assert len(test) == 7


@pytest.mark.parametrize("bad", [0, 20, 25, 0.0, 1.0, 1.5, -0.2, True, "0.1", None])
def test_bad_test_size_is_user_error(jsonl, bad):
    with pytest.raises(UserError, match="--test-size"):
        make_dataset(jsonl, test_size=bad)


def test_single_row_cannot_be_split(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", _rows(1))
    with pytest.raises(UserError, match="at least 2"):
        make_dataset(path)


# --- validation -------------------------------------------------------------------------------


def test_bad_rows_are_dropped_and_counted(tmp_path, caplog):
    rows = _rows(10)
    rows[1]["chosen"] = "   "          # blank
    rows[2]["rejected"] = None         # missing
    del rows[3]["prompt"]              # missing
    rows[4]["prompt"] = True           # not text (a number would be read as its text)
    rows[5]["chosen"] = ""             # blank
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        train, test = make_dataset(path, test_size=1)
    assert len(train) + len(test) == 5
    kept = set(_prompts(train) + _prompts(test))
    assert kept == {f"question {i}?" for i in (0, 6, 7, 8, 9)}
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "dropped 5 of 10 rows" in message
    assert "2 with a missing value" in message and "2 with an empty value" in message
    assert "1 with a non-string value" in message


def test_duplicates_are_dropped_and_counted(tmp_path, caplog):
    rows = _rows(6) + _rows(2)
    path = write_jsonl(tmp_path / "dups.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        train, test = make_dataset(path, test_size=1)
    assert len(train) + len(test) == 6
    assert "dropped 2 exact duplicate rows" in caplog.text


def test_missing_columns_are_named(tmp_path):
    rows = [{"question": "q", "chosen": "a", "answer_b": "b"}] * 3
    path = write_jsonl(tmp_path / "wrong.jsonl", rows)
    with pytest.raises(UserError) as info:
        make_dataset(path)
    message = str(info.value)
    assert "prompt, rejected" in message and "question, chosen, answer_b" in message
    assert "\n" not in message


def test_custom_columns_keep_only_those(tmp_path):
    rows = [{"text": f"row {i}", "extra": i} for i in range(5)]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    train, test = make_dataset(path, test_size=1, columns=["text"])
    assert train.column_names == ["text"] and len(train) + len(test) == 5


def test_nothing_usable_is_user_error(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": " ", "chosen": "a", "rejected": "b"}])
    with pytest.raises(UserError, match="no usable rows"):
        make_dataset(path)


def test_missing_file_unknown_type_and_bad_name(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl' does not exist"):
        make_dataset(tmp_path / "nope.jsonl")
    odd = tmp_path / "data.txt"
    odd.write_text("hello")
    with pytest.raises(UserError, match=r"\.jsonl, \.json, \.csv, \.tsv, \.parquet"):
        make_dataset(odd)
    with pytest.raises(UserError, match=r"not a bundled set \(human-like-sample"):
        make_dataset("not-a-dataset-name")


def test_invalid_json_line_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(_rows(1)[0]) + "\n{oops\n")
    with pytest.raises(UserError, match="line 2"):
        make_dataset(path)


# --- formats ----------------------------------------------------------------------------------


def _write(fmt: str, path: Path, rows: list[dict]) -> Path:
    if fmt == "jsonl":
        return write_jsonl(path, rows)
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "json-columns":
        path.write_text(json.dumps({c: [r[c] for r in rows] for c in rows[0]}))
    elif fmt == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif fmt == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("fmt, suffix", [("jsonl", ".jsonl"), ("json", ".json"), ("json-columns", ".json"),
                                         ("csv", ".csv"), ("parquet", ".parquet")])
def test_each_file_format_loads_the_same_rows(tmp_path, fmt, suffix):
    rows = _rows(10)
    rows[0]["chosen"] = "Sure, \"quoted\", with commas\nand a newline"
    path = _write(fmt, tmp_path / f"prefs{suffix}", rows)
    train, test = make_dataset(path, test_size=2, seed=3)
    reference_train, reference_test = make_dataset(write_jsonl(tmp_path / "ref.jsonl", rows), test_size=2, seed=3)
    assert train.to_list() == reference_train.to_list() and test.to_list() == reference_test.to_list()


def test_csv_empty_cells_are_dropped(tmp_path, caplog):
    path = tmp_path / "holes.csv"
    path.write_text("prompt,chosen,rejected\nhi,hey!,Greetings.\nyo,,Salutations.\nsup,hello!,Good day.\n")
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        train, test = make_dataset(path, test_size=1)
    assert len(train) + len(test) == 2
    assert "1 with a missing value" in caplog.text


def test_tab_separated_files_read_as_tsv_and_other_separators_in_a_csv_are_named(tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("prompt\tchosen\trejected\nhi, you\they!\tGreetings.\nyo\tsup!\tSalutations.\n")
    train, test = make_dataset(tsv, test_size=1)
    assert sorted(list(train["prompt"]) + list(test["prompt"])) == ["hi, you", "yo"]
    semicolons = tmp_path / "semi.csv"   # a comma inside one answer makes pandas see two fields there
    semicolons.write_text("prompt;chosen;rejected\nhi;hey!;Greetings.\nyo;sup, friend!;Salutations.\n")
    with pytest.raises(UserError, match=r"could not read .*semi.csv': .* \(its first line is separated by semicolons, "
                                        r"not commas: save it as comma-separated\)$"):
        make_dataset(semicolons, test_size=1)
    tabs = tmp_path / "tabs.csv"
    tabs.write_text("prompt\tchosen\trejected\nhi\they!\tGreetings.\nyo\tsup, friend!\tSalutations.\n")
    with pytest.raises(UserError, match=r"separated by tabs, not commas: save it as comma-separated, or as a .tsv file"):
        make_dataset(tabs, test_size=1)


def test_csv_text_that_reads_like_a_missing_value_is_kept(tmp_path, caplog):
    words = ["None", "NA", "null", "N/A", "nan", "NULL", "n/a", "#N/A"]
    path = tmp_path / "words.csv"
    path.write_text("prompt,chosen,rejected\n" + "".join(f"say {w},{w},no\n" for w in words))
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        train, test = make_dataset(path, test_size=1)
    assert sorted(list(train["chosen"]) + list(test["chosen"])) == sorted(words)
    assert "dropped" not in caplog.text


def test_windows_line_ends_of_a_csv_become_newlines_inside_quoted_cells_too(tmp_path):
    path = tmp_path / "windows.csv"
    path.write_bytes(b'prompt,chosen,rejected\r\nList two fruits,"Apple\r\nPear",Fruit.\r\nhi,hey!,Greetings.\r\n')
    train, test = make_dataset(path, test_size=1)
    assert sorted(list(train["chosen"]) + list(test["chosen"])) == ["Apple\nPear", "hey!"]
    assert sorted(list(train["rejected"]) + list(test["rejected"])) == ["Fruit.", "Greetings."]


def test_pairs_with_the_same_answer_twice_are_dropped_and_counted(tmp_path, caplog):
    rows = _rows(6)
    rows[2]["rejected"] = rows[2]["chosen"]
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        train, test = make_dataset(write_jsonl(tmp_path / "same.jsonl", rows), test_size=1)
    assert len(train) + len(test) == 5 and rows[2]["prompt"] not in list(train["prompt"]) + list(test["prompt"])
    assert "1 with the same chosen and rejected answer" in caplog.text


def test_columns_no_shape_reads_are_named_in_a_warning(tmp_path, caplog):
    rows = [{"context": "Some background.", **row} for row in _rows(4)]
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        make_dataset(write_jsonl(tmp_path / "ctx.jsonl", rows), test_size=1)
    assert "column(s) context are not read" in caplog.text


@pytest.mark.parametrize("name, text, needle", [
    ("semi.csv", "prompt;chosen;rejected\nq;a;b\nr;c;d\n", "is the file not comma-separated?"),
    ("text.jsonl", '{"text": "a"}\n{"text": "b"}\n', "plain 'text' rows are not supported"),
    ("named.jsonl", '{"question": "q", "good": "a", "bad": "b"}\n' * 2, "--prompt-column, --chosen-column and"),
    ("array.jsonl", json.dumps(_rows(2)), "looks like one JSON array: name it .json"),
    ("lines.jsonl", json.dumps(_rows(2), indent=1), "looks like one JSON array: name it .json"),
])
def test_likely_mistakes_get_a_hint(tmp_path, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError) as info:
        make_dataset(path)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_mistyped_path_in_a_local_folder_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(UserError, match="dataset file 'data/prefs' does not exist"):
        make_dataset("data/prefs")


# --- bundled set and hub ----------------------------------------------------------------------


def test_bundled_dataset_loads():
    assert bundled_dataset_path().is_file(), f"the package lacks its bundled dataset {bundled_dataset_path()}"
    train, test = make_dataset(BUNDLED_DATASET)
    assert len(train) > len(test) > 0
    assert train.column_names == list(PREFERENCE_COLUMNS)
    row = train[0]
    assert all(isinstance(row[c], str) and row[c].strip() for c in PREFERENCE_COLUMNS)


def test_hub_id_offline_is_user_error(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/prefs' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(UserError) as info:
        make_dataset("org/prefs")
    assert "org/prefs" in str(info.value) and BUNDLED_DATASET in str(info.value)


def test_hub_dataset_goes_through_the_same_checks(monkeypatch, caplog):
    import datasets

    rows = [dict(r, source="web") for r in _rows(8)]
    rows[0]["rejected"] = ""
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: Dataset.from_list(rows))
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        train, test = make_dataset("org/prefs", test_size=2)
    assert (len(train), len(test)) == (5, 2) and train.column_names == list(PREFERENCE_COLUMNS)
    assert "dropped 1 of 8 rows" in caplog.text
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: Dataset.from_list([{"text": "x"}]))
    with pytest.raises(UserError, match="lacks column.*prompt, chosen, rejected; it has: text"):
        make_dataset("org/prefs")


def test_an_unreachable_hub_fails_a_dataset_id_at_once_with_the_reason(monkeypatch, tmp_path):
    import time

    import datasets  # noqa: F401  (imported first, as alignkit does, so its offline flag is the one switched)

    import alignkit.hub

    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")   # refused at once
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", tmp_path / "datasets")
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(alignkit.hub, "_REACHABLE", {})
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        make_dataset("org/not-cached-prefs")
    assert time.monotonic() - start < 20
    assert str(info.value) == ("could not load dataset 'org/not-cached-prefs': the Hugging Face hub "
                               "(http://127.0.0.1:9) cannot be reached from here and it is not in the local cache; "
                               f"the bundled '{BUNDLED_DATASET}' works offline")


def test_a_hub_dataset_split_is_named_after_a_colon(monkeypatch):
    import datasets

    asked = []

    def load(repo_id, split):
        asked.append((repo_id, split))
        if split not in ("train", "train_prefs"):
            raise ValueError(f'Unknown split "{split}". Should be one of [\'train_prefs\', \'test_prefs\'].')
        return Dataset.from_list(_rows(6))

    monkeypatch.setattr(datasets, "load_dataset", load)
    make_dataset("org/prefs", test_size=1)
    make_dataset("org/prefs:train_prefs", test_size=1)
    assert asked == [("org/prefs", "train"), ("org/prefs", "train_prefs")]
    with pytest.raises(UserError) as info:
        make_dataset("org/prefs:validation")
    assert str(info.value) == ("dataset 'org/prefs:validation': Unknown split \"validation\". Should be one of "
                               "['train_prefs', 'test_prefs']; name one as org/prefs:SPLIT")


def test_an_eval_dataset_is_the_held_out_split_and_all_of_the_dataset_trains(tmp_path, caplog):
    rows = _rows(10)
    data = write_jsonl(tmp_path / "train.jsonl", rows[:8])
    held = write_jsonl(tmp_path / "test.jsonl", rows[6:])   # 2 of its 4 rows are training rows too
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        train, test = make_dataset(data, eval_dataset=held, seed=3)
    assert sorted(train["prompt"]) == sorted(r["prompt"] for r in rows[:8])
    assert list(test["prompt"]) == [r["prompt"] for r in rows[6:]]   # in file order, all of them
    assert f"dataset '{held}': 2 of its 4 rows are also in the training data" in caplog.text
    with pytest.raises(UserError, match="missing.jsonl' does not exist"):
        make_dataset(data, eval_dataset=tmp_path / "missing.jsonl")


def test_an_eval_dataset_may_name_its_columns_and_shape_apart_from_the_training_data(tmp_path):
    from alignkit.columns import ColumnMap, EvalColumnMap

    train_rows = [{"question": f"q{i}", "good": f"yes {i}", "bad": f"no {i}"} for i in range(6)]
    data = write_jsonl(tmp_path / "train.jsonl", train_rows)
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"}
                                                  for i in range(3)])
    named = ColumnMap(prompt="question", chosen="good", rejected="bad")
    # Without an eval map the training data's names apply to both files: the held-out file lacks them.
    with pytest.raises(UserError, match=r"held.jsonl' has no column 'question' \(--prompt-column\)"):
        make_dataset(data, column_map=named, eval_dataset=held)
    train, test = make_dataset(data, column_map=named, eval_dataset=held, eval_column_map=EvalColumnMap())
    assert sorted(train["prompt"]) == [f"q{i}" for i in range(6)]
    assert list(zip(test["prompt"], test["chosen"], test["rejected"], strict=True)) == [(f"p{i}", f"c{i}", f"r{i}") for i in range(3)]
    # Read with the training data's names, the eval file's error says how to describe it apart.
    with pytest.raises(UserError, match=r"; --eval-columns PART=COLUMN and --eval-format describe the --eval-dataset"):
        make_dataset(data, column_map=named, eval_dataset=held)
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"q": "p", "yes": "c", "no": "r"}] * 2)
    with pytest.raises(UserError, match=r"it has: q, yes, no \(if yours are named differently, name them with "
                                        r"--eval-columns prompt=\.\.\. chosen=\.\.\. rejected=\.\.\.\)"):
        make_dataset(held, eval_dataset=odd)
    # A wrong name in the eval map is reported as that option, not as the training data's flag.
    with pytest.raises(UserError, match=r"no column 'ask' \(--eval-columns prompt=\)"):
        make_dataset(data, column_map=named, eval_dataset=held, eval_column_map=EvalColumnMap(prompt="ask"))
    # Its own shape: ShareGPT conversations as the held-out prompts while training reads text columns.
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": f"s{i}"}], "chosen": {"from": "gpt", "value": "a"},
         "rejected": {"from": "gpt", "value": "b"}} for i in range(2)])
    with pytest.raises(UserError, match=r"sharegpt.jsonl', row 1 is written as sharegpt data, not standard \(.*\); "
                                        r"--eval-columns PART=COLUMN and --eval-format describe"):
        make_dataset(held, format="standard", eval_dataset=sharegpt)
    _, test = make_dataset(data, column_map=named, format="standard", eval_dataset=sharegpt, eval_format="sharegpt",
                           eval_column_map=EvalColumnMap())
    assert [row[-1]["content"] for row in test["prompt"]] == ["s0", "s1"]


@pytest.mark.parametrize("items, problem", [
    (["prompt"], "--eval-columns takes PART=COLUMN with PART one of prompt, response, chosen, rejected, messages, "
                 "system (got 'prompt')"),
    (["answer=x"], "(got 'answer=x')"),
    (["prompt="], "(got 'prompt=')"),
    (["prompt=a", "prompt=b"], "--eval-columns names the prompt column twice"),
])
def test_eval_column_items_that_are_not_part_equals_column_are_named(items, problem):
    from alignkit.columns import EvalColumnMap

    parsed, problems = EvalColumnMap.parse(items)
    assert len(problems) == 1 and problem in problems[0]
    assert EvalColumnMap.parse(["prompt = q", "system=sys"]) == (EvalColumnMap(prompt="q", system="sys"), [])


def test_json_rows_under_one_key_and_pandas_split_json_are_read(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(3)]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": rows}))
    split = tmp_path / "split.json"   # pandas.DataFrame.to_json(orient="split")
    split.write_text(json.dumps({"columns": ["prompt", "chosen", "rejected"], "index": [0, 1, 2],
                                 "data": [[r["prompt"], r["chosen"], r["rejected"]] for r in rows]}))
    for path in (wrapped, split):
        train, test = make_dataset(path, test_size=1)
        assert sorted(list(train["prompt"]) + list(test["prompt"])) == ["q0", "q1", "q2"], path
    split.write_text(json.dumps({"columns": ["prompt", "chosen", "rejected"], "data": [["q", "a"]]}))
    with pytest.raises(UserError, match="has rows whose length differs from its 3 columns"):
        make_dataset(split, test_size=1)


@pytest.mark.parametrize("orient", ["columns", "index", "table", "split", "records"])
def test_every_pandas_to_json_layout_with_column_names_is_read_in_the_frames_order(tmp_path, orient):
    rows = _rows(4)
    path = tmp_path / f"{orient}.json"
    pd.DataFrame(rows, index=[2, 0, 3, 1]).to_json(path, orient=orient)   # the index is not the rows' order
    assert usable_rows(path) == (rows, str(path))


@pytest.mark.parametrize("orient", ["columns", "index"])
def test_a_frame_indexed_by_ids_is_read_by_its_column_names(tmp_path, orient):
    rows = _rows(3)
    path = tmp_path / f"{orient}.json"   # the index is text, so only the column names tell the two sides apart
    pd.DataFrame(rows, index=["q-7", "a1", "z"]).to_json(path, orient=orient)
    assert usable_rows(path) == (rows, str(path))


def test_pandas_json_without_column_names_is_refused_in_one_line(tmp_path):
    advice = ('save the frame with to_json(orient="records", lines=True) as a .jsonl file, or with '
              'to_json(orient="records") as .json')
    values = tmp_path / "values.json"
    pd.DataFrame(_rows(3)).to_json(values, orient="values")
    with pytest.raises(UserError) as err:
        usable_rows(values)
    assert str(err.value) == (f"'{values}' has no column names (a list of value lists, as "
                              f'to_json(orient="values") writes); {advice}')
    numbered = tmp_path / "numbered.json"   # a frame made from lists: its columns are 0, 1, 2
    pd.DataFrame([list(r.values()) for r in _rows(3)]).to_json(numbered)
    with pytest.raises(UserError) as err:
        usable_rows(numbered)
    assert str(err.value) == f"'{numbered}' has no column names (its columns are numbered like its rows); {advice}"


def test_a_dictionary_of_splits_reads_its_train_split_and_says_so(tmp_path, caplog):
    rows = _rows(6)
    path = tmp_path / "splits.json"   # as a DatasetDict is dumped: {"train": [...], "test": [...]}
    path.write_text(json.dumps({"train": rows[:3], "test": rows[3:]}))
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        assert usable_rows(path) == (rows[:3], str(path))
    assert [r.getMessage() for r in caplog.records] == [
        f"dataset file '{path}' holds the splits train, test: reading 'train' (3 rows); alignkit holds out its "
        "own test rows (--test-size), or save another split as its own file and give it as --eval-dataset"]
    path.write_text(json.dumps({"validation": rows[:3], "test": rows[3:]}))
    with pytest.raises(UserError) as err:
        usable_rows(path)
    assert str(err.value) == (f"'{path}' holds several lists of rows (validation, test) and none named 'train'; "
                              "save the rows to train on as their own .jsonl file (another list can be the "
                              "--eval-dataset)")
    # Columns named like splits by chance hold text, not rows: they stay columns.
    path.write_text(json.dumps({"prompt": ["q0", "q1"], "train": ["a0", "a1"], "test": ["b0", "b1"]}))
    assert usable_rows(path, ("prompt", "train", "test"))[0] == [{"prompt": "q0", "train": "a0", "test": "b0"},
                                                                 {"prompt": "q1", "train": "a1", "test": "b1"}]


def test_spaces_around_csv_header_names_are_dropped(tmp_path):
    path = tmp_path / "spaced.csv"
    path.write_text("prompt, chosen ,  rejected\nq0,a0,b0\nq1,a1,b1\n")
    assert usable_rows(path)[0] == [{"prompt": "q0", "chosen": "a0", "rejected": "b0"},
                                    {"prompt": "q1", "chosen": "a1", "rejected": "b1"}]
    spaced = write_jsonl(tmp_path / "spaced.jsonl", [{"prompt": "q", " chosen": "a", "rejected ": "b"}])
    with pytest.raises(UserError, match=r"lacks column\(s\) chosen, rejected; it has: prompt,  chosen, rejected  "
                                        r"\(the column name\(s\) ' chosen', 'rejected ' have spaces around them: "
                                        r"remove the spaces\)$"):
        usable_rows(spaced)


def test_kto_style_rows_do_not_train_sft_on_their_unwanted_completions(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 2 == 0} for i in range(4)]
    with pytest.raises(UserError, match=r"marks 2 of its 4 completions unwanted \(label false, as KTO data does\); "
                                        r"SFT learns every completion it is given: keep the rows labelled true"):
        make_dataset(write_jsonl(tmp_path / "kto.jsonl", rows), task="sft", test_size=1)
    wanted = [r for r in rows if r["label"]]
    train, test = make_dataset(write_jsonl(tmp_path / "wanted.jsonl", wanted), task="sft", test_size=1)
    assert len(train) + len(test) == 2


@pytest.mark.parametrize("marks", [[1, 0, 1, 1], ["yes", False, True, True], [1.0, 0.0, 1.0, 1.0]])
def test_kto_marks_written_as_numbers_or_words_are_read_as_marks(tmp_path, marks):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": m} for i, m in enumerate(marks)]
    with pytest.raises(UserError, match=r"marks 1 of its 4 completions unwanted"):
        make_dataset(write_jsonl(tmp_path / "kto.jsonl", rows), task="sft", test_size=1)


def test_kto_marks_in_a_csv_file_are_read_as_marks(tmp_path):
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label\nq1,a1,False\nq2,a2,True\nq3,a3,True\n")
    with pytest.raises(UserError, match=r"marks 1 of its 3 completions unwanted"):
        make_dataset(path, task="sft", test_size=1)


def test_a_label_column_that_holds_no_marks_is_left_alone(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": name} for i, name in enumerate(["cat", "dog", "0"])]
    train, test = make_dataset(write_jsonl(tmp_path / "classes.jsonl", rows), task="sft", test_size=1)
    assert len(train) + len(test) == 3


def test_an_sft_file_answers_from_one_column_and_a_non_text_alpaca_input_is_dropped(tmp_path, caplog):
    mixed = [{"prompt": "q1", "completion": "a1"}, {"prompt": "q2", "chosen": "c2", "rejected": "r2"},
             {"prompt": "q3", "completion": "a3"}]
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        train, test = make_dataset(write_jsonl(tmp_path / "mixed.jsonl", mixed), task="sft", test_size=1)
    assert sorted(list(train["completion"]) + list(test["completion"])) == ["a1", "a3"]   # never "c2"
    assert "dropped 1 of 3 rows (1 with a missing value)" in caplog.text
    caplog.clear()
    alpaca = [{"instruction": "Double this number.", "input": 3, "output": 6},   # numbers read as text
              {"instruction": "Sum these.", "input": [1, 2], "output": "3"},
              {"instruction": "Say hi.", "input": "", "output": "Hi!"}, {"instruction": "Add.", "input": "1 2", "output": "3"},
              # pandas writes an empty input as NaN (json.dumps' NaN): no input, like ""
              {"instruction": "Wave.", "input": float("nan"), "output": "*waves*"}]
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        train, test = make_dataset(write_jsonl(tmp_path / "alpaca.jsonl", alpaca), task="sft", test_size=1)
    assert sorted(list(train["prompt"]) + list(test["prompt"])) == [
        "Add.\n\n1 2", "Double this number.\n\n3", "Say hi.", "Wave."]
    assert "6" in list(train["completion"]) + list(test["completion"])
    assert "1 with a non-string value" in caplog.text


def test_training_rows_written_in_another_shape_are_found_in_an_eval_dataset(tmp_path, caplog):
    rows = [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(4)]
    as_messages = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                    "chosen": [{"role": "assistant", "content": r["chosen"]}],
                    "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows[:3]]
    as_hh = [{"chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['chosen']}",
              "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['rejected']}"} for r in rows[1:]]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    for name, held in (("messages.jsonl", as_messages), ("hh.jsonl", as_hh)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="alignkit.data"):
            make_dataset(data, eval_dataset=write_jsonl(tmp_path / name, held))
        assert "3 of its 3 rows are also in the training data" in caplog.text, name

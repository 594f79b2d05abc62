"""Preference data: load it, check it, split it.

Every source goes through the same steps: load rows -> check the needed columns exist -> drop
rows with bad values (counted in a warning) -> drop exact duplicates -> seeded train/test split.

Sources (see `make_dataset`): the bundled sample by name, a local `.jsonl` / `.json` / `.csv` /
`.parquet` file, or a Hugging Face hub dataset id.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import numbers
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from datasets import Dataset

from alignkit.columns import (
    KNOWN_COLUMNS,
    ColumnMap,
    EvalColumnMap,
    apply_column_map,
    check_columns,
    column_map_from,
    unread_columns,
)
from alignkit.errors import ArgumentError, UserError
from alignkit.formats import TASKS, detect_shape, normalize, value_problem

logger = logging.getLogger(__name__)

BUNDLED_DATASET = "human-like-sample"
"""Command-line name of the preference set shipped with alignkit (prompt/chosen/rejected)."""

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
FILE_FORMATS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")

# org/name, optionally :split (the hub's split names: letters, digits, _ . -)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(:[\w.-]+)?$")


BUNDLED_CHAT_DATASET = "human-like-chat"
"""Command-line name of the multi-turn conversations shipped with alignkit (`messages`, for SFT)."""

BUNDLED_DATASETS = {BUNDLED_DATASET: "human_like_sample.jsonl", BUNDLED_CHAT_DATASET: "human_like_chat.jsonl"}


def bundled_dataset_path(name: str = BUNDLED_DATASET) -> Path:
    """Path of a bundled set, e.g. `alignkit/resources/human_like_sample.jsonl` for the default."""
    return Path(__file__).resolve().parent / "resources" / BUNDLED_DATASETS[name]


SEED_LIMIT = 2 ** 63
"""Seeds run from 0 up to (not including) this: torch takes a signed 64-bit seed, numpy no negative one."""


def seed_problem(seed) -> str | None:
    """What is wrong with ``seed`` as a random seed (its words after the option's name), or None."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_LIMIT:
        return f"must be a whole number from 0 to {SEED_LIMIT - 1} (got {seed!r})"
    return None


def make_dataset(
    name_or_path: str | os.PathLike = BUNDLED_DATASET,
    test_size: float | int = 0.1,
    seed: int = 42,
    columns: Sequence[str] | None = None,
    *,
    task: str = "preference",
    format: str = "auto",
    column_map: ColumnMap | dict | None = None,
    eval_dataset: str | os.PathLike | None = None,
    eval_format: str | None = None,
    eval_column_map: ColumnMap | dict | None = None,
    refuse_shared: str | None = None,
) -> tuple[Dataset, Dataset]:
    """Load, validate and split a dataset into `(train, test)` `datasets.Dataset`s.

    Args:
        name_or_path: a bundled set (`BUNDLED_DATASETS`), a local `.jsonl`/`.json`/`.csv`/`.parquet`
            file, or a hub id such as `HumanLLMs/Human-Like-DPO-Dataset` (its "train" split is used).
        test_size: a fraction in (0, 1) (the test count is rounded up) or a row count.
        seed: seeds the shuffle before the split; the same seed gives the same split.
        columns: instead of a task, plain text columns every row needs; only these are kept.
        task: `"preference"` (prompt/chosen/rejected for DPO) or `"sft"` (prompt/completion, or
            whole conversations as `messages`). See `alignkit.formats` for every accepted shape.
        format: `auto` (recognised from the rows) or one of `standard`, `conversational`,
            `sharegpt`, `alpaca` to insist on it.
        column_map: which of the file's columns hold the prompt, answers or messages: a `ColumnMap`
            or a dict such as `{"prompt": "question", "chosen": "good", "rejected": "bad"}`.
        eval_dataset: a second dataset (any source above, read the same way) whose rows are the
            test split; every usable row of `name_or_path` is then training data and `test_size`
            is not used. Rows found in both are counted in a warning, or, with `refuse_shared` (the
            reason they cannot be used), are a `UserError` that ends with it.
        eval_format, eval_column_map: the `eval_dataset`'s shape and columns where they differ from
            the training data's (`None`: `format` and `column_map` apply to both).

    Files must be UTF-8 text (a byte-order mark is accepted); any other bytes make the whole file
    an error naming the line, since a wrong encoding garbles every row, not just one. In `.jsonl`
    every line must be one JSON object, in `.json` every list item; a `.json` file may also hold an
    object of column lists, what pandas' `to_json` writes (but for orient="values", which names no
    column) or a dictionary of splits (its "train" split is read). Spaces around a CSV header's names
    are dropped.

    Rows with a missing, non-string or blank text value (or message) are dropped, and so are
    rows whose text is not valid Unicode (a lone surrogate such as the JSON escape `"\\ud800"`:
    valid JSON, but it can be neither tokenized nor stored) and exact duplicates. Each drop is
    counted in a warning; when nothing is left the error repeats the counts.

    Raises `UserError` for a missing, unreadable or empty file, an unknown format, a file that is
    not UTF-8 or not valid JSON (with the line), a row that is not an object, missing columns,
    rows of mixed shapes or malformed conversations (with the row), no usable rows, a bad
    `test_size`, or too few rows to split.
    """
    problem = seed_problem(seed)
    if problem:
        raise UserError(f"seed {problem}")
    seed = int(seed)
    if task not in TASKS:
        raise ArgumentError(f"task must be one of {', '.join(TASKS)} (got {task!r}): preference rows train DPO, "
                            "sft rows SFT")
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ArgumentError(f"name_or_path must be a file path, a bundled set's name or a hub id (got "
                            f"{type(name_or_path).__name__}); rows already in memory go to SFTGym / PreferenceGym "
                            "as they are")
    if columns is not None:
        columns = _check_columns_arg(columns)
    column_map, eval_column_map = column_map_from(column_map), column_map_from(eval_column_map, "eval_column_map")
    named = _naming_the_file if eval_dataset is not None else contextlib.nullcontext
    with named(name_or_path):
        rows, label = usable_rows(name_or_path, columns, task=task, format=format, column_map=column_map)
    order = np.random.default_rng(seed).permutation(len(rows))
    if eval_dataset is not None:
        apart = eval_column_map is not None or eval_format is not None   # described apart from the training data
        with named(eval_dataset):
            held_out, eval_label = usable_rows(
                eval_dataset, columns, task=task, format=eval_format or format,
                column_map=eval_column_map if eval_column_map is not None else column_map, hint_map=EvalColumnMap(),
                shape_hint="" if apart else ("; --eval-columns PART=COLUMN and --eval-format describe the "
                                             "--eval-dataset apart from the training data"))
        train_rows = [rows[i] for i in order]
        keys = {row_key(r) for r in train_rows}
        shared = sum(row_key(r) in keys for r in held_out)
        if shared and refuse_shared:
            raise UserError(f"--eval-dataset {eval_dataset} shares {shared} row(s) with the training data; "
                            f"{refuse_shared}")
        if shared:
            logger.warning("dataset '%s': %d of its %d rows are also in the training data '%s' (their scores "
                           "measure memory, not generalisation)", eval_label, shared, len(held_out), label)
        return Dataset.from_list(train_rows), Dataset.from_list(held_out)
    n_test = _test_count(test_size, len(rows), label)
    test_rows = [rows[i] for i in order[:n_test]]
    train_rows = [rows[i] for i in order[n_test:]]
    return Dataset.from_list(train_rows), Dataset.from_list(test_rows)


def _refuse_labelled_completions(records: list[dict], found: list[str], task: str, label: str) -> None:
    """KTO-style rows (a completion per prompt, a true/false ``label`` on whether it is wanted) cannot train SFT
    as they are: every completion would be learned, the unwanted ones too."""
    if task == "sft" and "label" in found and records:
        wanted = [_as_flag(r.get("label")) for r in records]
        unwanted = wanted.count(False)
        if unwanted and None not in wanted:
            raise UserError(f"dataset '{label}' marks {unwanted} of its {len(records)} completions unwanted (label "
                            "false, as KTO data does); SFT learns every completion it is given: keep the rows "
                            "labelled true and drop the label column")


_FLAG_WORDS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


def _as_flag(value) -> bool | None:
    """``value`` read as a yes/no mark, as JSON, CSV or parquet write one (true, 0, "False", "yes", 1.0),
    else None."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Number):
        return bool(value) if value in (0, 1) else None
    if isinstance(value, str):
        return _FLAG_WORDS.get(value.strip().lower())
    return None


@contextlib.contextmanager
def _ending_with(hint: str):
    """A UserError raised inside ends with ``hint`` (nothing changes when it is empty)."""
    try:
        yield
    except UserError as err:
        if hint:
            raise UserError(f"{err}{hint}") from None
        raise


@contextlib.contextmanager
def _naming_the_file(name):
    """Row errors raised inside name the dataset they are about (with two datasets, either could be meant)."""
    try:
        yield
    except UserError as err:
        if str(err).startswith("row "):
            raise UserError(f"dataset '{os.fspath(name)}', {err}") from None
        raise


def usable_rows(name_or_path: str | os.PathLike, columns: tuple[str, ...] | None = None, *, task: str = "preference",
                format: str = "auto", column_map: ColumnMap | None = None,
                hint_map: ColumnMap | None = None, shape_hint: str = "") -> tuple[list[dict], str]:
    """Every usable row of one dataset (converted, bad rows and duplicates dropped with a warning) and its label.

    Arguments as for :func:`make_dataset`; ``hint_map`` says which options a missing-columns error suggests
    (default: ``column_map``'s); ``shape_hint`` ends an error about a named column or the rows' shape.
    Raises `UserError` when no row is usable.
    """
    if columns is not None:
        label, records, found = _load_rows(name_or_path, columns)
        missing = [c for c in columns if c not in found]
        if missing:
            raise UserError(f"dataset '{label}' lacks column(s) {', '.join(missing)}; it has: "
                            f"{', '.join(found) or 'none'}")
        rows, dropped = _drop_bad_rows(records, columns)
        wanted = ", ".join(columns)
    else:
        column_map = column_map or ColumnMap()
        label, records, found = _load_rows(name_or_path, KNOWN_COLUMNS + tuple(column_map.given().values()))
        with _ending_with(shape_hint):
            records, found = apply_column_map(records, found, column_map, task, label)
        _refuse_labelled_completions(records, found, task, label)
        with _ending_with(shape_hint):
            shape = detect_shape(records, format)
        check_columns(shape, task, records, found, label, hint_map or column_map)
        unread = unread_columns(found, shape)
        if unread:
            logger.warning("dataset '%s': column(s) %s are not read (their text is not trained on)", label,
                           ", ".join(unread))
        rows, dropped = normalize(records, shape, task, system_column=column_map.system or "system")
        wanted = f"{shape} {'SFT' if task == 'sft' else 'preference'} data"
    n_rows = len(records)
    detail = ", ".join(f"{n} with {why}" for why, n in sorted(dropped.items(), key=lambda kv: -kv[1]))
    if dropped:
        logger.warning("dataset '%s': dropped %d of %d rows (%s) in %s", label, sum(dropped.values()), n_rows,
                       detail, wanted)
    rows = _drop_duplicates(rows, label)
    if not rows:
        why = f": all {n_rows} rows were dropped ({detail})" if dropped else ""
        raise UserError(f"dataset '{label}' has no usable rows (each needs non-empty text in {wanted}){why}")
    return rows, label


# ---------------------------------------------------------------------------------------------
# Loading: every source ends as a list of dicts plus the column names it has
# ---------------------------------------------------------------------------------------------


def _load_rows(name_or_path, columns: tuple[str, ...]) -> tuple[str, list[dict[str, Any]], list[str]]:
    """Rows (only the needed columns) and all column names found, from any source."""
    text = os.fspath(name_or_path)
    if text in BUNDLED_DATASETS:
        path = bundled_dataset_path(text)
        if not path.is_file():
            raise UserError(f"the bundled dataset is missing from this install (expected {path})")
        return (text, *_read_file(path))
    path = Path(text).expanduser()
    suffix = path.suffix.lower()
    if path.is_file() or suffix in FILE_FORMATS:
        if not path.is_file():
            raise UserError(f"dataset file '{text}' does not exist")
        return (text, *_read_file(path))
    if path.exists():
        raise UserError(f"dataset '{text}' is a folder; give a file ({', '.join(FILE_FORMATS)})")
    if path.parent != Path(".") and path.parent.is_dir():   # a local folder: a mistyped file, not a hub id
        raise UserError(f"dataset file '{text}' does not exist (the folder '{path.parent}' has no '{path.name}')")
    if _HUB_ID.match(text):
        return (text, *_read_hub(text, columns))
    raise UserError(
        f"dataset '{text}' is not a bundled set ({', '.join(BUNDLED_DATASETS)}), an existing file or a hub id "
        "like 'org/name' (or 'org/name:split'); "
        f"accepted file types: {', '.join(FILE_FORMATS)}"
    )


def _read_file(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Read a local file into row dicts; values keep their parsed types so bad ones can be counted."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _read_json_lines(path, _read_text(path))
    elif suffix == ".json":
        records = _read_json(path)
    elif suffix in (".csv", ".tsv", ".parquet"):
        import pandas as pd

        try:
            if suffix in (".csv", ".tsv"):
                # Decoded here so a wrong encoding gets the same message (with the line) as JSON;
                # dtype=str keeps CSV text as written ("007" stays "007", "None" and "NA" stay text);
                # only empty cells become NaN. Windows line ends become "\n", inside quoted cells too
                # (else every line break of a multi-line answer would carry a "\r" token).
                text = _read_text(path).replace("\r\n", "\n")
                separator = "\t" if suffix == ".tsv" else ","
                frame = pd.read_csv(io.StringIO(text), sep=separator, dtype=str, keep_default_na=False, na_values=[""])
                names = [name.strip() for name in frame.columns]   # "prompt, chosen": no " chosen"
                if len(set(names)) == len(names):
                    frame.columns = names
                frame = frame.astype(object).where(frame.notna(), None)
                records = frame.to_dict("records")
            else:
                import pyarrow.parquet as pq

                # Arrow's own conversion keeps nested columns (message lists) as Python lists.
                records = pq.read_table(path).to_pylist()
        except pd.errors.EmptyDataError:
            raise UserError(f"dataset file '{path}' is empty") from None
        except (ValueError, OSError, pd.errors.ParserError) as err:
            header = text.split("\n", 1)[0] if suffix == ".csv" else ""
            other = next((name for sep, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "bars"))
                          if sep in header and "," not in header), None)
            hint = (f" (its first line is separated by {other}, not commas: save it as comma-separated"
                    f"{', or as a .tsv file' if other == 'tabs' else ''})") if other else ""
            raise UserError(f"could not read '{path}': {' '.join(str(err).split())}{hint}") from err
    else:
        raise UserError(f"unknown dataset file type '{path.suffix}' for '{path}'; accepted: {', '.join(FILE_FORMATS)}")
    if not records:
        raise UserError(f"dataset file '{path}' is empty" if not path.stat().st_size
                        else f"dataset file '{path}' holds no rows")
    return records, _column_names(records)


def _read_text(path: Path) -> str:
    """The file as text: UTF-8, with or without a byte-order mark; anything else names the line."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"could not read '{path}': {err.strerror or err}") from err
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"'{path}' is not UTF-8 text: line {line} holds the byte 0x{data[err.start]:02x} "
                        f"({err.reason}); save the file as UTF-8") from None


def _json_kind(value: Any) -> str:
    """How JSON spells the type of a parsed value, for messages."""
    if isinstance(value, bool):
        return "true/false"
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string"}.get(type(value), "number")


def _read_json_lines(path: Path, text: str) -> list[Any]:
    records = []
    # Split on "\n" only: str.splitlines() would also split on U+2028 and other separators that
    # JSON allows raw inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"'{path}' line {number} is not valid JSON: {err.msg}{_array_hint(text)}") from err
        except RecursionError:
            raise UserError(f"'{path}' line {number} is nested too deeply") from None
        if not isinstance(record, dict):
            raise UserError(f"'{path}' line {number} is a JSON {_json_kind(record)}; each line must be one "
                            "object with named fields, like {\"prompt\": ...}" + _array_hint(text))
        records.append(record)
    return records


def _array_hint(text: str) -> str:
    return " (the file looks like one JSON array: name it .json)" if text.lstrip().startswith("[") else ""


def _read_json(path: Path) -> list[Any]:
    """Rows of a ``.json`` file: a list of objects, an object of equal-length column lists, the layouts
    pandas' ``to_json`` writes (split, columns, index, table; see :func:`_pandas_rows`), the rows under one
    key, or a dictionary of splits (its ``train`` split); JSON lines as a fallback."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):  # meant as one JSON array: its own error is the useful one
            raise UserError(f"'{path}' is not valid JSON: line {err.lineno}: {err.msg}") from err
        return _read_json_lines(path, text)  # many ".json" files on the hub are JSON lines
    except RecursionError:
        raise UserError(f"'{path}' is nested too deeply") from None
    rows = _pandas_rows(path, data)
    if rows is not None:
        return rows
    if isinstance(data, dict) and len(data) == 1:
        (_, rows), = data.items()
        if _is_row_list(rows):
            return rows   # the rows under one key, e.g. {"data": [...]}
    if isinstance(data, dict) and len(data) > 1 and all(_is_row_list(v) for v in data.values()):
        return _train_split(path, data)
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise UserError(f"'{path}' holds columns of different lengths")
        return [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
    if isinstance(data, list):
        for number, record in enumerate(data, start=1):
            if not isinstance(record, dict):
                raise UserError(f"'{path}' item {number} is a JSON {_json_kind(record)}; each item must be an "
                                "object with named fields, like {\"prompt\": ...}")
        return data
    raise UserError(f"'{path}' must hold a list of row objects or an object of column lists")


def _is_row_list(value: Any) -> bool:
    """Whether ``value`` is a non-empty list of row objects (not of chat messages, which have a role)."""
    return isinstance(value, list) and bool(value) and \
        all(isinstance(r, dict) and not {"role", "from"} & set(r) for r in value)


def _train_split(path: Path, splits: dict[str, list]) -> list[dict]:
    """The ``train`` rows of a dictionary of splits (as a DatasetDict is dumped); without one, a UserError."""
    names = ", ".join(splits)
    if "train" not in splits:
        raise UserError(f"'{path}' holds several lists of rows ({names}) and none named 'train'; save the rows "
                        "to train on as their own .jsonl file (another list can be the --eval-dataset)")
    logger.warning("dataset file '%s' holds the splits %s: reading 'train' (%d rows); alignkit holds out its own "
                   "test rows (--test-size), or save another split as its own file and give it as --eval-dataset",
                   path, names, len(splits["train"]))
    return splits["train"]


_INDEX_LABEL = re.compile(r"-?\d+")   # pandas writes index labels as object keys: "0", "1", ...
_NO_NAMES = ("save the frame with to_json(orient=\"records\", lines=True) as a .jsonl file, or with "
             "to_json(orient=\"records\") as .json")


def _pandas_rows(path: Path, data: Any) -> list[dict] | None:
    """Rows of the layouts pandas' ``DataFrame.to_json`` writes, in the order written, or None for another
    shape. orient="split": column names beside row lists; "columns" (the default): an object of columns, each
    an object keyed by the index; "index": an object of rows keyed by the index; "table": a schema beside
    the rows (the unnamed index is not a column). "values" has no column names: a UserError."""
    if isinstance(data, dict) and isinstance(data.get("columns"), list) and isinstance(data.get("data"), list) \
            and set(data) <= {"columns", "index", "data"} and all(isinstance(r, list) for r in data["data"]):
        if any(len(r) != len(data["columns"]) for r in data["data"]):
            raise UserError(f"'{path}' has rows whose length differs from its {len(data['columns'])} columns")
        return [dict(zip(data["columns"], r, strict=True)) for r in data["data"]]
    if isinstance(data, dict) and set(data) == {"schema", "data"} and isinstance(data["schema"], dict) \
            and isinstance(data["schema"].get("fields"), list) and isinstance(data["data"], list) \
            and all(isinstance(r, dict) for r in data["data"]):
        key = data["schema"].get("primaryKey") or []
        unnamed = {k for k in key if isinstance(k, str) and re.fullmatch(r"index|level_\d+", k)}
        return [{k: v for k, v in r.items() if k not in unnamed} for r in data["data"]]
    if isinstance(data, list) and data and all(isinstance(r, list) and not any(isinstance(v, dict) for v in r)
                                               for r in data):
        raise UserError(f"'{path}' has no column names (a list of value lists, as to_json(orient=\"values\") "
                        f"writes); {_NO_NAMES}")
    if not (isinstance(data, dict) and data and all(isinstance(v, dict) and v for v in data.values())):
        return None
    inner = list(dict.fromkeys(k for v in data.values() for k in v))
    outer_labels = all(_INDEX_LABEL.fullmatch(k) for k in data)
    inner_labels = all(_INDEX_LABEL.fullmatch(k) for k in inner)
    if outer_labels and inner_labels:
        raise UserError(f"'{path}' has no column names (its columns are numbered like its rows); {_NO_NAMES}")
    # A frame indexed by ids (set_index("id")): the side whose keys name known columns holds the columns.
    outer_named, inner_named = any(k in KNOWN_COLUMNS for k in data), any(k in KNOWN_COLUMNS for k in inner)
    if outer_labels or (inner_named and not outer_named):   # orient="index"
        return list(data.values())
    if inner_labels or (outer_named and not inner_named):   # orient="columns"
        return [{column: cells[label] for column, cells in data.items() if label in cells} for label in inner]
    return None


def _read_hub(name: str, columns: tuple[str, ...]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of hub dataset ``org/name`` (its ``train`` split) or ``org/name:split``."""
    import datasets

    from .hub import cache_only_if_unreachable, unreachable_reason

    repo_id, _, split = name.partition(":")
    try:
        with cache_only_if_unreachable():
            ds = datasets.load_dataset(repo_id, split=split or "train")
    except (OSError, ValueError) as err:
        why = unreachable_reason()
        reason = " ".join(str(err).split())
        if "Unknown split" in reason:   # datasets lists the splits there are
            raise UserError(f"dataset '{name}': {reason.rstrip('.')}; name one as {repo_id}:SPLIT") from err
        where = f": {why}" if why else f" from the Hugging Face hub ({reason})"
        raise UserError(f"could not load dataset '{name}'{where}; the bundled '{BUNDLED_DATASET}' works "
                        "offline") from err
    found = list(ds.column_names)
    # Only the needed columns are converted to Python objects: hub sets can carry large extras.
    ds = ds.select_columns([c for c in columns if c in found])
    return ds.to_list(), found


def _column_names(records: list[Any]) -> list[str]:
    """Column names in first-seen order across all rows (JSON lines rows may differ in keys)."""
    names: dict[str, None] = {}
    for record in records:
        if not isinstance(record, dict):
            raise UserError(f"every row must be an object with named fields, found {type(record).__name__}")
        names.update(dict.fromkeys(record))
    return list(names)


# ---------------------------------------------------------------------------------------------
# Cleaning and splitting
# ---------------------------------------------------------------------------------------------


def _check_columns_arg(columns: Sequence[str]) -> tuple[str, ...]:
    if isinstance(columns, str) or not columns or not all(isinstance(c, str) and c for c in columns):
        raise UserError(f"columns must be a non-empty list of column names, got {columns!r}")
    return tuple(columns)


def _drop_bad_rows(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> tuple[list[dict[str, str]], dict]:
    """Keep rows whose needed values are all non-blank valid strings; returns them and drops per reason."""
    kept, reasons = [], Counter()
    for row in rows:
        problem = next((p for p in (value_problem(row.get(c)) for c in columns) if p), None)
        if problem:
            reasons[problem] += 1
        else:
            kept.append({column: row[column] for column in columns})
    return kept, dict(reasons)


_TEXT_ROLE = {"prompt": "user", "chosen": "assistant", "rejected": "assistant", "completion": "assistant"}


def row_key(row: dict) -> str:
    """A converted row as a comparable key: equal for rows that train the same, also when one file wrote
    them as text and another as messages (a text prompt is one user message, a text answer one assistant
    message, which is how they are rendered), so an eval set in another shape still finds its training rows."""
    canonical = {k: [{"role": _TEXT_ROLE[k], "content": v}] if isinstance(v, str) and k in _TEXT_ROLE else v
                 for k, v in row.items()}
    return json.dumps(canonical, sort_keys=True, ensure_ascii=False)


def _drop_duplicates(rows: list[dict], label: str) -> list[dict]:
    """Drop exact repeats: a repeat could land in both splits and inflate test scores."""
    seen, kept = set(), []
    for row in rows:
        key = row_key(row)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    if len(kept) < len(rows):
        logger.warning("dataset '%s': dropped %d exact duplicate rows", label, len(rows) - len(kept))
    return kept


def _test_count(test_size: float | int, n_rows: int, label: str) -> int:
    """Rows for the test split: a fraction is rounded up, a count taken as is; both splits non-empty."""
    if isinstance(test_size, numbers.Integral) and not isinstance(test_size, bool):
        n_test = int(test_size)
    elif isinstance(test_size, numbers.Real) and 0 < test_size < 1:
        # round() first: 0.3 * 10 is 3.0000000000000004 in floats, which must not become 4
        n_test = math.ceil(round(float(test_size) * n_rows, 9))
    else:
        raise UserError(f"--test-size must be a fraction in (0, 1) or a whole row count, got {test_size!r}")
    if n_rows < 2:
        raise UserError(f"dataset '{label}' has {n_rows} usable row(s); at least 2 are needed for a train/test split")
    if not 1 <= n_test <= n_rows - 1:
        raise UserError(f"--test-size {test_size} gives {n_test} test rows out of {n_rows} usable rows; "
                        "both splits need at least one row")
    return n_test

"""Columns: which ones each dataset shape needs and reads, and the user's own names for them.

``--prompt-column`` and its siblings (a :class:`ColumnMap`), or ``--eval-columns PART=COLUMN`` for an
``--eval-dataset`` (an :class:`EvalColumnMap`), rename the user's columns to the names the shapes in
``alignkit.formats`` read, before the shape is recognised. A missing column is one line naming what
the file has and the option that would name it; columns the rows' shape does not read (e.g.
``category``) are named in a warning, since their text is not trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import UserError

# The columns each shape reads, besides the ``system`` column every shape takes.
_READ_BY = {
    "standard": ("prompt", "completion", "chosen", "rejected"),
    "conversational": ("prompt", "completion", "chosen", "rejected", "messages"),
    "sharegpt": ("conversations", "chosen", "rejected"),
    "alpaca": ("instruction", "input", "context", "output", "response", "completion", "chosen", "rejected"),
    "hh": ("prompt", "chosen", "rejected"),
}
# Every column any shape reads (hub datasets convert only these to Python objects).
KNOWN_COLUMNS = tuple(dict.fromkeys(c for columns in _READ_BY.values() for c in columns)) + ("system",)


@dataclass(frozen=True)
class ColumnMap:
    """Which of the user's columns play which part (``None``: the shape's usual name)."""

    prompt: str | None = None
    response: str | None = None   # SFT answer: "completion", else "chosen"
    chosen: str | None = None
    rejected: str | None = None
    messages: str | None = None
    system: str | None = None

    def given(self) -> dict[str, str]:
        """The parts the user named, as ``{part: column}``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}

    def option(self, part: str) -> str:
        """How the user named ``part`` (for messages): the ``--<part>-column`` flag."""
        return f"--{part}-column"

    def naming(self, parts) -> str:
        """How the user names the columns of ``parts`` (for hints): ``--a-column, --b-column and --c-column``."""
        options = [self.option(part) for part in parts]
        return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} and {options[-1]}"


COLUMN_PARTS = tuple(f.name for f in fields(ColumnMap))


def column_map_from(value, name: str = "column_map") -> ColumnMap | None:
    """``value`` (argument ``name``) as a :class:`ColumnMap`: None and a ColumnMap as they are, a dict of
    ``{part: column}`` as ``ColumnMap(**value)``; an unknown part or another type is an ArgumentError."""
    from .errors import ArgumentError

    if isinstance(value, dict):
        unknown = [k for k in value if k not in COLUMN_PARTS]
        if unknown or not all(isinstance(v, str) for v in value.values()):
            raise ArgumentError(f"{name} maps parts ({', '.join(COLUMN_PARTS)}) to column names (got {value!r})")
        return ColumnMap(**value)
    if value is not None and not isinstance(value, ColumnMap):
        raise ArgumentError(f"{name} must be an alignkit.ColumnMap or a dict of {{part: column}} "
                            f"(got {type(value).__name__})")
    return value


@dataclass(frozen=True)
class EvalColumnMap(ColumnMap):
    """The columns of an ``--eval-dataset`` named by ``--eval-columns PART=COLUMN ...``."""

    def option(self, part: str) -> str:
        return f"--eval-columns {part}="

    def naming(self, parts) -> str:
        return "--eval-columns " + " ".join(f"{part}=..." for part in parts)

    @classmethod
    def parse(cls, items) -> tuple[EvalColumnMap, list[str]]:
        """The map that ``PART=COLUMN`` items describe, and what is wrong with them (empty when nothing)."""
        given, problems = {}, []
        for item in items:
            part, sep, column = str(item).partition("=")
            part, column = part.strip(), column.strip()
            if not sep or not column or part not in COLUMN_PARTS:
                problems.append(f"--eval-columns takes PART=COLUMN with PART one of {', '.join(COLUMN_PARTS)} "
                                f"(got {item!r})")
            elif part in given:
                problems.append(f"--eval-columns names the {part} column twice")
            else:
                given[part] = column
        return cls(**given), problems


_HELD = {"prompt": "prompts", "chosen": "chosen answers", "rejected": "rejected answers"}


def apply_column_map(records: list[dict], found: list[str], column_map: ColumnMap, task: str,
                     label: str) -> tuple[list[dict], list[str]]:
    """Rows and column names with the user's columns renamed to the names the shapes use.

    A named column must exist; a column already called by the target name is replaced.
    """
    given = column_map.given()
    if task == "preference" and "response" in given:
        raise UserError(f"{column_map.option('response')} is for SFT data; DPO reads the prompt, chosen and "
                        "rejected columns")
    parts_of: dict[str, list[str]] = {}
    for part, col in given.items():
        parts_of.setdefault(col, []).append(column_map.option(part))
    twice = {col: parts for col, parts in parts_of.items() if len(parts) > 1}
    if twice:
        col, parts = next(iter(twice.items()))
        raise UserError(f"{' and '.join(parts)} both name the column '{col}'; a column plays one part")
    # A column named for one part that holds another part the task needs, under its usual name and
    # not moved elsewhere: the rename would take it away (SFT may learn its answer from "chosen").
    for part, col in given.items():
        if col != part and col in ("prompt", "chosen", "rejected") and col not in given and \
                (col == "prompt" or task == "preference"):
            option = column_map.option(part)
            raise UserError(f"{option}{'' if option.endswith('=') else ' '}{col} names the column that holds the {_HELD[col]}; a column "
                            f"plays one part (if yours are in another column, name it with "
                            f"{column_map.option(col)})")
    missing = [f"'{col}' ({column_map.option(part)})" for part, col in given.items() if col not in found]
    if missing:
        raise UserError(f"dataset '{label}' has no column {', '.join(missing)}; "
                        f"its columns are: {', '.join(found) or 'none'}")
    target = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "messages": "messages",
              "response": "completion", "system": "system"}
    renames = {col: target[part] for part, col in given.items() if col != target[part]}
    if not renames:
        return records, found
    out = []
    for record in records:
        row = {k: v for k, v in record.items() if k not in renames.values() and k not in renames}
        row.update({new: record[old] for old, new in renames.items() if old in record})
        out.append(row)
    names = [c for c in found if c not in renames.values() and c not in renames] + list(renames.values())
    return out, names


def needed_columns(shape: str, task: str, records: list[dict]) -> list[list[str]]:
    """Alternatives of column sets a shape needs (one of them must be present in the file)."""
    if shape == "sharegpt":
        return [["conversations"] + (["chosen", "rejected"] if task == "preference" else [])]
    if shape == "alpaca":
        return [["instruction", "output"], ["instruction", "response"], ["instruction", "completion"]] \
            if task == "sft" else \
            [["instruction", "chosen", "rejected"]]
    if shape == "hh":
        return [["chosen"]] if task == "sft" else [["chosen", "rejected"]]
    if task == "sft":
        if shape == "conversational" and any("messages" in r for r in records):
            return [["messages"]]
        implicit = [["chosen", "rejected"]] if shape == "conversational" else []
        return [["prompt", "completion"], ["prompt", "chosen"], *implicit]
    if shape == "conversational":
        return [["prompt", "chosen", "rejected"], ["chosen", "rejected"]]
    return [["prompt", "chosen", "rejected"]]


def check_columns(shape: str, task: str, records: list[dict], found: list[str], label: str,
                  column_map: ColumnMap | None = None) -> None:
    """One line naming what is missing (and what the file has) when no accepted column set is there;
    ``column_map`` says how the user names columns for this dataset (the hint names those options)."""
    options = needed_columns(shape, task, records)
    if any(all(c in found for c in option) for option in options):
        return
    best = min(options, key=lambda o: sum(c not in found for c in o))
    missing = [c for c in best if c not in found]
    raise UserError(f"dataset '{label}' lacks column(s) {', '.join(missing)}; it has: "
                    f"{', '.join(found) or 'none'}{_columns_hint(task, shape, found, column_map or ColumnMap())}")


def _columns_hint(task: str, shape: str, found: list[str], column_map: ColumnMap) -> str:
    """What the user most likely has to do when the needed columns are missing."""
    spaced = [c for c in found if c != c.strip() and c.strip() in KNOWN_COLUMNS]
    if spaced:
        return f" (the column name(s) {', '.join(repr(c) for c in spaced)} have spaces around them: remove the spaces)"
    if len(found) == 1 and any(sep in found[0] for sep in ";\t|"):
        return (" (one column whose name holds separators: is the file not comma-separated? CSV files "
                "need commas)")
    if "text" in found and not any(c in found for c in KNOWN_COLUMNS):
        return (" (plain 'text' rows are not supported: training needs to know which part is the answer; "
                "give prompt and completion columns, or messages)")
    if task == "preference" and "rejected" not in found and shape != "sharegpt" and \
            any(c in found for c in ("completion", "messages", "output", "response", "chosen")):
        return " (DPO needs a rejected answer for each prompt; SFT data cannot train DPO)"
    flags = (column_map.naming(("prompt", "chosen", "rejected")) if task == "preference" else
             f"{column_map.naming(('prompt', 'response'))}, or {column_map.naming(('messages',))}")
    return f" (if yours are named differently, name them with {flags})"


def unread_columns(found: list[str], shape: str) -> list[str]:
    """The columns ``shape`` does not read: their text is not trained on."""
    return [c for c in found if c not in _READ_BY[shape] and c != "system"]

"""Dataset shapes: recognise how rows are written and convert them to the shapes the gyms read.

Accepted shapes (the names ``--format`` takes):

- ``standard``: text columns. Preference: ``prompt``, ``chosen``, ``rejected``. SFT: ``prompt`` and
  ``completion`` (or ``chosen``, so preference data also trains SFT).
- ``conversational``: messages, each ``{"role": "system"|"user"|"assistant", "content": text}`` (or
  content as text parts, ``[{"type": "text", "text": ...}]``, joined by newlines).
  SFT: ``messages`` (every assistant turn is learned but one that opens the conversation, which
  answers nothing), ``prompt`` + ``completion`` as message lists, or preference rows (below: the
  chosen answer is learned). Preference: ``prompt`` (messages, may hold earlier turns) + ``chosen``/``rejected`` (an
  assistant message or a list of messages, or the whole conversation: prompt messages repeated
  exactly, then the answer), or only ``chosen``/``rejected`` as whole conversations whose shared
  leading messages become the prompt (implicit prompt).
- ``sharegpt``: ``conversations``, a list of ``{"from": "system"|"human"|"gpt", "value": text}``; for
  preference data the ``conversations`` are the prompt and ``chosen``/``rejected`` the answers.
- ``alpaca``: ``instruction``, optional ``input``, and ``output`` (SFT) or ``chosen``/``rejected``; also
  written as Dolly writes it: ``context`` for the input, ``response`` for the output.
- ``hh``: Anthropic HH-RLHF transcripts, text in which turns start with ``Human:`` or ``Assistant:``
  after a blank line (or after a line break, in a transcript with no blank line before an answer).
  ``chosen``/``rejected`` are whole transcripts (their shared turns become the
  prompt; SFT with ``chosen`` alone learns every assistant turn), or ``prompt`` is a transcript
  ending with an empty ``Assistant:`` turn and the answers are its text. The turns become messages,
  so the model's chat template renders them.

In every column a turn may be written either way, ``{role, content}`` or ``{from, value}``; roles and
speakers are read case-insensitively, ``developer`` is a system message, and a role may also be a speaker's
name (``human``, ``gpt``, Gemini's ``model``). An assistant message marked ``"weight": 0`` (OpenAI's chat
fine-tuning format) is context, not learned. Conversations with tool
calls or tool results are dropped (counted): tool use is not supported.

Any shape may have a ``system`` column (text): a non-empty value becomes the system message that
opens the row's prompt (an empty or missing one leaves the model's default). Once a file has that
column every prompt is a message list. A row whose conversation already opens with a system message
keeps it once when the texts agree; different texts are an error, since one of the two would be lost.

Preference rows whose chosen and rejected answers are the same teach nothing and are dropped (counted).
Which columns each shape needs and reads, and the user's names for them, are ``alignkit.columns``'.

What the gyms receive (``normalize`` returns these):

- preference: ``{"prompt", "chosen", "rejected"}``, all text (standard) or all message lists.
- SFT: ``{"prompt", "completion"}`` (text or message lists), or ``{"messages"}`` for whole conversations.

A file holds one shape: mixed shapes, unknown roles, empty conversations and the like are errors
naming the row (counted from 1), since they mean the file is not what the user thinks it is.
Rows with a blank message or missing text are dropped with a counted warning, as for text columns.
"""

from __future__ import annotations

import numbers
import re
from typing import Any

from .errors import UserError

FORMATS = ("auto", "standard", "conversational", "sharegpt", "alpaca", "hh")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant"}
TASKS = ("sft", "preference")

SAME_ANSWERS = "the same chosen and rejected answer"   # why a pair that teaches nothing is dropped


class Dropped(Exception):
    """A row that cannot be trained on but does not make the file wrong (counted, not fatal)."""


def _fail(row: int, message: str):
    raise UserError(f"row {row}: {message}")


# ---------------------------------------------------------------------------------------------
# Shape detection
# ---------------------------------------------------------------------------------------------


# An HH transcript's turn marker: after a blank line as HH-RLHF writes them, or, in a transcript that
# has no blank line before any answer, after a line break (as some of its copies write them).
_TURN = {"\n\n": re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?"), "\n": re.compile(r"(?:^|\n)(Human|Assistant):[ \t]?")}
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _turn_break(value: str) -> str | None:
    """What comes before a turn marker in transcript ``value``: a blank line, a line break, or None (no answer)."""
    return next((brk for brk in ("\n\n", "\n") if f"{brk}Assistant:" in value), None)


def is_transcript(value: Any) -> bool:
    """Whether ``value`` is HH-RLHF transcript text: it opens with a ``Human:`` turn and has an answer marker."""
    return isinstance(value, str) and value.lstrip().startswith("Human:") and _turn_break(value) is not None


def _is_hh_row(row: dict) -> bool:
    """An HH row: a prompt transcript that ends waiting for the answer, or (no prompt) a chosen transcript."""
    if "prompt" in row:
        prompt = row["prompt"]
        return is_transcript(prompt) and prompt.rstrip().endswith("\nAssistant:")
    return is_transcript(row.get("chosen"))


def row_shape(row: dict) -> str:
    """The shape a row is written in (one of ``FORMATS`` but ``auto``)."""
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    if "messages" in row:
        return "conversational"
    values = [row.get(c) for c in ("prompt", "completion", "chosen", "rejected")]
    if any(isinstance(v, (list, dict)) for v in values):
        return "conversational"
    return "hh" if _is_hh_row(row) else "standard"


def detect_shape(records: list[dict], fmt: str) -> str:
    """The one shape of all rows; ``fmt`` other than ``auto`` is checked against every row."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    if not records:  # nothing to look at (a hub set without any known column): the plainest shape
        return "standard" if fmt == "auto" else fmt
    shapes = [row_shape(record) for record in records]
    if set(shapes) == {"hh", "standard"} or fmt in ("hh", "standard") and set(shapes) <= {"hh", "standard"}:
        # Text rows, some written as HH transcripts: with a prompt column the text is taken as written
        # (a prompt may quote a dialogue); without one they are transcripts, and rows that are not (e.g. a
        # cut transcript without an answer) are dropped and counted by the converter.
        text_shape = fmt if fmt != "auto" else ("standard" if any("prompt" in r for r in records) else "hh")
        shapes = [text_shape] * len(records)
    first = shapes[0]
    for number, (record, shape) in enumerate(zip(records, shapes, strict=True), start=1):
        if fmt != "auto" and shape != fmt:
            raise UserError(f"row {number} is written as {shape} data, not {fmt} (its columns: {', '.join(record)})")
        if shape != first:
            raise UserError(f"row {number} is written as {shape} data but row 1 as {first}; a dataset holds one shape")
    return first


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------


TOOL_TURN = "a tool call or tool result (tool use is not supported)"   # why such a conversation is dropped


def _message(value: Any, row: int, what: str, sharegpt: bool = False) -> dict[str, str]:
    """One checked message ``{"role", "content"}``. A turn may be written either way, ``{role, content}``
    or ShareGPT's ``{from, value}`` (``sharegpt`` only says which the error for neither names); roles and
    speakers are read case-insensitively, ``developer`` is the system message, and a ``role`` may also be
    one of ShareGPT's speaker names (``human``, ``gpt``, Gemini's ``model``...). A conversation with a tool
    call or tool result is dropped (counted): its turns cannot be trained on as text."""
    if isinstance(value, dict) and "from" in value and "value" in value and "role" not in value:
        role_key, text_key, speakers = "from", "value", SHAREGPT_ROLES
    else:
        role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
        if isinstance(value, dict) and "role" in value:
            role_key, text_key = "role", "content"
        # OpenAI's developer message; the speaker names other tools write as roles (Gemini's "model")
        speakers = {**{r: r for r in ROLES}, "developer": "system", **SHAREGPT_ROLES}
    if isinstance(value, dict) and (value.get("tool_calls") or value.get("function_call")
                                    or str(value.get(role_key, "")).lower() in ("tool", "function", "ipython")):
        raise Dropped(TOOL_TURN)
    if not isinstance(value, dict) or role_key not in value or text_key not in value:
        _fail(row, f"{what} holds {kind_of(value)} where a {{{role_key}, {text_key}}} object is needed")
    role, content = value[role_key], value[text_key]
    if not isinstance(role, str) or role.lower() not in speakers:
        kind = "speaker" if speakers is SHAREGPT_ROLES else "role"
        _fail(row, f"{what} has the unknown {kind} {role!r} (accepted: {', '.join(speakers)})")
    role = speakers[role.lower()]
    content = _number_as_text(content)
    if content is None:
        raise Dropped("a missing message")
    if isinstance(content, list):
        content = _text_of_parts(content, row, what)
    if not isinstance(content, str):
        _fail(row, f"{what} has a {text_key} that is {kind_of(content)}, not text")
    if not content.strip():
        raise Dropped("an empty message")
    _check_unicode(content)
    weight = value.get("weight")   # OpenAI's chat fine-tuning: 0 marks an answer given as context, not learned
    if weight is not None and (isinstance(weight, bool) or weight not in (0, 1)):
        _fail(row, f"{what} has the weight {weight!r}, where 0 (not learned) or 1 is needed")
    return {"role": role, "content": content, **({"weight": 0} if weight == 0 and role == "assistant" else {})}


def learned(message: dict) -> bool:
    """Whether an assistant ``message`` is one to learn: not marked ``"weight": 0`` (OpenAI's chat
    fine-tuning format; rows read into a dataset hold ``None`` where a message had no weight)."""
    return message["role"] == "assistant" and message.get("weight") != 0


def _text_of_parts(parts: list, row: int, what: str) -> str:
    """The text of content written as parts (``[{"type": "text", "text": ...}, ...]``), joined by newlines."""
    texts = []
    for part in parts:
        if not isinstance(part, dict) or "type" not in part:
            _fail(row, f"{what} has content parts that are not {{type, ...}} objects")
        if part["type"] != "text" or not isinstance(part.get("text"), str):
            _fail(row, f"{what} has a {part['type']!r} content part; only text parts can be trained on")
        texts.append(part["text"])
    return "\n".join(texts)


def is_unicode(text: str) -> bool:
    """Whether ``text`` is valid Unicode: no lone surrogate (what a JSON escape such as ``"\\ud800"`` or an
    undecodable byte read from stdin leaves), which neither the tokenizer nor Arrow can take."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _check_unicode(text: str) -> None:
    if not is_unicode(text):
        raise Dropped("text that is not valid Unicode (a lone surrogate)")


def kind_of(value: Any) -> str:
    """What ``value`` is, in words for an error line: "nothing", "text", "a number", "a list", "an object with
    only 'a', 'b'" (a dict, named by its keys), else "a <type>"."""
    if isinstance(value, dict):
        keys = ", ".join(map(repr, list(value)[:6])) + (", ..." if len(value) > 6 else "")
        return f"an object with only {keys}" if value else "an empty object"
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return "a number"
    return {list: "a list", str: "text", type(None): "nothing", bool: "true/false"}.get(type(value),
                                                                                      f"a {type(value).__name__}")


def messages_of(value: Any, row: int, what: str, sharegpt: bool = False, lone_role: str | None = None) -> list:
    """``value`` as a checked message list; text becomes one ``lone_role`` message where allowed."""
    if isinstance(value, str) and lone_role:
        return [{"role": lone_role, "content": _text(value)}]
    if isinstance(value, dict):
        value = [value]
    if value is None:
        raise Dropped("a missing value")
    if not isinstance(value, list):
        hint = (" (CSV cells are always text: keep message lists in a .jsonl, .json or .parquet file)"
                if isinstance(value, str) and value.lstrip().startswith(("[", "{")) else "")
        _fail(row, f"{what} is {kind_of(value)}; a list of messages is needed{hint}")
    if not value:
        _fail(row, f"{what} is an empty conversation")
    return [_message(m, row, f"{what} message {i}", sharegpt) for i, m in enumerate(value, start=1)]


def opens_conversation(messages: list, i: int) -> bool:
    """Whether message ``i`` opens the conversation: only system messages come before it (an assistant
    turn there answers nothing, so it is context, not something to learn)."""
    return all(m["role"] == "system" for m in messages[:i])


def _check_answer(messages: list, row: int, what: str, beside_prompt: bool = False, cut: bool = False) -> None:
    """Preference answers continue the prompt: they start and end with an assistant turn. ``beside_prompt``:
    the row has a prompt column; ``cut``: ``messages`` is what follows that prompt in a whole conversation."""
    if messages[0]["role"] != "assistant":
        hint = (" (an answer written as the whole conversation must begin with the prompt column's messages, "
                "the same text)" if beside_prompt and not cut else "")
        after = " (after the prompt's messages it repeats)" if cut else ""
        _fail(row, f"{what} starts with a {messages[0]['role']} turn{after}; an answer starts with an assistant "
                   f"turn{hint}")
    if messages[-1]["role"] != "assistant":
        _fail(row, f"the {what} conversation ends with a {messages[-1]['role']} turn; preference answers "
                   "must end with an assistant turn")


def split_answer(answer: list, prompt: list) -> tuple[list, list]:
    """An answer written as the whole conversation (the prompt's messages, then the answer) cut to the answer.

    Some datasets (UltraFeedback-style) store ``chosen``/``rejected`` as full conversations beside a
    ``prompt`` column, some with a system message before the prompt's turns. Returns ``(opening,
    answer)``: the system messages the conversation opens with before the prompt's messages (when
    the prompt has none of its own), and what follows the prompt. An answer that does not contain
    the prompt's messages there (same roles, same text up to surrounding whitespace) is returned as
    it is, with no opening.
    """
    lead = 0
    if prompt[0]["role"] != "system":
        while lead < len(answer) and answer[lead]["role"] == "system":
            lead += 1
    n = len(prompt)
    same = len(answer) > lead + n and all(
        a["role"] == p["role"] and a["content"].strip() == p["content"].strip()
        for a, p in zip(answer[lead:lead + n], prompt, strict=False))
    return (answer[:lead], answer[lead + n:]) if same else ([], answer)


def without_prompt(answer: list, prompt: list) -> list:
    """The answer part of an answer written as the whole conversation (see :func:`split_answer`)."""
    return split_answer(answer, prompt)[1]


def split_shared_prefix(chosen: list, rejected: list, row: int) -> tuple[list, list, list]:
    """``(prompt, chosen, rejected)`` from two whole conversations: their shared leading messages."""
    if chosen == rejected:
        raise Dropped(SAME_ANSWERS)
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        _fail(row, "chosen and rejected share no leading message, so there is no prompt; give a prompt "
                   "column or conversations that start the same")
    if n == len(chosen) or n == len(rejected):
        _fail(row, "one of chosen and rejected is the other's beginning; they must differ in their answers")
    return chosen[:n], chosen[n:], rejected[n:]


# ---------------------------------------------------------------------------------------------
# Rows of each shape -> what the gyms read
# ---------------------------------------------------------------------------------------------


def value_problem(value: Any) -> str | None:
    """Why a text value cannot be trained on (worded to follow "with"), or None when it can."""
    if value is None:
        return "a missing value"
    if not isinstance(value, str):
        return "a non-string value"
    if not value.strip():
        return "an empty value"
    if not is_unicode(value):
        return "text that is not valid Unicode (a lone surrogate)"
    return None


def _number_as_text(value: Any) -> Any:
    """A JSON or Parquet number in a text column as the text a CSV file would hold (``4`` -> ``"4"``; NaN,
    pandas' empty cell, as missing); anything else as it is. Booleans stay refused: rarely an answer."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if value != value else str(value)
    return value


def _text(value: Any) -> str:
    value = _number_as_text(value)
    problem = value_problem(value)
    if problem:
        raise Dropped(problem)
    return value


def _sft_response_column(record: dict) -> str:
    return "completion" if "completion" in record else "chosen"


def _conversational(record: dict, task: str, row: int) -> dict:
    if task == "sft":
        if "messages" in record:
            messages = messages_of(record["messages"], row, "messages")
            if not any(m["role"] == "assistant" for m in messages):
                _fail(row, "the conversation has no assistant turn, so there is nothing to learn")
            if not any(learned(m) for m in messages):
                _fail(row, "every assistant turn of the conversation has weight 0, so there is nothing to learn")
            if not any(m["role"] == "assistant" and not opens_conversation(messages, i)
                       for i, m in enumerate(messages)):
                _fail(row, "the conversation's only assistant turn opens it, answering nothing, so there is "
                           "nothing to learn")
            while messages[-1]["role"] != "assistant":  # turns after the last answer teach nothing
                messages.pop()
            return {"messages": messages}
        if "prompt" not in record:   # implicit-prompt preference rows: learn the chosen conversation's answer
            # Turns after a conversation's last answer teach nothing (as for "messages"): left out.
            trimmed = {c: _until_last_answer(messages_of(record.get(c), row, c, lone_role="assistant"))
                       for c in ("chosen", "rejected")}
            prompt, completion, _ = _conversational({**record, **trimmed}, "preference", row).values()
            return {"prompt": prompt, "completion": completion}
        column = _sft_response_column(record)
        prompt = messages_of(record.get("prompt"), row, "prompt", lone_role="user")
        written = messages_of(record.get(column), row, column, lone_role="assistant")
        opening, completion = split_answer(written, prompt)
        _check_answer(completion, row, column, beside_prompt=True, cut=len(completion) < len(written))
        return {"prompt": opening + prompt, "completion": completion}
    chosen = written_c = messages_of(record.get("chosen"), row, "chosen", lone_role="assistant")
    rejected = written_r = messages_of(record.get("rejected"), row, "rejected", lone_role="assistant")
    if "prompt" in record:
        prompt = messages_of(record["prompt"], row, "prompt", lone_role="user")
        (opening, chosen), (other, rejected) = split_answer(chosen, prompt), split_answer(rejected, prompt)
    else:
        prompt, chosen, rejected = split_shared_prefix(chosen, rejected, row)
        opening = other = []
    _check_answer(chosen, row, "chosen", "prompt" in record, cut=len(chosen) < len(written_c))
    _check_answer(rejected, row, "rejected", "prompt" in record, cut=len(rejected) < len(written_r))
    if opening != other:
        _fail(row, "chosen and rejected open with different system messages before the prompt; one "
                   "conversation has one context")
    prompt = opening + prompt   # a system message both conversations open with is part of the prompt
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _until_last_answer(messages: list) -> list:
    """``messages`` up to and including their last assistant turn (all of them when there is none)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages) - 1)
    return messages[:last + 1]


def _sharegpt(record: dict, task: str, row: int) -> dict:
    turns = messages_of(record["conversations"], row, "conversations", sharegpt=True)
    if task == "sft":
        return _conversational({"messages": turns}, task, row)
    answers = {c: messages_of(record.get(c), row, c, sharegpt=True, lone_role="assistant")
               for c in ("chosen", "rejected")}
    return _conversational({"prompt": turns, **answers}, task, row)


def _alpaca(record: dict, task: str, row: int) -> dict:
    prompt = _text(record.get("instruction"))
    for column in ("input", "context"):   # Alpaca's input, Dolly's context: text the instruction is about
        extra = _number_as_text(record.get(column))   # NaN, pandas' empty cell: an instruction without input
        if extra is not None and not isinstance(extra, str):
            raise Dropped("a non-string value")   # a list or object as the input: not silently left out
        if extra is not None and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
    if task == "sft":   # "completion" when --response-column named the answer column; Dolly's "response"
        answer = next((c for c in ("completion", "output", "response") if c in record), "output")
        return {"prompt": prompt, "completion": _text(record.get(answer))}
    return {"prompt": prompt, "chosen": _text(record.get("chosen")), "rejected": _text(record.get("rejected"))}


def _standard(record: dict, task: str, row: int) -> dict:
    if task == "sft":
        return {"prompt": _text(record.get("prompt")), "completion": _text(record.get(_sft_response_column(record)))}
    return {c: _text(record.get(c)) for c in ("prompt", "chosen", "rejected")}


def transcript_messages(value: Any, row: int, what: str) -> list[dict[str, str]]:
    """The turns of HH transcript text as messages; a trailing empty ``Assistant:`` turn (a prompt's) is left out."""
    text = _text(value)
    if not is_transcript(text):
        _fail(row, f"{what} is not a transcript of 'Human:' and 'Assistant:' turns")
    parts = _TURN[_turn_break(text)].split(text.strip("\n").lstrip())
    messages = [{"role": _HH_ROLES[marker], "content": content.strip()}
                for marker, content in zip(parts[1::2], parts[2::2], strict=True)]
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    for m in messages:
        if not m["content"]:
            raise Dropped("an empty message")
        _check_unicode(m["content"])
    return messages


def _hh(record: dict, task: str, row: int) -> dict:
    try:
        return _hh_row(record, task, row)
    except UserError as err:   # HH data has a few broken transcripts (e.g. no final answer): counted, not fatal
        raise Dropped(f"a transcript that {'cannot be trained on' if task == 'sft' else 'is no preference pair'} "
                      f"({str(err).split(': ', 1)[-1]})") from None


def _hh_row(record: dict, task: str, row: int) -> dict:
    if "prompt" in record:
        prompt = transcript_messages(record["prompt"], row, "prompt")
        answers = {c: without_prompt(transcript_messages(record[c], row, c), prompt) if is_transcript(record[c])
                   else [{"role": "assistant", "content": _text(record[c]).strip()}]
                   for c in ("chosen", "rejected") if c in record}
        return _conversational({"prompt": prompt, **answers}, task, row)
    if task == "sft" and "rejected" not in record:
        return _conversational({"messages": transcript_messages(record.get("chosen"), row, "chosen")}, task, row)
    return _conversational({c: transcript_messages(record.get(c), row, c) for c in ("chosen", "rejected")}, task, row)


CONVERTERS = {"standard": _standard, "conversational": _conversational, "sharegpt": _sharegpt, "alpaca": _alpaca,
              "hh": _hh}


def _system_text(value: Any, row: int, column: str = "system") -> str | None:
    """The system message text of a ``system`` cell; None when it is missing, blank or NaN (a missing
    value as pandas writes it to JSON)."""
    if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, float) and value != value):
        return None
    if not isinstance(value, str):
        _fail(row, f"{column} is {kind_of(value)}, not text")
    _check_unicode(value)
    return value


def with_system(row: dict, system: str | None, number: int, column: str = "system") -> dict:
    """``row`` (as the converters return it) with its prompt as messages opened by ``system``, if given.

    A conversation that already opens with a system message keeps it when it is the same text;
    another text is an error (one of the two would be lost).
    """
    key = "messages" if "messages" in row else "prompt"
    messages = [{"role": "system", "content": system}] if system is not None else []
    turns = [dict(m) for m in (row[key] if isinstance(row[key], list) else [{"role": "user", "content": row[key]}])]
    if messages and turns[0]["role"] == "system":
        if turns[0]["content"].strip() != system.strip():
            _fail(number, f"has a {column} column value and a different system message of its own; keep one")
        messages = []
    return {**row, key: messages + turns}


def normalize(records: list[dict], shape: str, task: str, system_column: str = "system") -> tuple[list[dict], dict[str, int]]:
    """Convert every row of ``shape`` for ``task``; returns the rows and ``{reason: count}`` of drops.

    ``system_column``: the user's name of the ``system`` column, for error messages.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    convert = CONVERTERS[shape]
    if task == "sft" and shape in ("standard", "conversational") and any("completion" in r for r in records):
        # One answer column for the whole file: a row without a completion is dropped (counted), never
        # trained on its "chosen" while the others learn their completions.
        records = [r if "completion" in r else {**r, "completion": None} for r in records]
    has_system = any("system" in record for record in records)
    kept, dropped = [], {}
    for number, record in enumerate(records, start=1):
        try:
            row = convert(record, task, number)
            if has_system:
                row = with_system(row, _system_text(record.get("system"), number, system_column), number,
                                  system_column)
            if task == "preference" and row["chosen"] == row["rejected"]:
                raise Dropped(SAME_ANSWERS)
            kept.append(row)
        except Dropped as why:
            dropped[str(why)] = dropped.get(str(why), 0) + 1
    return kept, dropped

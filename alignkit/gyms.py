"""Gyms: turn text rows into token batches. The agent never sees text.

A gym renders each row with the tokenizer's chat template (user turn = prompt, assistant turn =
response), finds the prompt/response boundary, masks everything but the response tokens, and
serves shuffled batches: ``reset()`` gives the first batch of an epoch, ``step()`` the next one.

Batch layout (all tensors, right-padded with ``pad_token_id``):

- ``SFTGym``: ``input_ids`` (B, T), ``attention_mask`` (B, T), ``labels`` (B, T) with -100
  everywhere except the response tokens (end-of-turn token included).
- ``PreferenceGym``: the same three keys with 2B rows (the B chosen sequences first, then the
  B rejected ones, so one forward pass serves both), plus ``example_ids`` (B,) int64: a stable
  hash of each pair's tokens, used to cache reference log-probs across epochs and runs.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from .config import SFTConfig
from .data import seed_problem
from .errors import ArgumentError, UserError, check_accelerator, checked
from .formats import ROLES, kind_of, learned, opens_conversation, value_problem

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_DEFAULTS = SFTConfig()  # the one source of defaults, shared with the command line


def checked_seed(seed) -> int:
    """``seed`` as an int (a numpy integer too) when it is a seed the random generators take, else an
    :class:`ArgumentError` (see ``alignkit.data.seed_problem``)."""
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        seed = int(seed)
    problem = seed_problem(seed)
    if problem:
        raise ArgumentError(f"seed {problem}")
    return seed


def _listed(columns) -> str:
    return ", ".join(map(str, columns)) or "none"


@dataclass
class Encoded:
    """One tokenized sequence: prompt tokens followed by response tokens.

    ``response_mask`` marks which response tokens are learned (``None``: all of them); in a
    multi-turn conversation the user turns between two answers are part of the response but
    not learned.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[bool] | None = None

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def labels(self) -> list[int]:
        response = self.response_ids if self.response_mask is None else [
            t if keep else IGNORE_INDEX for t, keep in zip(self.response_ids, self.response_mask, strict=True)]
        return [IGNORE_INDEX] * len(self.prompt_ids) + list(response)


@dataclass
class EncodeStats:
    """Counts of what tokenization had to change, reported once per split."""

    rows: int = 0
    dropped_prompt_too_long: int = 0
    responses: int = 0              # responses fitted to the length (two per preference pair)
    truncated_responses: int = 0
    dropped_same_tokens: int = 0    # preference pairs whose answers are the same tokens once fitted
    dropped_same_answers: int = 0   # preference pairs whose answers are the same tokens as written
    boundary_merges: int = field(default=0)


Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


def as_messages(value, role: str) -> list[Message]:
    """A text value as one ``role`` message; a message list as it is."""
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_messages(tokenizer, messages: list[Message], generation_prompt: bool = False) -> str:
    """The text of ``messages`` as the model reads it.

    With a chat template this is the template's rendering. Without one, the documented fallback:
    each system or user message is its text followed by a newline, each assistant message its
    text followed by the EOS token (so a one-turn prompt/response is ``prompt\\nresponse<eos>``).
    """
    if _has_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    eos = tokenizer.eos_token or ""
    return "".join(m["content"] + (eos if m["role"] == "assistant" else "\n") for m in messages)


def context_ids(tokenizer, messages: list[Message]) -> list[int]:
    """Token ids of ``messages`` followed by the assistant header: the context an answer continues,
    tokenized as :func:`encode_messages` tokenizes a prompt (the template writes its own special
    tokens; plain text gets the tokenizer's BOS, if any)."""
    text = render_messages(tokenizer, messages, generation_prompt=True)
    return tokenizer(text, add_special_tokens=not _has_template(tokenizer))["input_ids"]


def _answer_text(rendered: str, eos: str) -> str:
    """The learned part of a rendered assistant turn: up to and including its end-of-turn token.

    Templates add a newline after the end-of-turn token; the model should learn to stop at the
    end-of-turn token, not to predict what follows it.
    """
    if eos and eos in rendered:
        return rendered[: rendered.rindex(eos) + len(eos)]
    return rendered.rstrip("\n") + eos


def conversation_segments(tokenizer, messages: list[Message], learn_from: int = 0) -> list[tuple[str, bool]]:
    """Split a rendered conversation into ``(text, learned)`` pieces, in order.

    Every assistant message at index ``>= learn_from`` is learned (up to its end-of-turn token) unless it is
    marked ``"weight": 0`` (see :func:`alignkit.formats.learned`),
    except one that opens the conversation (only system messages before it: it answers nothing); everything else (system and user
    turns, template headers, earlier answers given as prompt) is context. The pieces come from rendering growing prefixes of the conversation, so no
    ``{% generation %}`` markers are needed; a template that renders a prefix differently inside
    a longer conversation is refused. Messages after the last learned answer are left out.
    """
    eos = tokenizer.eos_token or ""
    segments: list[tuple[str, bool]] = []
    consumed = ""   # the part of the rendering already split into segments
    for i, message in enumerate(messages):
        if not learned(message) or i < learn_from or opens_conversation(messages, i):
            continue
        head = render_messages(tokenizer, messages[:i], generation_prompt=True)
        full = render_messages(tokenizer, messages[: i + 1])
        if not (head.startswith(consumed) and full.startswith(head)):
            raise UserError("the tokenizer's chat template renders a conversation's beginning differently once "
                            "it continues; cannot find where each answer starts (use --chat-template to give one "
                            "that renders turns in order)")
        rendered = full[len(head):]
        answer = _answer_text(rendered, eos)
        segments += [(head[len(consumed):], False), (answer, True)]
        # Where the next piece starts: after the end-of-turn token (its trailing newline is context),
        # or after the whole turn when the template wrote no end-of-turn token and one was added.
        consumed = head + (answer if rendered.startswith(answer) else rendered)
    return segments


def render_prompt_response(tokenizer, prompt: str, response: str) -> tuple[str, str]:
    """Render ``(prompt_text, response_text)`` of one user turn and its answer.

    With a chat template, the prompt text ends with the assistant header (generation prompt) and
    the response text runs up to and including the end-of-turn token. Without one, the prompt is
    followed by a newline and the response ends with the EOS token.
    """
    (prompt_text, _), (response_text, _) = conversation_segments(
        tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    return prompt_text, response_text


def encode_messages(tokenizer, messages: list[Message], learn_from: int = 0) -> tuple[Encoded, bool]:
    """Tokenize a conversation; returns the encoding and whether tokens merged at a boundary.

    The prompt is everything before the first learned answer. Each piece of
    :func:`conversation_segments` is tokenized on its own and the ids concatenated, so every
    answer starts exactly where generation would start after its context. When tokenizing the
    joint text would have merged tokens across a boundary, the separate tokenization is kept and
    the merge is reported.
    """
    segments = conversation_segments(tokenizer, messages, learn_from)
    if not segments:
        raise UserError("a conversation has no assistant answer to learn")
    # Chat templates write their own special tokens; plain text gets the tokenizer's BOS, if any.
    first_special = not _has_template(tokenizer)
    pieces = [tokenizer(text, add_special_tokens=first_special and k == 0)["input_ids"]
              for k, (text, _) in enumerate(segments)]
    joint = tokenizer("".join(text for text, _ in segments), add_special_tokens=first_special)["input_ids"]
    merged = joint != [t for piece in pieces for t in piece]
    response, mask = [], []
    for piece, (_, is_learned) in zip(pieces[1:], segments[1:], strict=True):
        response += piece
        mask += [is_learned] * len(piece)
    return Encoded(list(pieces[0]), response, None if all(mask) else mask), merged


def encode_pair(tokenizer, prompt, response) -> tuple[Encoded, bool]:
    """Tokenize one prompt (text or messages) and its response (text or assistant messages).

    See :func:`encode_messages`; returns the encoding and whether tokens merged at a boundary.
    """
    prompt_messages = as_messages(prompt, "user")
    return encode_messages(tokenizer, prompt_messages + as_messages(response, "assistant"),
                           learn_from=len(prompt_messages))


def fit_to_length(enc: Encoded, max_length: int) -> Encoded | None:
    """Keep the whole prompt and truncate the response; ``None`` when the prompt alone does not fit."""
    room = max_length - len(enc.prompt_ids)
    if room < 1:
        return None
    mask = enc.response_mask[:room] if enc.response_mask is not None else None
    return Encoded(enc.prompt_ids, enc.response_ids[:room], mask)


def pad_batch(sequences: list[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encodings into ``input_ids``, ``attention_mask`` and ``labels``, each (B, T)."""
    width = max(len(s.input_ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(sequences):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(s.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _example_id(*parts: list[int]) -> int:
    """A stable signed 63-bit hash of token lists (same tokens -> same id, in any process)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(len(p).to_bytes(4, "little"))
        h.update(b"".join(t.to_bytes(4, "little", signed=True) for t in p))
    return int.from_bytes(h.digest(), "little") >> 1


def _value_problem(value, messages: bool = False) -> str | None:
    """What a gym cannot encode in a column's ``value`` (worded to follow "holds"), or None: text that is not
    blank (not in a ``messages`` column), or a non-empty list of ``{role, content}`` messages with text content."""
    if isinstance(value, str) and messages:
        return "text"
    if isinstance(value, str):
        return value_problem(value)   # blank, or not valid Unicode
    if isinstance(value, list) and value and all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        other = next((m["role"] for m in value if m["role"] not in ROLES), None)
        # The chat template writes any role as given, and only "assistant" turns are learned from.
        return None if other is None else f"a message with the role {other!r} (roles: {', '.join(ROLES)})"
    if isinstance(value, list):
        return "a list that is not messages" if value else "an empty list"
    return kind_of(value)


class _Gym:
    """Shared batching: seeded shuffling per epoch, ``reset``/``step``, test-split iteration."""

    def __init__(self, train_dataset, test_dataset, tokenizer, data_batch_size_per_gpu=_DEFAULTS.batch_size,
                 accelerator=None, max_context_length=_DEFAULTS.max_length, seed=_DEFAULTS.seed):
        self.batch_size = checked("data_batch_size_per_gpu", data_batch_size_per_gpu, 1, whole=True)
        self.max_context_length = max_context_length = checked("max_context_length", max_context_length, 2,
                                                               whole=True)
        self.seed = checked_seed(seed)
        if not callable(getattr(tokenizer, "apply_chat_template", None)):
            raise ArgumentError(f"tokenizer must be a transformers tokenizer, e.g. load_tokenizer()'s (got "
                                f"{type(tokenizer).__name__})")
        check_accelerator(accelerator, uses="num_processes")   # (the gym reads only how the data is shared)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.accelerator = accelerator
        self.pad_token_id = tokenizer.pad_token_id
        self.train_examples = self._encode_split(train_dataset, "train")
        if not self.train_examples:
            stats = self.encode_stats["train"]
            why = [f"{stats.dropped_prompt_too_long} have a prompt longer than --max-length ({max_context_length} "
                   "tokens)"] if stats.dropped_prompt_too_long else []
            why += [f"{stats.dropped_same_tokens} have the same chosen and rejected tokens once cut to "
                    "--max-length"] if stats.dropped_same_tokens else []
            why += [f"{stats.dropped_same_answers} have the same chosen and rejected answer"] \
                if stats.dropped_same_answers else []
            fix = "; raise --max-length or shorten the prompts" if stats.dropped_same_answers < stats.rows else ""
            raise UserError(f"no training rows left after tokenization: of {stats.rows} train rows, "
                            f"{' and '.join(why)}{fix}")
        self.test_examples = self._encode_split(test_dataset, "test") if test_dataset is not None else []
        if test_dataset is not None and self.encode_stats["test"].rows and not self.test_examples:
            logger.warning("test split: no row is left after tokenization (see above), so this run is not "
                           "evaluated; raise --max-length")
        self.epoch = 0
        self._order: list[int] = []
        self._cursor = 0

    # -- subclasses provide these -------------------------------------------------------------
    def _encode_row(self, row, stats: EncodeStats):  # pragma: no cover - abstract
        raise NotImplementedError

    def _collate(self, examples) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read_columns(self, row) -> list[str]:  # pragma: no cover - abstract
        """The columns of ``row`` that :meth:`_encode_row` reads."""
        raise NotImplementedError

    def _column_problem(self, columns: tuple, data: str) -> str | None:  # pragma: no cover - abstract
        """What is wrong with rows of ``columns`` (argument ``data``) for this gym, or None."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    def _rows(self, dataset, split: str):
        """``dataset`` (argument ``<split>_dataset``) as rows to encode, checked once, before any encoding: a
        ``datasets.Dataset`` or an iterable of dict rows holding the columns this gym reads."""
        data = f"{split}_dataset"
        if isinstance(dataset, (str, bytes, Mapping)) or not isinstance(dataset, Iterable):
            raise ArgumentError(f"{data} must be a datasets.Dataset or a list of dict rows (got "
                                f"{type(dataset).__name__})")
        # a datasets.Dataset: its columns, the same in every row
        names = getattr(dataset, "column_names", None) if hasattr(dataset, "__len__") else None
        rows = dataset if names is not None else list(dataset)
        bad = next((row for row in rows if not isinstance(row, Mapping)), None) if names is None else None
        if bad is not None:
            raise ArgumentError(f"{data} must be a datasets.Dataset or a list of dict rows (got a row that is a "
                                f"{type(bad).__name__})")
        if split == "train" and not len(rows):
            raise ArgumentError(f"{data} has no rows: give a datasets.Dataset or a list of dict rows")
        for columns in [tuple(names)] if names is not None else dict.fromkeys(tuple(row) for row in rows):
            problem = self._column_problem(columns, data)
            if problem:
                raise ArgumentError(problem)
        return rows

    def _encode_split(self, dataset, split: str) -> list:
        stats = EncodeStats()
        examples = []
        for number, row in enumerate(self._rows(dataset, split), start=1):
            for column in self._read_columns(row):
                problem = _value_problem(row[column], messages=column == "messages")
                if problem:
                    raise ArgumentError(f"{split}_dataset row {number}: {column} holds {problem}, where text or a list "
                                        "of {role, content} messages with text content is needed (make_dataset reads "
                                        "more shapes and role names, and drops unusable rows with a count)")
            stats.rows += 1
            ex = self._encode_row(row, stats)
            if ex is not None:
                examples.append(ex)
        if stats.dropped_prompt_too_long:
            logger.warning("%s split: dropped %d of %d rows whose prompt alone exceeds --max-length (%d tokens)",
                           split, stats.dropped_prompt_too_long, stats.rows, self.max_context_length)
        if stats.truncated_responses:
            # A cut response loses its end-of-turn token: the model is not taught to stop on it.
            logger.warning("%s split: cut %d of %d responses to fit --max-length (%d tokens); they lose their "
                           "end-of-turn token", split, stats.truncated_responses, stats.responses,
                           self.max_context_length)
        if stats.dropped_same_tokens:
            # Identical answers give the preference loss no gradient and every pair-level metric a tie.
            logger.warning("%s split: dropped %d of %d pairs whose chosen and rejected answers are the same tokens "
                           "once cut to --max-length (%d tokens)", split, stats.dropped_same_tokens, stats.rows,
                           self.max_context_length)
        if stats.dropped_same_answers:
            logger.warning("%s split: dropped %d of %d pairs whose chosen and rejected answers are the same",
                           split, stats.dropped_same_answers, stats.rows)
        if stats.boundary_merges:
            logger.info("%s split: %d rows would merge tokens across the prompt/response boundary; "
                        "prompt and response were tokenized separately", split, stats.boundary_merges)
        self.__dict__.setdefault("encode_stats", {})[split] = stats
        return examples

    def _fit(self, enc: Encoded, stats: EncodeStats) -> Encoded | None:
        fitted = fit_to_length(enc, self.max_context_length)
        if fitted is not None:
            stats.responses += 1
            stats.truncated_responses += len(fitted.response_ids) < len(enc.response_ids)
        return fitted

    @property
    def progress(self) -> float:
        """Epochs done so far, fractional (2.5 = half-way through the third epoch)."""
        return self.epoch + self._cursor / len(self.train_examples)

    @property
    def processes(self) -> int:
        """How many processes share each batch (1 without an accelerator)."""
        return self.accelerator.num_processes if self.accelerator is not None else 1

    @property
    def batches_per_epoch(self) -> int:
        """Training batches in one pass over the train split (the last one may be smaller; with several
        processes it is cut to a multiple of their number, and gone when that leaves nothing)."""
        full, rest = divmod(len(self.train_examples), self.batch_size * self.processes)
        return full + (1 if rest - rest % self.processes else 0)

    def _shuffle(self) -> None:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self._order = torch.randperm(len(self.train_examples), generator=g).tolist()
        self._cursor = 0

    def reset(self) -> dict[str, torch.Tensor]:
        """Start from epoch 0 and return its first training batch."""
        self.epoch = 0
        self._shuffle()
        return self.step()

    def step(self) -> dict[str, torch.Tensor]:
        """Return the next training batch, starting a new (reshuffled) epoch when one runs out."""
        if not self._order:
            self._shuffle()
        if self._cursor >= len(self._order):
            self.epoch += 1
            self._shuffle()
        n = self.processes
        idx = self._order[self._cursor: self._cursor + self.batch_size * n]
        self._cursor += len(idx)
        if n > 1:
            # Every process draws the same global batch and keeps its own share of the rows. An epoch's
            # last, short batch is cut to a multiple of the process count: every share the same size.
            usable = len(idx) - len(idx) % n
            if usable == 0:  # fewer rows left than processes: the epoch ends here
                self._cursor = len(self._order)
                return self.step()
            idx = idx[:usable][self.accelerator.process_index::n]
        return self._collate([self.train_examples[i] for i in idx])

    @functools.cached_property
    def data_fingerprint(self) -> str:
        """A hash of every tokenized train and test example (ids and labels), in their stored order:
        equal exactly when the data a run sees is the same, whatever file or hub set it came from
        (computed once: the examples do not change)."""
        import array

        h = hashlib.sha256()
        for split in (self.train_examples, self.test_examples):
            h.update(len(split).to_bytes(8, "little"))
            for example in split:
                for enc in (example.chosen, example.rejected) if isinstance(example, PreferencePair) else (example,):
                    h.update(array.array("q", enc.input_ids).tobytes() + b"|" + array.array("q", enc.labels).tobytes())
        return h.hexdigest()[:32]

    def state_dict(self) -> dict:
        """Data position, so a resumed run continues with the same next batch."""
        return {"epoch": self.epoch, "cursor": self._cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch = state["seed"], state["epoch"]
        self._shuffle()
        self._cursor = state["cursor"]

    def test_batches(self, batch_size: int | None = None):
        """Yield batches covering the whole test split once, in order (this process's share of it)."""
        size = batch_size or self.batch_size
        examples = self.test_examples
        if self.processes > 1:
            examples = examples[self.accelerator.process_index::self.processes]
        for start in range(0, len(examples), size):
            yield self._collate(examples[start: start + size])


class SFTGym(_Gym):
    """Supervised fine-tuning data: the prompt is context, the response column is the target.

    Rows hold ``prompt`` and a response column (text or message lists), or ``messages``: a whole
    conversation whose every assistant turn is learned while system and user turns are context.

    Args:
        train_dataset, test_dataset: datasets (or lists of dicts) as above (see ``make_dataset(task="sft")``).
        tokenizer: a Hugging Face tokenizer; its chat template is used where it has one.
        data_batch_size_per_gpu: rows per batch on each process; with an accelerator of N processes
            every global batch holds N times as many rows, split between them.
        response_column: which column holds the target answer; ``None`` takes ``completion`` where rows
            have it, else ``chosen`` (preference data).
        accelerator: an ``accelerate.Accelerator`` or ``None``.
        max_context_length: longest sequence in tokens; responses are cut to fit, rows whose prompt
            alone does not fit are dropped with a counted warning.
        seed: shuffling seed (each epoch reshuffles with ``seed + epoch``).
    """

    def __init__(self, train_dataset, test_dataset, tokenizer, data_batch_size_per_gpu=_DEFAULTS.batch_size,
                 response_column=None, accelerator=None, max_context_length=_DEFAULTS.max_length,
                 seed=_DEFAULTS.seed, prompt_column="prompt"):
        self.response_column = response_column
        self.prompt_column = prompt_column
        super().__init__(train_dataset, test_dataset, tokenizer, data_batch_size_per_gpu,
                         accelerator, max_context_length, seed)

    def _read_columns(self, row):
        if "messages" in row and self.prompt_column not in row:
            return ["messages"]
        return [self.prompt_column, self.response_column or ("completion" if "completion" in row else "chosen")]

    def _encode_row(self, row, stats):
        if "messages" in row and self.prompt_column not in row:
            enc, merged = encode_messages(self.tokenizer, row["messages"])
        else:
            column = self.response_column or ("completion" if "completion" in row else "chosen")
            enc, merged = encode_pair(self.tokenizer, row[self.prompt_column], row[column])
        stats.boundary_merges += merged
        fitted = self._fit(enc, stats)
        if fitted is None:
            stats.dropped_prompt_too_long += 1
        return fitted

    def _column_problem(self, columns, data):
        if "messages" in columns and self.prompt_column not in columns:
            return None   # conversations
        if self.prompt_column not in columns:
            return (f"prompt_column={self.prompt_column!r} is not a column of {data}, nor is 'messages' (its rows "
                    f"have: {_listed(columns)})")
        if self.response_column is None and not {"completion", "chosen"} & set(columns):
            return (f"{data} has neither a 'completion' nor a 'chosen' column: name its answer column with "
                    f"response_column= (its rows have: {_listed(columns)})")
        if self.response_column is not None and self.response_column not in columns:
            return (f"response_column={self.response_column!r} is not a column of {data} (its rows have: "
                    f"{_listed(columns)})")
        return None

    def _collate(self, examples):
        return pad_batch(examples, self.pad_token_id)


@dataclass
class PreferencePair:
    """A tokenized preference pair sharing one prompt."""

    chosen: Encoded
    rejected: Encoded
    example_id: int


class PreferenceGym(_Gym):
    """Preference data (``prompt``, ``chosen``, ``rejected``) for DPO-style training.

    Values are text, or message lists (a multi-turn prompt, assistant answers): see
    ``make_dataset``. Both answers of a pair share the prompt's tokens, so packing runs it once.

    Arguments as for :class:`SFTGym`, but for ``prompt_column`` and ``response_column``: the columns are
    ``prompt``, ``chosen`` and ``rejected`` (``make_dataset``'s ``column_map`` renames others). Each batch
    holds the chosen sequences followed by the rejected ones, so both run in a single forward pass.
    """

    def __init__(self, train_dataset, test_dataset, tokenizer, data_batch_size_per_gpu=_DEFAULTS.batch_size,
                 accelerator=None, max_context_length=_DEFAULTS.max_length, seed=_DEFAULTS.seed):
        super().__init__(train_dataset, test_dataset, tokenizer, data_batch_size_per_gpu,
                         accelerator, max_context_length, seed)

    def _read_columns(self, row):
        return ["prompt", "chosen", "rejected"]

    def _encode_row(self, row, stats):
        chosen, merged_c = encode_pair(self.tokenizer, row["prompt"], row["chosen"])
        rejected, merged_r = encode_pair(self.tokenizer, row["prompt"], row["rejected"])
        stats.boundary_merges += merged_c or merged_r
        if chosen.input_ids == rejected.input_ids and chosen.labels == rejected.labels:
            stats.dropped_same_answers += 1
            return None
        chosen, rejected = self._fit(chosen, stats), self._fit(rejected, stats)
        if chosen is None or rejected is None:
            stats.dropped_prompt_too_long += 1
            return None
        if chosen.input_ids == rejected.input_ids and chosen.labels == rejected.labels:
            stats.dropped_same_tokens += 1
            return None
        # the labels too: the same tokens with another answer boundary are another example
        return PreferencePair(chosen, rejected, _example_id(chosen.input_ids, rejected.input_ids, chosen.labels,
                                                            rejected.labels))

    def _column_problem(self, columns, data):
        missing = [c for c in ("prompt", "chosen", "rejected") if c not in columns]
        return (f"{data} has no {' or '.join(map(repr, missing))} column: preference rows need 'prompt', 'chosen' "
                f"and 'rejected' (its rows have: {_listed(columns)})") if missing else None

    def _collate(self, pairs):
        batch = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], self.pad_token_id)
        batch["example_ids"] = torch.tensor([p.example_id for p in pairs], dtype=torch.long)
        return batch

"""Run options: one typed dataclass per algorithm, filled from defaults <- YAML <- command line.

The dataclasses are the only source of defaults: the command line's flags and help text are
generated from their fields, and a YAML file may set any field by name. ``validate`` reports
every problem at once.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .columns import ColumnMap, EvalColumnMap
from .data import BUNDLED_DATASET, BUNDLED_DATASETS, seed_problem
from .errors import UserError
from .formats import FORMATS
from .losses import PREFERENCE_LOSSES
from .runtime import usable_cpus

REPORT_TARGETS = ("none", "tensorboard", "wandb")


def opt(default, help: str, **kw):
    """A dataclass field with its help text (shown by ``--help``)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class SFTConfig:
    """Options of a supervised fine-tuning run."""

    # -- model --------------------------------------------------------------------------------
    model: str | None = opt(None, "model: 'smollm2-135m-instruct' (embedded, offline), a hub id, a local "
                                  "folder or a .gguf file [default: the --load-path adapter's base, else the embedded model]")
    device: str = opt("auto", "cpu, cuda, cuda:N, mps or auto (CUDA when available)")
    dtype: str = opt("auto", "float32, bfloat16, float16 or auto (bf16 on CUDA that supports it, else float32)")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA scaling numerator (the update is scaled by alpha / r)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA input, in [0, 1) (its random masks cost about 9%% "
                                   "of a CPU training step)")
    lora_target_modules: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj"], "modules that get adapters")
    trust_remote_code: bool = opt(False, "allow a hub or local model to run its own Python code (off: only "
                                         "architectures transformers ships are loaded)")
    # -- data ---------------------------------------------------------------------------------
    dataset: str = opt(BUNDLED_DATASET, "bundled set name, a .jsonl/.json/.csv/.tsv/.parquet file, or a hub id "
                                         "(org/name: its train split; org/name:SPLIT for another)")
    test_size: float = opt(0.1, "held-out share (0 < x < 1) or row count (>= 1) of the dataset")
    eval_dataset: str | None = opt(None, "held-out rows from this dataset (a file or hub id, e.g. org/name:test) "
                                         "instead of a --test-size share of --dataset")
    max_length: int = opt(256, "longest sequence in tokens; responses are cut to fit, rows whose prompt alone "
                               "does not fit are dropped (counted)")
    format: str = opt("auto", "dataset shape: auto (recognised from the rows), standard, conversational, "
                              "sharegpt, alpaca or hh (Anthropic HH-RLHF transcripts)")
    prompt_column: str | None = opt(None, "column holding the prompt [default: prompt]")
    response_column: str | None = opt(None, "SFT: column holding the answer to learn [default: completion, else "
                                            "chosen]")
    chosen_column: str | None = opt(None, "column holding the preferred answer [default: chosen]")
    rejected_column: str | None = opt(None, "column holding the dispreferred answer [default: rejected]")
    messages_column: str | None = opt(None, "SFT: column holding whole conversations [default: messages]")
    system_column: str | None = opt(None, "column holding a system message for each row's prompt [default: "
                                          "system]")
    eval_format: str | None = opt(None, "the --eval-dataset's shape, where it differs from the training data's "
                                        "[default: --format]")
    eval_columns: list[str] | None = opt(None, "the --eval-dataset's columns, where they are named differently from "
                                               "the training data's: PART=COLUMN items, PART one of prompt, response, "
                                               "chosen, rejected, messages, system (e.g. prompt=question "
                                               "chosen=good; none: the usual names) [default: the --*-column options]",
                                         metavar="PART=COLUMN", nargs="*", mapping=True)
    chat_template: str | None = opt(None, "Jinja chat-template file replacing (or supplying) the tokenizer's; "
                                          "saved with the adapter")
    # -- optimisation ---------------------------------------------------------------------------
    epochs: float = opt(1.0, "passes over the training split (ignored when --max-steps > 0)")
    max_steps: int = opt(0, "optimizer steps to take; 0 means as many as --epochs needs")
    batch_size: int = opt(8, "rows per optimizer step")
    micro_batch_size: int = opt(0, "rows per forward/backward (gradients accumulate); 0 = batch size")
    lr: float = opt(2e-4, "peak learning rate")
    warmup_ratio: float = opt(0.1, "share of the steps with linear warm-up, in [0, 1)")
    min_lr_ratio: float = opt(0.1, "cosine decay ends at this share of the peak learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this; 0 disables clipping")
    update_epochs: int = opt(1, "optimizer steps taken on each batch")
    seed: int = opt(42, "seed of the split, shuffling and adapter initialisation")
    # -- speed --------------------------------------------------------------------------------
    packing: bool = opt(True, "padding-free forward passes (every token in one row, attention per "
                                 "sequence; other models: rows packed with a block-diagonal mask)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward (less memory, slower)")
    threads: int = opt(0, "torch CPU threads; 0 keeps torch's default")
    reuse_memory: bool = opt(True, "keep freed memory in the process for reuse (glibc): no fresh pages for each "
                                   "large tensor, ~5%% faster CPU steps; resident memory stays at its peak")
    # -- loop and output ------------------------------------------------------------------------
    eval_interval: int = opt(20, "evaluate on the test split every N steps (and at the start and end); 0 = start "
                                 "and end only")
    save_path: str = opt("outputs/sft", "where the run folder goes")
    no_timestamp: bool = opt(False, "write into --save-path itself, not a <YYYYmmdd_HHMMSS>_<ALGO> subfolder")
    load_path: str | None = opt(None, "a LoRA adapter folder (e.g. outputs/sft/actor) to start from")
    save_interval: int = opt(0, "also write <run>/checkpoint-<step>/ every N steps; 0 = at the end only")
    keep_checkpoints: int = opt(2, "how many of the newest checkpoint-<step>/ folders to keep")
    resume: str | None = opt(None, "continue the run in this folder from its newest complete checkpoint, with "
                                   "its recorded options (--max-steps / --epochs may extend it)")
    overwrite: bool = opt(False, "allow --no-timestamp into a folder that already holds a run (its files are replaced)")
    report_to: str = opt("none", "extra loggers: none, tensorboard or wandb (offline)")
    plot: bool = opt(True, "write training-curve PNGs into the run folder at the end")
    config: str | None = opt(None, "YAML file of options (keys are these option names); flags override it")
    # -- population-based tuning (one shared base model, one adapter per member) ---------------------
    pop_size: int = opt(1, "members of the population, each its own LoRA adapter and optimizer on the one base; "
                           "1 = a plain run")
    evo_steps: int = opt(20, "with --pop-size > 1: evaluate, select and mutate every N optimizer steps")
    tournament_size: int = opt(2, "members drawn for each tournament; the fittest of them is copied")
    mutation_prob: float = opt(0.5, "chance that a copied member's hyper-parameters are mutated, in [0, 1]")
    mutate_lr_range: list[float] = opt([0.5, 2.0], "a mutation multiplies the learning rate by a factor drawn "
                                                   "uniformly from this range")
    # -- interactive evaluation -------------------------------------------------------------------
    eval: bool = opt(False, "chat with the model at --load-path instead of training")
    max_new_tokens: int = opt(200, "longest generated answer, in tokens")
    temperature: float = opt(0.0, "sampling temperature of --eval answers; 0 = greedy (the most likely token, "
                                  "no randomness); sampling is seeded by --seed")
    top_p: float = opt(1.0, "with --temperature > 0: sample from the smallest set of most likely tokens whose "
                            "probabilities reach this, in (0, 1]")
    repetition_penalty: float = opt(1.0, "> 1 makes tokens already in the conversation less likely (positive "
                                         "logits divided by it, negative multiplied); 1 = off")

    algo = "sft"

    def validate(self) -> None:
        """Raise one UserError that lists every invalid option."""
        problems = []

        def need(cond, msg):
            if not cond:
                problems.append(msg)

        for name in ("lora_r", "lora_alpha", "batch_size", "update_epochs", "max_new_tokens", "keep_checkpoints"):
            need(getattr(self, name) >= 1, f"--{flag(name)} must be >= 1 (got {getattr(self, name)})")
        need(self.max_length >= 2, f"--max-length must be >= 2: a prompt token and a response token (got "
                                   f"{self.max_length})")
        for name in ("max_steps", "micro_batch_size", "eval_interval", "save_interval", "threads"):
            need(getattr(self, name) >= 0, f"--{flag(name)} must be >= 0 (got {getattr(self, name)})")
        cpus = usable_cpus()   # more threads than CPUs only makes them wait on each other
        need(self.threads <= cpus, f"--threads {self.threads} is more than the {cpus} CPUs this process may use; "
                                   f"give at most {cpus} (0 keeps torch's default)")
        # Written as ranges so NaN fails them too; inf is refused as well: an infinite learning
        # rate or epoch count is a typo, never a request.
        need(seed_problem(self.seed) is None, f"--seed {seed_problem(self.seed)}")
        need(0 < self.lr < math.inf, f"--lr must be > 0 and finite (got {self.lr})")
        need(0 < self.epochs < math.inf, f"--epochs must be > 0 and finite (got {self.epochs})")
        need(0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1) (got {self.lora_dropout})")
        need(0 <= self.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1) (got {self.warmup_ratio})")
        need(0 <= self.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1] (got {self.min_lr_ratio})")
        for name in ("weight_decay", "max_grad_norm"):
            need(0 <= getattr(self, name) < math.inf, f"--{flag(name)} must be >= 0 and finite "
                                                      f"(got {getattr(self, name)})")
        need(self.test_size > 0 and (self.test_size < 1 or float(self.test_size).is_integer()),
             f"--test-size must be a fraction in (0, 1) or a whole row count (got {self.test_size})")
        need(self.micro_batch_size == 0 or self.batch_size % self.micro_batch_size == 0,
             f"--batch-size ({self.batch_size}) must be a multiple of --micro-batch-size ({self.micro_batch_size})")
        need(bool(self.lora_target_modules), "--lora-target-modules needs at least one module name")
        for target in self.report_to.split(","):
            need(target.strip() in REPORT_TARGETS, f"--report-to takes {', '.join(REPORT_TARGETS)} (got {target!r})")
        need(self.format in FORMATS, f"--format must be one of {', '.join(FORMATS)} (got {self.format!r})")
        for name in ("dataset", "eval_dataset"):
            value = getattr(self, name)
            need(value is None and name == "eval_dataset" or isinstance(value, str) and value.strip(),
                 f"--{flag(name)} needs a dataset: a bundled name, a file or a hub id (got {value!r})")
        need(self.algo == "sft" or not self.response_column and not self.messages_column,
             "--response-column and --messages-column are for SFT data; DPO reads --prompt-column, "
             "--chosen-column and --rejected-column")
        need(self.eval_format is None or self.eval_format in FORMATS,
             f"--eval-format must be one of {', '.join(FORMATS)} (got {self.eval_format!r})")
        for name in ("eval_format", "eval_columns"):
            need(getattr(self, name) is None or self.eval_dataset, f"--{flag(name)} describes --eval-dataset: "
                                                                   "give that dataset too")
        eval_columns, eval_problems = EvalColumnMap.parse(self.eval_columns or ())
        problems += eval_problems
        need(self.algo == "sft" or not eval_columns.response and not eval_columns.messages,
             "--eval-columns response= and messages= are for SFT data; DPO reads prompt, chosen and rejected")
        need(not self.eval or self.load_path, "--eval needs --load-path (the adapter to chat with)")
        need(not self.eval or self.pop_size == 1, "--eval chats with one adapter: drop --pop-size")
        problems += sampling_problems(self.temperature, self.top_p, self.repetition_penalty)
        need(self.pop_size >= 1, f"--pop-size must be >= 1 (got {self.pop_size})")
        need(self.evo_steps >= 1, f"--evo-steps must be >= 1 (got {self.evo_steps})")
        need(1 <= self.tournament_size, f"--tournament-size must be >= 1 (got {self.tournament_size})")
        need(self.pop_size <= 1 or self.tournament_size <= self.pop_size,
             f"--tournament-size {self.tournament_size} draws more members than --pop-size {self.pop_size} has")
        need(0 <= self.mutation_prob <= 1, f"--mutation-prob must be in [0, 1] (got {self.mutation_prob})")
        problems += _range_problems("mutate_lr_range", self.mutate_lr_range)
        problems += self._extra_problems()
        if problems:
            raise UserError("invalid options: " + "; ".join(problems))

    def _extra_problems(self) -> list[str]:
        return []

    @property
    def test_split(self) -> int | float:
        """``test_size`` as ``make_dataset`` takes it (see :func:`as_test_split`)."""
        return as_test_split(self.test_size)

    @property
    def task(self) -> str:
        """What the data must hold for this algorithm: ``"sft"`` or ``"preference"``."""
        return "sft" if self.algo == "sft" else "preference"

    def column_map(self) -> ColumnMap:
        """The dataset columns named on the command line (see :mod:`alignkit.formats`)."""
        return ColumnMap(prompt=self.prompt_column, response=self.response_column, chosen=self.chosen_column,
                         rejected=self.rejected_column, messages=self.messages_column, system=self.system_column)

    def eval_column_map(self) -> ColumnMap | None:
        """The --eval-dataset's columns named by --eval-columns (None: the --*-column options apply to it)."""
        return None if self.eval_columns is None else EvalColumnMap.parse(self.eval_columns)[0]

    def to_dict(self) -> dict:
        """The options as a plain dict (what ``run.json`` records)."""
        return dataclasses.asdict(self)

    def lora_config(self):
        """The ``peft.LoraConfig`` these options describe."""
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=list(self.lora_target_modules), bias="none", task_type="CAUSAL_LM")


@dataclass
class DPOConfig(SFTConfig):
    """Options of a DPO run: the SFT options plus the preference loss's."""

    lr: float = opt(5e-5, "peak learning rate")
    save_path: str = opt("outputs/dpo", "where the run folder goes")
    beta: float = opt(0.1, "DPO beta: strength of the implicit KL penalty towards the reference")
    nll_alpha: float = opt(1.0, "weight of the NLL term on the chosen response; 0 gives vanilla DPO")
    loss_type: str = opt("sigmoid", "preference loss: " + ", ".join(PREFERENCE_LOSSES))
    label_smoothing: float = opt(0.0, "label smoothing of the sigmoid loss (conservative DPO), in [0, 0.5)")
    simpo_gamma: float = opt(0.5, "target reward margin of the simpo loss")
    share_prompts: bool = opt(True, "with --packing, run each pair's prompt once for both responses")
    mutate_beta_range: list[float] = opt([0.5, 2.0], "with --pop-size > 1: a mutation multiplies beta by a "
                                                     "factor drawn uniformly from this range")
    reuse_reference: bool = opt(True, "cache reference log-probs under $ALIGNKIT_CACHE so reruns skip them")

    algo = "dpo"

    def _extra_problems(self):
        problems = preference_problems(self.beta, self.nll_alpha, self.loss_type, self.label_smoothing)
        problems += _range_problems("mutate_beta_range", self.mutate_beta_range)
        if not math.isfinite(self.simpo_gamma):
            problems.append(f"--simpo-gamma must be a finite number (got {self.simpo_gamma})")
        return problems


CONFIGS = {"sft": SFTConfig, "dpo": DPOConfig}

# Options a resumed run may set anew: they change how long it runs, what it writes or how fast,
# never the numbers of the steps it repeats. Every other option comes from the run's record.
RESUME_MAY_CHANGE = frozenset({
    "max_steps", "epochs", "resume", "overwrite", "eval_interval", "save_interval", "keep_checkpoints",
    "report_to", "plot", "threads", "reuse_memory", "config", "save_path", "no_timestamp", "reuse_reference",
    "temperature", "top_p", "repetition_penalty",
})


def as_test_split(test_size: float) -> int | float:
    """A test size as ``make_dataset`` takes it: a whole number >= 1 is a row count, below 1 a fraction."""
    return int(test_size) if test_size >= 1 else test_size


def flag(name: str) -> str:
    """The command-line spelling of an option name (``max_steps`` -> ``max-steps``)."""
    return name.replace("_", "-")


def _as_flag(name: str) -> str:
    return f"--{flag(name)}"


def preference_problems(beta: float, nll_alpha: float, loss_type: str, label_smoothing: float,
                        name=_as_flag) -> list[str]:
    """What is wrong with a preference loss's options (empty when nothing); ``name`` spells an option."""
    problems = []
    if not 0 < beta < math.inf:  # also false for NaN
        problems.append(f"{name('beta')} must be > 0 and finite (got {beta})")
    if not 0 <= nll_alpha < math.inf:
        problems.append(f"{name('nll_alpha')} must be >= 0 and finite (got {nll_alpha})")
    if loss_type not in PREFERENCE_LOSSES:
        problems.append(f"{name('loss_type')} must be one of {', '.join(PREFERENCE_LOSSES)} (got {loss_type!r})")
    if not 0 <= label_smoothing < 0.5:
        problems.append(f"{name('label_smoothing')} must be in [0, 0.5) (got {label_smoothing})")
    elif label_smoothing and loss_type != "sigmoid":
        problems.append(f"{name('label_smoothing')} applies to the sigmoid loss only (got loss type {loss_type!r})")
    return problems


def sampling_problems(temperature: float, top_p: float, repetition_penalty: float,
                      name=_as_flag) -> list[str]:
    """What is wrong with these sampling options (empty when nothing); ``name`` spells an option."""
    problems = []
    if not 0 <= temperature < math.inf:   # written as ranges so NaN fails them too
        problems.append(f"{name('temperature')} must be >= 0 and finite; 0 is greedy (got {temperature})")
    if not 0 < top_p <= 1:
        problems.append(f"{name('top_p')} must be in (0, 1] (got {top_p})")
    elif top_p != 1 and temperature == 0:
        problems.append(f"{name('top_p')} applies to sampled answers: give {name('temperature')} > 0 too "
                        f"(0 is greedy), or drop {name('top_p')}")
    if not 0 < repetition_penalty < math.inf:
        problems.append(f"{name('repetition_penalty')} must be > 0 and finite; 1 leaves logits alone "
                        f"(got {repetition_penalty})")
    return problems


def _base_type(tp):
    """``int`` for ``int``, ``str`` for ``str | None``, ``list`` for ``list[str]``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) or tp


def _range_problems(name: str, bounds) -> list[str]:
    low, high = bounds
    if not (0 < low <= high and math.isfinite(high)):
        return [f"--{flag(name)} needs 0 < MIN <= MAX (got {low} {high})"]
    return []


def _item_type(hint):
    """``float`` for ``list[float]``, ``str`` for ``list[str]``."""
    args = typing.get_args(hint)
    return args[0] if args and typing.get_origin(hint) is list else str


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one flag per field of ``cls``; defaults stay unset so explicit flags can be told apart."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, help_text = _base_type(hints[f.name]), f.metadata["help"]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = {"default": argparse.SUPPRESS, "dest": f.name}
        if tp is bool and default is False:
            parser.add_argument(f"--{flag(f.name)}", action="store_true", help=help_text, **kwargs)
        elif tp is bool:
            parser.add_argument(f"--{flag(f.name)}", action=argparse.BooleanOptionalAction,
                                help=f"{help_text} [default: on]", **kwargs)
        elif tp is list and _item_type(hints[f.name]) is float:   # a (min, max) range
            parser.add_argument(f"--{flag(f.name)}", nargs=2, type=float, metavar=("MIN", "MAX"),
                                help=f"{help_text} [default: {' '.join(map(str, default))}]", **kwargs)
        elif tp is list:
            shown = "" if default is None or "[default" in help_text else f" [default: {' '.join(default)}]"
            parser.add_argument(f"--{flag(f.name)}", nargs=f.metadata.get("nargs", "+"),
                                metavar=f.metadata.get("metavar", "NAME"),
                                help=help_text + shown, **kwargs)
        else:
            shown = "" if default is None or "[default" in help_text else f" [default: {default}]"
            parser.add_argument(f"--{flag(f.name)}", type=tp, help=help_text + shown, **kwargs)


_TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "text",
               list: "a list of names"}


def _field(cls, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _coerce(cls, key: str, value, source: str):
    """``value`` from a YAML file as the type of option ``key``, or a UserError naming both.

    PyYAML reads ``1e-4`` (no dot in the mantissa) as a string, so a string that parses as a
    float is one for a float option, and as an int for an int option; nothing else is converted.
    """
    hint = typing.get_type_hints(cls)[key]
    tp = _base_type(hint)
    optional = type(None) in typing.get_args(hint)
    if value is None and optional:
        return value
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp in (int, float) and isinstance(value, bool):
        ok = False  # bool is an int in Python, but "batch_size: true" is a mistake
    elif tp is int and isinstance(value, int):
        ok = True
    elif tp is float and isinstance(value, (int, float)):
        return float(value)
    elif tp in (int, float) and isinstance(value, str):
        try:
            return tp(value)
        except ValueError:
            ok = False
    elif tp is list and _item_type(hint) is float:
        ok = isinstance(value, list) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if ok:
            return [float(v) for v in value]
    elif tp is list:
        if isinstance(value, dict) and _field(cls, key).metadata.get("mapping"):   # {part: column} in YAML
            value = [f"{part}={column}" for part, column in value.items()]
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, tp)
    if ok:
        return value
    shown = "nothing" if value is None else repr(value)
    if _field(cls, key).metadata.get("mapping"):
        words = "a list of PART=COLUMN items or a mapping of parts to columns"
    elif tp is list and _item_type(hint) is float:
        words = "two numbers [MIN, MAX]"
    else:
        words = _TYPE_WORDS.get(tp, tp.__name__)
    raise UserError(f"{source}: {key} must be {words}, got {shown}")


class _OneValueLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping giving one key twice is an error: PyYAML keeps the
    last value, so "lr: 1e-4" further down a file would silently replace an earlier "lr"."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, collections.abc.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key} is given twice (the second value would silently win)", key_node.start_mark)
            if isinstance(key, collections.abc.Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path) -> object:
    """The parsed YAML document of ``path``; every way it can be unreadable is a one-line UserError."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"config file {path} is a folder; give a YAML file")
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = p.read_bytes()
    except OSError as err:
        raise UserError(f"could not read config file {path}: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"config file {path} is not UTF-8 text (line {line}); save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=_OneValueLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path} is not valid YAML{where}: {exc.problem or exc.context}") from None
    except (yaml.YAMLError, RecursionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not valid YAML: {first}") from None


def load_yaml(path, cls) -> dict:
    """Options from a YAML file; unknown keys are an error (a misspelt key is never ignored).

    Keys may be spelt with ``_`` or ``-``; an empty file sets nothing; ``algo: sft|dpo`` ties it to that command.
    """
    data = _read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        held = {list: "a list", str: "text", bool: "true/false", int: "a number", float: "a number"}.get(
            type(data), "a single value")
        raise UserError(f"{path} must hold a mapping of option names to values, like 'lr: 0.0001' "
                        f"(it holds {held})")
    options: dict = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise UserError(f"{path}: option names must be text, got {key!r}")
        name = key.replace("-", "_")
        if name in options:  # "batch-size" and "batch_size" both given: neither silently wins
            raise UserError(f"{path}: option {name} is set twice")
        options[name] = value
    for name in ("resume", "config"):   # what a command line starts from, never an option of the run
        if name in options:
            raise UserError(f"{path}: {name} is not set in a config file; give --{name} on the command line")
    meant = options.pop("algo", cls.algo)   # the command a file is for, where it says: another one refuses it
    if meant != cls.algo:
        raise UserError(f"{path} is for alignkit {meant} (algo: {meant}), not {cls.algo}; drop its algo line to share it")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    dpo_only = [u for u in unknown if u in {f.name for f in dataclasses.fields(DPOConfig)}]
    if dpo_only:   # a DPO recipe given to sft: not a misspelling of an SFT option
        raise UserError(f"{path}: {', '.join(dpo_only)} {'is a DPO option' if len(dpo_only) == 1 else 'are DPO options'}"
                        f": the file is for alignkit dpo --config {path}")
    if unknown:
        hints = {u: difflib.get_close_matches(u, names, n=1) for u in unknown}
        said = ", ".join(f"{u} (did you mean {hints[u][0]}?)" if hints[u] else u for u in unknown)
        raise UserError(f"{path}: unknown option(s) {said} for {cls.algo}")
    return _beside(path, {k: _coerce(cls, k, v, str(path)) for k, v in options.items()})


def _beside(config_path, options: dict) -> dict:
    """``options`` with each relative :data:`PATH_OPTIONS` path that exists next to the config file made
    absolute there: a config file and its data can move together. Others are read from the working
    directory, as on the command line."""
    folder = Path(config_path).expanduser().parent
    for key in PATH_OPTIONS:
        value = options.get(key)
        if isinstance(value, str) and value.strip() and value not in BUNDLED_DATASETS \
                and not Path(value).expanduser().is_absolute() and (folder / value).exists():
            options[key] = str((folder / value).resolve())
    return options


EVAL_DATASET_OR_TEST_SIZE = ("--test-size cuts the held-out rows from --dataset; with --eval-dataset they are that "
                             "dataset's rows: drop one of them")


PATH_OPTIONS = ("dataset", "eval_dataset", "model", "load_path", "chat_template")
"""Options that may name a local file or folder: recorded as absolute paths, so a run folder's record
(``--resume``, the comparison) works from any working directory."""


def absolute_paths(values: dict) -> dict:
    """``values`` with every :data:`PATH_OPTIONS` value that names an existing local file or folder made
    absolute (bundled dataset names, hub ids and the embedded model's name stay as they are)."""
    out = dict(values)
    for key in PATH_OPTIONS:
        value = out.get(key)
        if isinstance(value, str) and value.strip() and value not in BUNDLED_DATASETS:
            path = Path(value).expanduser()
            if path.exists():
                out[key] = str(path.resolve())
    return out


def build_config(algo: str, flags: dict | None = None, **overrides):
    """The config of ``algo`` from defaults, then ``flags['config']``'s YAML, then flags and overrides."""
    cls = CONFIGS[algo]
    values = dict(flags or {}, **overrides)
    merged = load_yaml(values["config"], cls) if values.get("config") else {}
    # A flag wins over the config file: one choosing the other way to hold rows out drops the file's.
    if values.get("eval_dataset") and "test_size" not in values:
        merged.pop("test_size", None)
    if "test_size" in values and "eval_dataset" not in values:
        for name in ("eval_dataset", "eval_format", "eval_columns"):   # the file's description of that dataset too
            if name not in values:
                merged.pop(name, None)
    merged.update(values)
    merged = absolute_paths(merged)
    if merged.get("eval_dataset") and "test_size" in merged:
        where = "" if "test_size" in values else f" (both in {values['config']})"
        raise UserError(f"invalid options: {EVAL_DATASET_OR_TEST_SIZE}{where}")
    if merged.get("share_prompts") is True and merged.get("packing") is False:   # both asked for, not defaults
        raise UserError("invalid options: --share-prompts works through packing; drop --no-packing or "
                        "--share-prompts")
    cfg = cls(**merged)
    cfg.validate()
    return cfg


CHAT_OPTIONS = ("max_new_tokens", "temperature", "top_p", "repetition_penalty")
"""Options of ``--eval``'s chat alone."""
POPULATION_OPTIONS = ("evo_steps", "tournament_size", "mutation_prob", "mutate_lr_range", "mutate_beta_range")
"""Options of population-based tuning alone (``--pop-size`` > 1)."""
_CHAT_READS = frozenset(CHAT_OPTIONS + ("eval", "model", "device", "dtype", "load_path", "trust_remote_code",
                                        "chat_template", "threads", "seed", "config", "reuse_memory"))


def unused_options(cfg: SFTConfig, given) -> list[str]:
    """What is wrong with options in ``given`` (those set on the command line) that the command ``cfg``
    describes would ignore: a chat's options when training, a training option when chatting, a
    population's options without a population (the command line trains ``--pop-size 1`` as a plain
    run), the simpo loss's margin with another loss. Options from a config file are not checked: one
    file may serve several commands."""
    problems = []

    def drop(names, why):
        names = [f"--{flag(n)}" for n in names if n in given]
        if names:
            one = len(names) == 1
            problems.append(f"{', '.join(names)} {'does' if one else 'do'} not apply {why}: drop "
                            f"{'it' if one else 'them'}")

    if cfg.eval:
        drop(sorted(set(given) - _CHAT_READS), "to --eval, which chats with an adapter and trains nothing")
    else:
        drop(CHAT_OPTIONS, "to training, only to the chat of --eval")
        drop(POPULATION_OPTIONS if cfg.pop_size == 1 else (), "without --pop-size > 1")
        drop(("epochs",) if cfg.max_steps > 0 and "max_steps" not in given else (), f"while --max-steps "
             f"{cfg.max_steps} (recorded or from --config) sets the length; --max-steps 0 counts it in --epochs")
        drop(("save_interval", "eval_interval") if cfg.pop_size > 1 else (),
             "to --pop-size > 1, whose members are evaluated and saved once per generation (--evo-steps)")
    if getattr(cfg, "loss_type", "simpo") != "simpo":
        drop(("simpo_gamma",), f"to --loss-type {cfg.loss_type} (only to simpo)")
    elif cfg.algo == "dpo":
        drop(("reuse_reference",), "to --loss-type simpo, which has no reference")
    return problems

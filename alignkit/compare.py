"""Compare trained configurations: held-out numbers, greedy answers, figures, one HTML report.

Every configuration is an adapter on the same base model (``None`` = the base with an untrained
LoRA, whose B matrices are zero, so it answers exactly as the base). Rewards of every
configuration are measured against that same base, on the same held-out preference pairs, so the
numbers in one table are comparable.

Each run's ``run.json`` says what it was trained against: the dataset, seed and test size of its
split, its max length and beta. Every configuration is scored on that held-out split, which must
then be one split for all runs. Runs trained against different splits are refused, unless a split
is given explicitly, which is then checked to share no row with any run's training rows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .adapters import adapter_base_model, load_adapter, read_adapter_config
from .agents import PreferenceObjective, score_preferences
from .columns import ColumnMap, EvalColumnMap
from .config import DPOConfig, as_test_split, sampling_problems
from .data import make_dataset, row_key
from .errors import ArgumentError, UserError
from .generation import Sampling, chat_prompt_ids, generate_replies
from .gyms import PreferenceGym
from .lean_step import BASE, mixable_adapters, plain_lora_config
from .models import DEFAULT_MODEL, add_lora, load_model, load_tokenizer
from .plots import plot_runs
from .quality import answer_quality
from .reference import ReferencePolicy, reference_store
from .report import repetition_score, write_report
from .runtime import release_freed_memory

_DEFAULTS = DPOConfig()

logger = logging.getLogger(__name__)

SEED_PROMPTS = [
    "Do you have any favorite memories?",
    "What\u2019s your opinion on pineapple with pizza?",
    "Give me an itinerary for a weekend trip to Istanbul.",
    "I need to get my car washed. The car wash is 100m from my house. Should I walk or drive?",
]
DEFAULT_PROMPTS = SEED_PROMPTS + [
    "I'm feeling a bit lonely this weekend. Any ideas?",
    "What's the best way to start learning to cook?",
]

# Names used for run folders and report tabs, in the report's order.
LABELS = {
    "base": "Base model",
    "sft": "SFT",
    "dpo": "DPO",
    "dpo_nll": "DPO + NLL",
    "sft_dpo_nll": "SFT \u2192 DPO + NLL",
}


_LINE_END = re.compile(r"\r\n|\r|\n")   # the only line ends of a prompts file


def prompt_lines(path) -> list[tuple[int, str]]:
    """``(line number, prompt)`` of each non-empty line of a prompts file, lines counted from 1.

    A line ends only at ``\\n``, ``\\r\\n`` or ``\\r``: the other characters ``str.splitlines`` breaks at
    (U+2028, U+2029, ``\\x0b``, ``\\x0c``, ``\\x1c``-``\\x1e``, ``\\x85``; text pasted from web pages holds them)
    stay inside their prompt. Raises UserError for a folder, a missing or unreadable file, text that is
    not UTF-8, and a file without prompts.
    """
    p = Path(path)
    if p.is_dir():
        raise UserError(f"--prompts {path} is a folder; give a text file with one prompt per line")
    if not p.is_file():
        raise UserError(f"prompts file not found: {path}")
    try:
        lines = _LINE_END.split(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"--prompts {path} is not UTF-8 text") from None
    except OSError as err:
        raise UserError(f"could not read --prompts {path}: {err.strerror or err}") from None
    prompts = [(number, line.strip()) for number, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise UserError(f"{path} holds no prompts (one per line)")
    return prompts


def read_prompts(path) -> list[str]:
    """Prompts from a text file, one per non-empty line (see :func:`prompt_lines`)."""
    return [prompt for _, prompt in prompt_lines(path)]


def model_context(model_name: str) -> int | None:
    """The context of ``model_name`` in tokens (its config's ``max_position_embeddings``), read without
    loading its weights; None when the config does not say or cannot be read (loading the model then
    says what is wrong). The model is found as ``alignkit.models.load_tokenizer`` finds it; a GGUF model
    is converted to its cached safetensors copy first, as loading it converts it (reading the config from
    the GGUF file itself takes as long as a third of that, every time)."""
    from transformers import AutoConfig

    from .hub import cache_only_if_unreachable
    from .models import _gguf_folder, resolve_model_source

    source = resolve_model_source(model_name)
    try:
        with cache_only_if_unreachable() if source.kind == "hub" else contextlib.nullcontext():
            config = AutoConfig.from_pretrained(_gguf_folder(source.location) if source.kind in ("embedded", "gguf")
                                                else source.location)
    except (OSError, ValueError):
        return None
    return getattr(config, "max_position_embeddings", None)


def check_prompts_fit(prompts: list, tokenizer, context: int | None, max_new_tokens: int,
                      lines: list[int] | None = None, path=None) -> None:
    """Refuse (UserError, naming the first such prompt) a prompt whose tokens, rendered as the answers render
    them (:func:`alignkit.generation.chat_prompt_ids`), plus ``max_new_tokens`` exceed the model's ``context``
    (None: not known, nothing is checked). ``lines`` (their line numbers) and ``path`` (their file) name
    the prompt as the user wrote it."""
    if not context:
        return
    room = context - max_new_tokens
    if room < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt: the model's context holds "
                        f"{context} tokens, prompt and answer together")
    for i, prompt in enumerate(prompts):
        needed = len(chat_prompt_ids(tokenizer, prompt))
        if needed > room:
            where = (f"--prompts {path} line {lines[i]}" if lines and path else
                     f"prompt {i + 1} of {len(prompts)}")
            raise UserError(f"{where}: the prompt takes {needed} tokens and its answer up to {max_new_tokens} more "
                            f"(--max-new-tokens), beyond the model's context of {context} tokens; shorten it to at "
                            f"most {room} tokens or lower --max-new-tokens")


def check_same_base(runs: dict[str, str | None], model: str | None) -> str:
    """The one base model all run adapters share (``model`` if given); a mix is a UserError."""
    bases = {name: adapter_base_model(Path(d) / "actor") for name, d in runs.items() if d}
    wanted = model or next(iter(bases.values()), None) or DEFAULT_MODEL
    wrong = [f"{name} ({base})" for name, base in bases.items() if base and _same_model(base) != _same_model(wanted)]
    if wrong:
        raise UserError(f"all runs must share the base model {wanted!r}; these do not: {', '.join(wrong)}")
    return wanted


def _same_model(name: str) -> str:
    """``name`` as compared between runs: a local folder by its absolute path (runs record absolute
    paths, a user may type a relative one), anything else (a hub id, the embedded model) as it is."""
    return str(Path(name).resolve()) if Path(name).is_dir() else name


@dataclass(frozen=True)
class Split:
    """A held-out split: which dataset, and the seed and test size that cut it."""

    dataset: str
    seed: int
    test_size: float
    format: str = "auto"
    column_map: ColumnMap = ColumnMap()
    eval_dataset: str | None = None   # held-out rows from this dataset instead of a test_size share
    eval_format: str | None = None    # its shape and columns, where they differ from the training data's
    eval_column_map: ColumnMap | None = None

    def load(self):
        """``(train, test)`` preference rows of this split (see ``alignkit.data.make_dataset``)."""
        return make_dataset(self.dataset, test_size=as_test_split(self.test_size), seed=self.seed,
                            format=self.format, column_map=self.column_map, eval_dataset=self.eval_dataset,
                            eval_format=self.eval_format, eval_column_map=self.eval_column_map)

    def _key(self) -> tuple:
        held_out = ((_dataset_id(self.eval_dataset), self.eval_format, self.eval_column_map) if self.eval_dataset
                    else (float(self.test_size),))
        return (_dataset_id(self.dataset), self.seed, self.format, self.column_map, *held_out)

    def same_as(self, other: Split) -> bool:
        """Whether both splits hold the same held-out rows (and the same training rows)."""
        return self._key() == other._key()

    def __str__(self) -> str:
        if self.eval_dataset:
            return f"dataset {self.dataset}, held out: dataset {self.eval_dataset}"
        return f"dataset {self.dataset}, seed {self.seed}, test size {self.test_size:g}"


def _dataset_id(name: str) -> str:
    """A local file by its absolute path (``data.jsonl`` and ``./data.jsonl`` are one dataset)."""
    path = Path(name)
    return str(path.resolve()) if path.is_file() else name


@dataclass(frozen=True)
class RunRecord:
    """What a run's ``run.json`` says its evaluation needs."""

    split: Split
    max_length: int
    beta: float


def read_run_record(run_dir) -> RunRecord:
    """The split, max length and beta a run was trained with, from ``run_dir/run.json``."""
    path = Path(run_dir) / "run.json"
    try:
        config = json.loads(path.read_text())["config"]
        columns = ColumnMap(prompt=config.get("prompt_column"), chosen=config.get("chosen_column"),
                            rejected=config.get("rejected_column"), system=config.get("system_column"))
        eval_columns = config.get("eval_columns")
        split = Split(config["dataset"], int(config["seed"]), float(config["test_size"]),
                      config.get("format", "auto"), columns, config.get("eval_dataset"), config.get("eval_format"),
                      None if eval_columns is None else EvalColumnMap.parse(eval_columns)[0])
        beta = _best_member_beta(Path(run_dir)) or float(config.get("beta", _DEFAULTS.beta))
        return RunRecord(split, int(config["max_length"]), beta)
    except FileNotFoundError:
        raise UserError(f"{run_dir} has no run.json: cannot tell which split it was trained against") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a readable run record ({type(exc).__name__}: {exc})") from None


def _best_member_beta(run_dir: Path) -> float | None:
    """The beta the adapter of a population run (``population.json`` beside ``run.json``) was last trained
    with: its best member's in the last generation, which mutations move away from the recorded ``--beta``;
    None for a run without a population or a beta there."""
    path = run_dir / "population.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    member = next((m for m in record["generations"][-1]["members"] if m["member"] == record["best"]), {})
    return float(member["beta"]) if "beta" in member else None


def row_keys(dataset) -> set[str]:
    """The preference rows of ``dataset`` as comparable keys (to find rows two splits share)."""
    return {row_key(r) for r in dataset}


def choose_split(records: dict[str, RunRecord], dataset: str | None = None, seed: int | None = None,
                 test_size: float | None = None, eval_dataset: str | None = None) -> Split:
    """The one held-out split every configuration is scored on.

    Without ``dataset``/``seed``/``test_size``/``eval_dataset``: the split all runs were trained
    against (a mix is a UserError); with any of them: that split (the rest from the runs, or the
    defaults; ``eval_dataset``: that dataset's rows are held out), checked to share no row with any
    run's training split.
    """
    own = list(records.values())
    if dataset is None and seed is None and test_size is None and eval_dataset is None:
        split = own[0].split if own else Split(_DEFAULTS.dataset, _DEFAULTS.seed, _DEFAULTS.test_size)
        differ = [f"{name} ({r.split})" for name, r in records.items() if not r.split.same_as(split)]
        if differ:
            first = next(iter(records))
            raise UserError(f"the runs were trained against different held-out splits: {first} ({split}) vs "
                            f"{', '.join(differ)}; pass --dataset/--seed/--test-size (or --eval-dataset) to score all on one "
                            "split")
        return split

    def common(field: str, default):
        values = {getattr(r.split, field) for r in own}
        return values.pop() if len(values) == 1 else default

    held_out_from = eval_dataset if eval_dataset is not None else (common("eval_dataset", None) if test_size is None
                                                                   else None)
    # The runs' description of their eval dataset's shape and columns holds for that same dataset only.
    same_eval = held_out_from is not None and {r.split.eval_dataset for r in own} == {held_out_from}
    split = Split(dataset if dataset is not None else common("dataset", _DEFAULTS.dataset),
                  seed if seed is not None else common("seed", _DEFAULTS.seed),
                  test_size if test_size is not None else common("test_size", _DEFAULTS.test_size),
                  eval_dataset=held_out_from,
                  eval_format=common("eval_format", None) if same_eval else None,
                  eval_column_map=common("eval_column_map", None) if same_eval else None)
    held_out = row_keys(split.load()[1])
    for name, record in records.items():
        shared = len(held_out & row_keys(record.split.load()[0]))
        if shared:
            raise UserError(f"the held-out split ({split}) shares {shared} row(s) with the training split of "
                            f"{name} ({record.split}); choose a split that {name} did not train on")
    return split


class Evaluator:
    """Loads the base model and one held-out split once, then scores configurations on it.

    The reference of every configuration is the base model, so its log-probs are computed once
    and shared by all configurations. Held-out log-probs are also kept on disk, in the store of the
    base or of a configuration's adapter (``alignkit.reference.reference_store``, the one DPO's
    reference cache uses): a pair scored before under the same base, adapter weights and layout
    (by a comparison, by the final eval of a DPO run, or as the reference of a DPO run warm-started
    from that adapter) is looked up instead of run again.
    """

    CACHE_BUDGET = 1 << 30
    """Bytes the key/value cache of the answering batch may take (it is preallocated for every row):
    1 GiB holds 85-90 rows of the embedded model answering 200 tokens; the demo's other answers join
    the batch as its rows end (one batch of all 135 rows would raise the demo's peak memory by 1.3 GB)."""

    def __init__(self, model_name: str = DEFAULT_MODEL, split: Split | None = None, device=None, dtype=None):
        self.split = split or Split(_DEFAULTS.dataset, _DEFAULTS.seed, _DEFAULTS.test_size)
        self.tokenizer = load_tokenizer(model_name)
        self.base = load_model(model_name, device=device, dtype=dtype)
        self.model_name = model_name
        # where the base's own held-out log-probs are kept: the reference of every configuration
        self.base_store = reference_store(self.base, model_name, None, packed=True, share_prompts=True)
        self.test = self.split.load()[1]
        self.reference_cache: dict[int, tuple[float, float]] = {}
        self._gyms: dict[int, PreferenceGym] = {}

    def _batches(self, max_length: int):
        if max_length not in self._gyms:
            # Only the held-out split is scored; it stands in as the (unused) training split too.
            if not len(self.test):
                raise UserError(f"the held-out split ({self.split}) has no rows to score")
            try:
                self._gyms[max_length] = PreferenceGym(self.test, self.test, self.tokenizer,
                                                       data_batch_size_per_gpu=8, max_context_length=max_length,
                                                       seed=self.split.seed)
            except ArgumentError:
                raise
            except UserError:   # the gym words it for training rows
                raise UserError(f"the held-out split ({self.split}) has no row whose prompt fits the runs' max "
                                f"length ({max_length} tokens)") from None
        return self._gyms[max_length].test_batches(8)

    def held_out_prompts(self, limit: int | None = None) -> list:
        """The prompts of the held-out split (text or message lists), the first ``limit`` when given."""
        prompts = [row["prompt"] for row in self.test]
        return prompts if limit is None else prompts[:limit]

    def _replies(self, model, prompts: list, held_out: list, decoding: Decoding,
                 adapters: list[str] | None = None) -> list[tuple[list[str], list]]:
        """Per configuration (one, or one per name of ``adapters``, all answering in shared batches):
        its showcase answers and, per held-out prompt, its ``Answer`` samples."""
        every = list(prompts) + list(held_out)
        configs = adapters or [None]
        rows = every * len(configs)
        names = [name for name in configs for _ in every] if adapters else None
        # each configuration's prompt i samples from the generator it has when answering alone
        keys = list(range(len(every))) * len(configs)
        samples = []
        for k in range(decoding.samples):
            replies = generate_replies(model, self.tokenizer, rows, decoding.max_new_tokens,
                                       batch_size=max(len(rows), 1), sampling=decoding.sampling(k),
                                       adapters=names, cache_budget=self.CACHE_BUDGET, keys=keys)
            samples.append([replies[c * len(every):(c + 1) * len(every)] for c in range(len(configs))])
        out = []
        for c in range(len(configs)):
            showcase = [reply.text for reply in samples[0][c][: len(prompts)]]
            out.append((showcase, [[sample[c][len(prompts) + i] for sample in samples] for i in range(len(held_out))]))
        return out

    def _held_out_metrics(self, model, run_dir: str | None, max_length: int, beta: float) -> dict:
        # The reference is the base (adapter disabled); an untrained LoRA is the base itself.
        reference = ReferencePolicy(model, cache=self.reference_cache, store=self.base_store)
        store = reference_store(model, self.model_name, str(Path(run_dir) / "actor"), packed=True,
                                share_prompts=True) if run_dir else None
        known = store.load() if store else self.reference_cache
        before = set(known)
        held_out = score_preferences(model, self._batches(max_length), reference,
                                     PreferenceObjective(beta=beta, nll_alpha=1.0), known=known)
        try:
            reference.save()
            if store:
                store.save({key: value for key, value in known.items() if key not in before})
        except OSError as exc:
            logger.warning("could not cache held-out log-probs: %s", exc.strerror or exc)
        return {
            # The base is its own reference: every reward is 0 and "accuracy" says nothing.
            "preference_accuracy": held_out["rewards/accuracies"] if run_dir else None,
            "reward_chosen": held_out["rewards/chosen"],
            "reward_rejected": held_out["rewards/rejected"],
            "sft_loss": held_out["nll_loss"],  # mean NLL per chosen-response token = SFT loss on chosen
        }

    def score(self, run_dir: str | None, prompts: list[str], decoding: Decoding | None = None,
              max_length: int = _DEFAULTS.max_length, beta: float = _DEFAULTS.beta) -> dict:
        """Answers to ``prompts`` and held-out metrics of the adapter in ``run_dir`` (None = base).

        Also answers the held-out prompts (``decoding.eval_prompts`` of them) and returns those answers
        under ``"held_out_answers"``: per prompt a list of ``decoding.samples`` :class:`Answer` s.
        """
        return self.score_all([(run_dir, max_length, beta)], prompts, decoding)[0]

    def score_all(self, configs: list[tuple[str | None, int, float]], prompts: list[str],
                  decoding: Decoding | None = None, progress=None, labels: list[str] | None = None) -> list[dict]:
        """:meth:`score` for each ``(run_dir, max_length, beta)`` of ``configs``, in their order.

        Answers of several configurations come from one decoding pass: every adapter is loaded on
        the base at once and each row runs its own. The answers are those each adapter gives alone,
        sampled ones too (each prompt draws from its own seeded generator), up to float rounding:
        other batch sizes round the logits differently, which changes a token only where two are
        (near) tied for greedy, or where a draw falls on the boundary between two (measured: 1 of 117
        sampled answers of the demo's configurations). Adapters that cannot share a batch answer one
        configuration at a time. ``progress(message)`` hears of each step, which names configuration
        ``i`` by ``labels[i]`` when given.
        """
        decoding = decoding or Decoding()
        say = progress or (lambda message: None)
        held_out_prompts = self.held_out_prompts(decoding.eval_prompts)
        together = (len(configs) > 1
                    # read before anything is loaded: adapters of other PEFT types cannot even load beside LoRA
                    and all(plain_lora_config(read_adapter_config(Path(run_dir) / "actor"))
                            for run_dir, _, _ in configs if run_dir))
        metrics, answers = [], {}
        for i, (run_dir, max_length, beta) in enumerate(configs):
            label = f"{labels[i]} " if labels else ""
            say(f"evaluating {label}({run_dir or 'untrained LoRA'})")
            model = self._with_adapter(run_dir)
            try:
                metrics.append(self._held_out_metrics(model, run_dir, max_length, beta))
                if not together:
                    answers[i] = self._replies(model, prompts, held_out_prompts, decoding)[0]
            finally:
                self.base = _unload(model)  # drop the adapter: the next configuration starts clean
        if len(answers) < len(configs):
            # The scoring's freed activations go back to the kernel first: the decoding's key/value cache
            # rarely fits in their holes, so resident memory would stack the two stages.
            release_freed_memory()
            answers = self._replies_together(configs, prompts, held_out_prompts, decoding, say)
        results = []
        for i, scores in enumerate(metrics):
            showcase, held_out_answers = answers[i]
            results.append({"answers": showcase, "held_out_answers": held_out_answers, "metrics": {
                **scores,
                "mean_answer_words": sum(len(a.split()) for a in showcase) / max(len(showcase), 1),
                "repetition": sum(repetition_score(a) for a in showcase) / max(len(showcase), 1)}})
        return results

    def _with_adapter(self, run_dir, model=None, name: str = "default"):
        """The base with the adapter of ``run_dir`` (None: an untrained LoRA) as ``name``, on ``model``
        when given (a PEFT model on the base)."""
        if run_dir:
            return load_adapter(self.base, Path(run_dir) / "actor", adapter_name=name, is_trainable=False,
                                model=model)
        return add_lora(model if model is not None else self.base, adapter_name=name)

    def _replies_together(self, configs, prompts, held_out_prompts, decoding, say) -> dict:
        """The answers of every configuration, from one model holding all their adapters."""
        names = [f"config{i}" if run_dir else BASE for i, (run_dir, _, _) in enumerate(configs)]
        model = None
        try:
            for name, (run_dir, _, _) in zip(names, configs, strict=True):
                if run_dir:
                    model = self._with_adapter(run_dir, model, name)
            if model is None:   # only untrained bases: one pass answers for all of them
                model = self._with_adapter(None)
                names = ["default"] * len(configs)
            model.eval()
            together = mixable_adapters(model, names)
            rows = (len(prompts) + len(held_out_prompts)) * len(configs)
            say(f"answering {len(prompts) + len(held_out_prompts)} prompts x {len(configs)} configurations"
                + (f" in shared batches ({rows} rows)" if together else " one configuration at a time"))
            if together:
                return dict(enumerate(self._replies(model, prompts, held_out_prompts, decoding, names)))
            answers = {}
            for i, name in enumerate(names):
                if name == BASE:
                    with model.disable_adapter():
                        answers[i] = self._replies(model, prompts, held_out_prompts, decoding)[0]
                else:
                    model.set_adapter(name)
                    answers[i] = self._replies(model, prompts, held_out_prompts, decoding)[0]
            return answers
        finally:
            if model is not None:
                self.base = _unload(model)


def _unload(model):
    """The base model under PEFT ``model``, every adapter removed and every module as it was: PEFT's
    ``unload()`` would leave an adapter's trained copy of a ``modules_to_save`` module in the base."""
    from peft.utils.other import ModulesToSaveWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.original_module)
    return model.unload()


@dataclass(frozen=True)
class Decoding:
    """How the comparison generates answers.

    Greedy by default (as in the seed's comparison; ``repetition_penalty`` > 1 applies to greedy and
    sampled answers alike); with ``temperature`` > 0 answers are sampled,
    ``samples`` per held-out prompt, sample ``k`` seeded with ``seed + k`` (so reruns match).
    ``eval_prompts`` caps how many held-out prompts are answered (``None``: all of them; 0: none).
    """

    max_new_tokens: int = 200
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    samples: int = 1
    seed: int = 0
    eval_prompts: int | None = None

    def __post_init__(self):
        problems = sampling_problems(self.temperature, self.top_p, self.repetition_penalty)
        if self.samples < 1:
            problems.append(f"--samples must be >= 1 (got {self.samples})")
        elif self.samples > 1 and self.temperature == 0:
            problems.append("--samples > 1 needs --temperature > 0: greedy answers are all the same")
        if self.eval_prompts is not None and self.eval_prompts < 0:
            problems.append(f"--eval-prompts must be >= 0 (got {self.eval_prompts})")
        if problems:
            raise UserError("invalid options: " + "; ".join(problems))

    def sampling(self, k: int = 0) -> Sampling:
        """The sampling of the ``k``-th answer to each prompt."""
        return Sampling(self.temperature, self.top_p, self.repetition_penalty, self.seed + k)

    def settings(self) -> dict:
        """The decoding settings as the report prints them."""
        penalty = {"repetition_penalty": self.repetition_penalty} if self.repetition_penalty != 1 else {}
        if self.temperature == 0:
            return {"do_sample": False, **penalty, "max_new_tokens": self.max_new_tokens}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, **penalty,
                "samples_per_held_out_prompt": self.samples, "seed": self.seed,
                "max_new_tokens": self.max_new_tokens}


def compare(runs: dict[str, str | None], out_dir, prompts: list[str] | None = None, model: str | None = None,
            max_new_tokens: int = 200, dataset: str | None = None, seed: int | None = None,
            test_size: float | None = None, progress=print, decoding: Decoding | None = None,
            eval_dataset: str | None = None) -> Path:
    """Score every configuration in ``runs`` (label key -> run folder or None) and write the report.

    The held-out split comes from the runs' records, or from ``dataset``/``seed``/``test_size`` (or
    ``eval_dataset``) when given (see :func:`choose_split`). Besides the showcase ``prompts`` every configuration answers the
    held-out prompts (see :class:`Decoding`); their answer quality, with bootstrap intervals and paired
    differences from the base (when ``runs`` has ``"base"``), goes into the report. Returns the path of
    ``out_dir/index.html``; ``out_dir/results.json`` holds the same numbers and, per configuration,
    the split it was scored on.
    """
    decoding = decoding or Decoding(max_new_tokens=max_new_tokens)
    prompts = prompts or DEFAULT_PROMPTS
    base_model = check_same_base(runs, model)
    records = {key: read_run_record(d) for key, d in runs.items() if d}
    split = choose_split(records, dataset, seed, test_size, eval_dataset)
    evaluator = Evaluator(base_model, split)
    check_prompts_fit(prompts, evaluator.tokenizer, getattr(evaluator.base.config, "max_position_embeddings", None),
                      decoding.max_new_tokens)
    scored_on = {**asdict(split), "column_map": split.column_map.given(),
                 "eval_column_map": split.eval_column_map.given() if split.eval_column_map else None,
                 "pairs": len(evaluator.test)}
    lengths = {r.max_length for r in records.values()}
    base_length = lengths.pop() if len(lengths) == 1 else _DEFAULTS.max_length  # for the untrained base
    settings = [(run_dir, records[key].max_length if key in records else base_length,
                 records[key].beta if key in records else _DEFAULTS.beta) for key, run_dir in runs.items()]
    with torch.no_grad():
        scores = evaluator.score_all(settings, prompts, decoding, progress=progress,
                                     labels=[LABELS.get(key, key) for key in runs])
    configs = [{"name": LABELS.get(key, key), "run_dir": str(run_dir) if run_dir else None, "split": scored_on,
                **scored} for (key, run_dir), scored in zip(runs.items(), scores, strict=True)]
    held_out = {c["name"]: c.pop("held_out_answers") for c in configs}
    base = held_out.get(LABELS["base"])
    n_held_out = len(next(iter(held_out.values()), []))
    if n_held_out:
        for config in configs:
            own = held_out[config["name"]]
            config["quality"] = answer_quality(own, None if own is base else base, seed=decoding.seed)
            config["held_out"] = [[{"text": a.text, "ended": a.ended} for a in samples] for samples in own]
    out_dir = Path(out_dir)
    run_dirs = [d for d in runs.values() if d]
    figures = plot_runs(run_dirs, out_dir=out_dir / "figures") if run_dirs else []
    return write_report(out_dir, prompts, configs, figures=figures, generation=decoding.settings(),
                        quality_prompts=n_held_out or None)

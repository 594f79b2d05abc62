"""Train several configurations in order and compare them in one report.

``alignkit pipeline`` runs SFT -> DPO+NLL (warm-started from the SFT adapter) and compares the base
model, SFT and SFT -> DPO+NLL. ``benchmarking/evaluate_models.py`` uses the same functions for the
five-way comparison (base, SFT, DPO, DPO+NLL, SFT -> DPO+NLL).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from . import checkpoints
from .cliutil import non_negative_int, positive_int
from .compare import (
    DEFAULT_PROMPTS,
    LABELS,
    Decoding,
    check_prompts_fit,
    check_same_base,
    compare,
    model_context,
    prompt_lines,
)
from .config import (
    EVAL_DATASET_OR_TEST_SIZE,
    RESUME_MAY_CHANGE,
    SFTConfig,
    absolute_paths,
    build_config,
    flag,
)
from .data import BUNDLED_DATASET
from .errors import RunInterrupted, UserError
from .io import unwritable
from .models import load_tokenizer
from .report import check_report_folder
from .runs import RUN_RECORD, read_run_info, resumed_config
from .runtime import release_freed_memory

SFT_LR, SFT_STEPS = 1e-3, 40
DPO_BETA, DPO_LR, DPO_STEPS = 0.1, 2e-5, 20

# How each trainable configuration is made: algorithm, options, and the run it warm-starts from.
# SFT and SFT -> DPO+NLL use the recipe benchmarking/sweep_recipe.py chose on the embedded model and
# data (benchmarking/RESULTS_quality.md); DPO and DPO+NLL from the base keep the training defaults.
# Every stage splits its batch of 8 into micro-batches, the same gradients (up to float rounding) at
# less peak memory: SFT into 2 x 4 rows (whole batches: 10% faster, peak 3.5 GB instead of 2.6), DPO
# into 4 x 2 pairs (the SFT -> DPO+NLL stage alone: 2.2 GB and 99 s, vs 3.1-3.5 GB and 93 s as 2 x 4).
RECIPES = {
    "sft": ("sft", {"lr": SFT_LR, "max_steps": SFT_STEPS, "micro_batch_size": 4}, None),
    "dpo": ("dpo", {"nll_alpha": 0.0, "max_steps": 20, "micro_batch_size": 2}, None),
    "dpo_nll": ("dpo", {"nll_alpha": 1.0, "max_steps": 20, "micro_batch_size": 2}, None),
    "sft_dpo_nll": ("dpo", {"nll_alpha": 1.0, "beta": DPO_BETA, "lr": DPO_LR, "max_steps": DPO_STEPS,
                            "micro_batch_size": 2}, "sft"),
}
PIPELINE_CONFIGS = ("base", "sft", "sft_dpo_nll")
ALL_CONFIGS = tuple(LABELS)


def _check_same_recipe(folder: Path, wanted) -> None:
    """Refuse to keep (``--reuse``) the run in ``folder`` when it was trained with other options than ``wanted``
    (a config): its numbers would be reported as this pipeline's."""
    recorded = read_run_info(folder)["config"]
    # what may differ: how a run writes and how fast, never its length (unlike a resume's --max-steps)
    free = (RESUME_MAY_CHANGE - {"max_steps", "epochs"}) | {"save_path", "no_timestamp", "overwrite", "resume", "config"}
    differ = [f"--{flag(k)} {v} (recorded: {recorded.get(k)})" for k, v in absolute_paths(wanted.to_dict()).items()
              if k not in free and k in recorded and absolute_paths({k: recorded[k]})[k] != v]
    if differ:
        raise UserError(f"--reuse would keep {folder}, trained with other options than asked for now: "
                        f"{', '.join(differ)}; pass --overwrite to train it again, or ask for what it was trained with")


def _check_same_data(folder: Path, wanted) -> None:
    """Refuse to keep (``--reuse``) the finished run in ``folder`` when the data its recipe ``wanted`` reads
    is not what the run was trained on (a data file edited in between): its numbers would be reported as
    this data's. (An unfinished run is checked the same way when it resumes.)"""
    from .train import data_fingerprint

    record = read_run_info(folder)
    if record.get("data_fingerprint") is None:
        return
    now, train_rows, test_rows = data_fingerprint(wanted)
    if now != record["data_fingerprint"]:
        raise UserError(f"--reuse would keep {folder}, trained on other data than its dataset holds now "
                        f"({record.get('train_rows')} train / {record.get('test_rows')} test rows then, {train_rows} / "
                        f"{test_rows} now, as tokenized); pass --overwrite to train it again")


def check_run_folders(out_dir: Path, names, held_ok: bool = False) -> None:
    """Refuse (naming ``--out``, the pipeline's option) a run folder under ``out_dir`` that cannot be written,
    holds files of the user's own, or (unless ``held_ok``: --reuse or --overwrite) holds a run: the training
    run would refuse it only once the stages before it had trained."""
    trained = dict.fromkeys(n for name in names if name != "base" for n in reversed(_with_parents(name)))
    for name in trained:
        folder = out_dir / name
        problem = unwritable(folder, folder=True)
        if problem:
            raise UserError(f"the run folder {folder} (under --out) cannot be written: {problem}")
        if folder.is_dir() and any(folder.iterdir()) and not (folder / RUN_RECORD).is_file():
            raise UserError(f"{folder} (under --out) holds files that are not an alignkit run (no {RUN_RECORD}); "
                            "empty it or give another --out")
        if folder.is_dir() and any(folder.iterdir()) and not held_ok:
            raise UserError(f"{folder} already holds a run; pass --reuse to keep finished configurations (and "
                            "resume interrupted ones) or --overwrite to train them again")


def train_configurations(names, out_dir, max_steps: int | None = None, model: str | None = None,
                         dataset: str | None = None, reuse: bool = False, seed: int | None = None,
                         test_size: float | None = None, overwrite: bool = False,
                         timings: dict[str, float] | None = None,
                         peaks: dict[str, float] | None = None, eval_dataset: str | None = None) -> dict[str, str | None]:
    """Train each configuration in ``names`` into ``out_dir/<name>``; returns name -> run folder.

    Each takes its recipe's options (:data:`RECIPES`); ``max_steps``, when not None, replaces every
    recipe's step count (0: one epoch each).

    ``base`` needs no training (None). A warm-started configuration trains its parent first.
    A folder that already holds a run is refused unless ``reuse`` (a finished run is kept, an
    interrupted one resumed) or ``overwrite`` (trained again from scratch).
    ``dataset``, ``seed`` and ``test_size`` (or ``eval_dataset``) default to the training defaults. ``timings``, when
    given, receives the seconds each trained configuration took, by label; ``peaks``, the process's peak
    resident memory (GB) once each had trained.
    """
    split = {k: v for k, v in (("dataset", dataset), ("seed", seed), ("test_size", test_size),
                               ("eval_dataset", eval_dataset)) if v is not None}
    from .train import run

    out_dir = Path(out_dir)
    runs: dict[str, str | None] = {}
    check_run_folders(out_dir, names, reuse or overwrite)   # every stage's folder, before the first one trains

    def ensure(name):
        if name in runs:
            return runs[name]
        if name == "base":
            runs[name] = None
            return None
        algo, options, parent = RECIPES[name]
        folder = out_dir / name
        held = folder.is_dir() and any(folder.iterdir())
        extra = {"load_path": str(Path(ensure(parent)) / "actor")} if parent else {}
        steps = {} if max_steps is None else {"max_steps": max_steps}
        wanted = {"save_path": str(folder), "no_timestamp": True, "model": model, **split, **options, **steps, **extra}
        kept = reuse and ((folder / checkpoints.STATE_FILE).exists() or checkpoints.numbered(folder))
        if kept:
            _check_same_recipe(folder, build_config(algo, {**wanted, "overwrite": True}))
        if reuse and (folder / checkpoints.STATE_FILE).exists():
            _check_same_data(folder, build_config(algo, {**wanted, "overwrite": True}))
            runs[name] = str(folder)
            return runs[name]
        if kept:
            cfg = resumed_config(algo, {"resume": str(folder)})
        else:
            cfg = build_config(algo, {**wanted, "overwrite": held})
        started = time.time()
        print(f"== training {LABELS[name]} -> {folder}")
        try:
            run(cfg)
        except RunInterrupted as exc:   # resumed by this pipeline's command, which also trains what follows
            raise exc.resumed_by("the same alignkit pipeline command with --reuse", f"{LABELS[name]}: ") from None
        release_freed_memory()   # the next stage starts from what is still in use, not from this one's peak
        seconds = time.time() - started
        print(f"== {LABELS[name]} trained in {seconds:.0f} s")
        if timings is not None:
            timings[LABELS[name]] = seconds
        if peaks is not None:
            peaks[LABELS[name]] = peak_memory_gb()
        runs[name] = str(folder)
        return runs[name]

    for name in names:
        ensure(name)
    return {name: runs[name] for name in names}


def train_and_compare(names, out_dir, max_steps=None, prompts_file=None, max_new_tokens=200, model=None,
                      dataset=None, given: dict[str, str] | None = None, reuse=False, seed=None,
                      test_size=None, overwrite=False, decoding: Decoding | None = None,
                      eval_dataset: str | None = None) -> Path:
    """Train what ``given`` does not provide, then write the comparison report into ``out_dir/report``.

    ``dataset``/``seed``/``test_size`` (or ``eval_dataset``), when given, are used for training and to
    score every configuration on that one split; otherwise each run's record decides (see ``compare.choose_split``).
    """
    unknown = [n for n in names if n not in LABELS]
    if unknown:
        raise UserError(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(LABELS)}")
    if reuse and overwrite:
        raise UserError("--reuse keeps trained configurations and --overwrite trains them again: pass one of them")
    numbered = prompt_lines(prompts_file) if prompts_file else []
    prompts = [prompt for _, prompt in numbered] or None
    decoding = decoding or Decoding(max_new_tokens=max_new_tokens)   # checked before any training
    given = dict(given or {})
    for name, folder in given.items():
        if not (Path(folder) / "actor" / "adapter_config.json").exists():
            raise UserError(f"--{name.replace('_', '-')} {folder}: not a run folder (no actor/adapter_config.json)")
    to_train = [n for n in names if n not in given]
    if eval_dataset is not None and test_size is not None:
        raise UserError(EVAL_DATASET_OR_TEST_SIZE)
    # Each prompt and its answer must fit the base's context: checked on its tokenizer and config, not its weights.
    base = check_same_base(given, model)
    context = model_context(base)   # first: it converts a GGUF model, which the tokenizer then loads from
    check_prompts_fit(prompts or DEFAULT_PROMPTS, load_tokenizer(base), context, decoding.max_new_tokens,
                      lines=[number for number, _ in numbered], path=prompts_file)
    check_data(to_train, dataset, seed, test_size, eval_dataset)
    check_report_folder(Path(out_dir) / "report")   # before hours of training, not after
    started, timings, peaks = time.time(), {}, {}
    runs = train_configurations(to_train, Path(out_dir) / "runs", max_steps, model, dataset, reuse, seed,
                                test_size, overwrite, timings=timings, peaks=peaks,
                                eval_dataset=eval_dataset) if to_train else {}
    runs = {n: given.get(n, runs.get(n)) for n in names}
    compared = time.time()
    report = compare(runs, Path(out_dir) / "report", prompts=prompts, model=model, dataset=dataset, seed=seed,
                     test_size=test_size, max_new_tokens=max_new_tokens, decoding=decoding,
                     eval_dataset=eval_dataset)
    timings["comparison (scoring, generation, report)"] = time.time() - compared
    peaks["comparison"] = peak_memory_gb()
    print(f"report: {report}")
    print(f"numbers: {report.parent / 'results.json'}")
    print(timing_summary(timings, time.time() - started, peaks))
    return report


def check_data(names, dataset: str | None, seed: int | None, test_size: float | None,
               eval_dataset: str | None = None) -> None:
    """Refuse, before any stage trains, a dataset that one of the stages to train cannot read (e.g. SFT
    data for the DPO stage, found only after SFT has trained otherwise), and an ``eval_dataset`` that
    shares rows with the training data (the comparison refuses to score on it)."""
    if dataset is None and eval_dataset is None:
        return
    from .config import as_test_split
    from .data import make_dataset

    defaults = build_config("sft", {})
    tasks = {"preference" if RECIPES[n][0] == "dpo" else "sft" for name in names if name != "base"
             for n in _with_parents(name)}
    if eval_dataset is not None and not tasks:
        tasks = {"preference"}   # as the comparison reads it
    quiet = logging.getLogger("alignkit.data")
    level = quiet.level
    quiet.setLevel(logging.ERROR)   # each stage says the data's warnings (dropped rows...) when it reads it
    try:
        for task in sorted(tasks):
            make_dataset(dataset or defaults.dataset,
                         test_size=as_test_split(test_size if test_size is not None else defaults.test_size),
                         seed=seed if seed is not None else defaults.seed, task=task, eval_dataset=eval_dataset,
                         refuse_shared="the comparison scores only on rows no configuration trained on")
    finally:
        quiet.setLevel(level)


def _with_parents(name: str) -> list[str]:
    """``name`` and the configurations it warm-starts from."""
    chain = []
    while name:
        chain.append(name)
        name = RECIPES[name][2]
    return chain


def peak_memory_gb() -> float:
    """This process's peak resident memory so far, in GB (a high-water mark: it never falls)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # kB on Linux, bytes on macOS
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


def timing_summary(timings: dict[str, float], total: float, peaks: dict[str, float] | None = None) -> str:
    """One line: seconds per stage and the total, e.g. ``time: SFT 86 s, ... total 5m49s``, then, when
    ``peaks`` is given, the peak resident memory reached by the end of each stage."""
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    minutes, seconds = divmod(round(total), 60)
    line = f"time: {stages + ', ' if stages else ''}total {minutes}m{seconds:02d}s"
    if peaks:
        line += "; peak memory by the end of " + ", ".join(f"{name} {gb:.1f} GB" for name, gb in peaks.items())
    return line


def add_comparison_arguments(parser: argparse.ArgumentParser, default_out: str, from_base: bool = False) -> None:
    """Flags shared by ``alignkit pipeline`` and ``benchmarking/evaluate_models.py`` (``from_base``: the
    latter, which also trains DPO and DPO+NLL from the base model)."""
    parser.add_argument("--out", default=default_out, help=f"output folder [default: {default_out}]")
    more = f", DPO and DPO+NLL from the base {RECIPES['dpo'][1]['max_steps']} steps" if from_base else ""
    parser.add_argument("--max-steps", type=non_negative_int, default=None,
                        help=f"optimizer steps of every training stage; 0 = one epoch each [default: each "
                        f"stage's recipe: SFT {SFT_STEPS} steps at lr {SFT_LR:g}, SFT -> DPO+NLL {DPO_STEPS} steps "
                        f"at lr {DPO_LR:g} and beta {DPO_BETA:g}{more}]")
    parser.add_argument("--prompts", default=None, help="text file of prompts, one per line "
                        "[default: the seed's four prompts and two more]")
    parser.add_argument("--max-new-tokens", type=positive_int, default=200, help="answer length cap [default: 200]")
    parser.add_argument("--model", default=None, help="base model [default: the embedded SmolLM2-135M-Instruct]")
    parser.add_argument("--dataset", default=None,
                        help=f"dataset to train on and score every configuration against (with --seed and "
                        f"--test-size: the held-out split) [default: {BUNDLED_DATASET} for training; the split "
                        "each run records for scoring]")
    parser.add_argument("--seed", type=int, default=None, help=f"seed of the split (and of training) [default: "
                        f"{SFTConfig.seed} for training; the split each run records for scoring]")
    parser.add_argument("--test-size", type=float, default=None,
                        help=f"held-out share (0 < x < 1) or row count (>= 1) of the split [default: "
                        f"{SFTConfig.test_size:g} for training; the split each run records for scoring]")
    parser.add_argument("--eval-dataset", default=None,
                        help="held-out rows from this dataset (a file or hub id, e.g. org/name:test) instead of a "
                        "--test-size share of --dataset, for training and scoring")
    parser.add_argument("--eval-prompts", type=non_negative_int, default=None,
                        help="answer only the first N held-out prompts for the answer-quality table (0: none) "
                        "[default: all of them]")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sample answers at this temperature; 0 = greedy, as in the seed [default: 0]")
    parser.add_argument("--top-p", type=float, default=1.0, help="with --temperature > 0: nucleus sampling mass")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="> 1 makes tokens already in the answer less likely; 1 = off [default: 1]")
    parser.add_argument("--samples", type=positive_int, default=1,
                        help="with --temperature > 0: answers sampled per held-out prompt [default: 1]")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of sampled answers (sample k uses "
                        "seed + k) and of the bootstrap intervals [default: 0]")
    parser.add_argument("--reuse", action="store_true", help="keep configurations already trained in --out "
                        "and resume interrupted ones")
    parser.add_argument("--overwrite", action="store_true", help="train configurations whose folders in --out "
                        "already hold a run again, replacing them")


def add_pipeline_parser(sub) -> None:
    p = sub.add_parser("pipeline", help="SFT -> DPO+NLL -> comparison report, in one go",
                       description="Train SFT, then DPO+NLL warm-started from it, then compare the base model, "
                       "SFT and SFT -> DPO+NLL in one HTML report (answers, numbers, training curves).")
    add_comparison_arguments(p, "outputs/pipeline")
    p.set_defaults(handler=pipeline)


def decoding_from(flags) -> Decoding:
    """The comparison's decoding settings from parsed flags (a dict or an argparse namespace)."""
    get = flags.get if isinstance(flags, dict) else lambda key: getattr(flags, key)
    return Decoding(max_new_tokens=get("max_new_tokens"), temperature=get("temperature"), top_p=get("top_p"),
                    repetition_penalty=get("repetition_penalty"), samples=get("samples"), seed=get("sample_seed"),
                    eval_prompts=get("eval_prompts"))


def pipeline(flags: dict) -> int:
    """``alignkit pipeline``."""
    train_and_compare(PIPELINE_CONFIGS, flags["out"], flags["max_steps"], flags["prompts"], flags["max_new_tokens"],
                      flags["model"], flags["dataset"], reuse=flags["reuse"], seed=flags["seed"],
                      test_size=flags["test_size"], overwrite=flags["overwrite"], decoding=decoding_from(flags),
                      eval_dataset=flags["eval_dataset"])
    return 0

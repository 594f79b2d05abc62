"""Choose the pipeline's recipe by measurement: a small sweep on the embedded model and data.

Stage 1 trains SFT at every learning rate x step count; stage 2 trains DPO+NLL warm-started from
the SFT point stage 1 chose, at every beta x learning rate. Every point (and the base model) is
scored on the held-out split: preference accuracy against the base, held-out NLL of the chosen
answers (the SFT loss on them), and the quality of greedy answers to every held-out prompt
(looping share, share ending on their own, repetition, length, distinct-2) with 95% bootstrap
intervals and paired differences from the base.

    python benchmarking/sweep_recipe.py --out outputs/sweep

The rules, fixed before the numbers are seen:

* goals against the base (point estimates): held-out NLL of chosen answers lower, looping share
  not higher, share of answers that end on their own not lower; for DPO+NLL also held-out
  preference accuracy >= 95%;
* SFT: of the points meeting the goals, the lowest held-out NLL; a point within 0.01 nats of it
  with fewer steps wins (cheaper for the same fit);
* DPO+NLL: of the points meeting the goals, the highest held-out accuracy, then the lowest NLL.
  When no point meets the goals the best by the same order is named and the table says so.

Writes ``sweep.md`` (the tables and the choice) and ``sweep.json`` (every number) into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alignkit.cliutil import ArgParser, guarded, output_folder, positive_int

NLL_TIE = 0.01   # nats per token: closer than this, the cheaper SFT point wins


def float_list(text: str) -> list[float]:
    """``"1e-4,2e-4"`` -> ``[0.0001, 0.0002]``; every value must be > 0."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers > 0, got {text!r}")
    return values


def int_list(text: str) -> list[int]:
    """``"20,40"`` -> ``[20, 40]``; every value must be >= 1."""
    values = float_list(text)
    if any(v != int(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected whole numbers, got {text!r}")
    return [int(v) for v in values]


def key_value(text: str) -> tuple[str, object]:
    """``"batch_size=4"`` -> ``("batch_size", 4)``: the value read as YAML reads it."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip().replace("-", "_"), yaml.safe_load(value)


def parse_args(argv=None):
    p = ArgParser(prog="sweep_recipe.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft-lrs", type=float_list, default=[1e-4, 2e-4, 5e-4], help="SFT learning rates "
                   "[default: 1e-4,2e-4,5e-4]")
    p.add_argument("--sft-steps", type=int_list, default=[20, 40], help="SFT step counts [default: 20,40]")
    p.add_argument("--dpo-betas", type=float_list, default=[0.1, 0.5], help="DPO+NLL betas [default: 0.1,0.5]")
    p.add_argument("--dpo-lrs", type=float_list, default=[2e-5, 5e-5, 1.5e-4],
                   help="DPO+NLL learning rates [default: 2e-5,5e-5,1.5e-4]")
    p.add_argument("--dpo-steps", type=positive_int, default=20, help="DPO+NLL steps [default: 20]")
    p.add_argument("--model", default=None, help="base model [default: the embedded one]")
    p.add_argument("--dataset", default=None, help="dataset [default: the bundled preference set]")
    p.add_argument("--option", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="a training option for every run, as in a YAML config (e.g. batch_size=4); repeatable")
    p.add_argument("--max-new-tokens", type=positive_int, default=200, help="answer length limit [default: 200]")
    p.add_argument("--eval-prompts", type=int, default=0, help="answer only the first N held-out prompts (0: all)")
    p.add_argument("--out", type=output_folder, default=Path("outputs/sweep"), help="output folder")
    p.add_argument("--reuse", action="store_true", help="keep finished runs in --out instead of training again")
    args = p.parse_args(argv)
    check_options(p, args.option)   # before --out is made or anything trains
    return args


# What the sweep sets for each point itself, and what does not apply to a point (one plain training run).
SWEPT = ("lr", "max_steps", "epochs", "beta", "nll_alpha", "load_path", "model", "dataset", "save_path",
         "no_timestamp", "overwrite", "plot")
NOT_A_POINT = ("pop_size", "resume", "config", "eval")


def check_options(parser, pairs) -> None:
    """Refuse an ``--option`` the sweep sets itself, one neither stage has, or a value of the wrong type."""
    import dataclasses

    from alignkit.config import DPOConfig, SFTConfig, _coerce, build_config
    from alignkit.errors import UserError

    names = {f.name for f in dataclasses.fields(DPOConfig)}
    for key, value in pairs:
        if key in NOT_A_POINT:
            parser.error(f"--option {key}: does not apply to a sweep point, which is one plain training run")
        if key in SWEPT:
            parser.error(f"--option {key}: the sweep sets it itself (its own flags choose lr, steps, beta, model "
                         "and dataset)")
        if key not in names:
            parser.error(f"--option {key}: no such training option")
        if key not in {f.name for f in dataclasses.fields(SFTConfig)}:
            parser.error(f"--option {key}: a DPO option; every --option applies to both the SFT and DPO+NLL runs")
        try:
            _coerce(SFTConfig, key, value, "--option")
            build_config("dpo", {key: value})
        except (UserError, TypeError, ValueError) as exc:
            parser.error(str(exc))


def train_point(args, folder: Path, algo: str, options: dict) -> None:
    """Train one point into ``folder`` (``--reuse`` keeps a finished run whose record holds the same
    options)."""
    from alignkit import checkpoints
    from alignkit.config import build_config
    from alignkit.runtime import release_freed_memory
    from alignkit.train import run

    extra = {**dict(args.option),
             **{k: v for k, v in (("model", args.model), ("dataset", args.dataset)) if v is not None}}
    wanted = {**extra, **options}
    if args.reuse and (folder / checkpoints.STATE_FILE).exists() and _recorded(folder, wanted):
        return
    cfg = build_config(algo, {"save_path": str(folder), "no_timestamp": True, "overwrite": True, "plot": False,
                              **wanted})
    run(cfg)
    release_freed_memory()   # the next point starts from what is in use, not from this one's peak


def run_seconds(folder: Path) -> float:
    """The seconds a run took by its own clock (the last ``time`` in its metrics.jsonl)."""
    from alignkit.plots import read_metrics

    return max(r.get("time", 0.0) for r in read_metrics(folder))


def _recorded(folder: Path, options: dict) -> bool:
    """Whether the run in ``folder`` was trained with ``options`` (as its run.json records them)."""
    from alignkit.runs import read_run_info

    config = read_run_info(folder)["config"]
    return all(config.get(k) == v for k, v in options.items())


def score(evaluator, decoding, folder: Path | None, beta: float, max_length: int, cache: Path) -> dict:
    """Held-out metrics and answers of one point (``None``: the base model).

    Scoring is deterministic, so it is kept in ``cache`` (JSON) and read back by a later sweep
    when the point, the decoding and the scoring settings are the same.
    """
    import json

    import torch

    from alignkit.quality import Answer

    key = {"folder": str(folder), "decoding": decoding.settings(), "eval_prompts": decoding.eval_prompts,
           "beta": beta, "max_length": max_length, "split": str(evaluator.split)}
    if folder is not None:
        key["adapter_mtime"] = (folder / "actor" / "adapter_model.safetensors").stat().st_mtime
    if cache.is_file():
        kept = json.loads(cache.read_text())
        if kept.get("key") == key:
            return {"metrics": kept["metrics"],
                    "answers": [[Answer(a["text"], a["ended"]) for a in samples] for samples in kept["answers"]]}
    with torch.no_grad():
        scored = evaluator.score(str(folder) if folder else None, [], decoding, max_length=max_length, beta=beta)
    result = {"metrics": scored["metrics"], "answers": scored["held_out_answers"]}
    from alignkit.io import atomic_write_json

    atomic_write_json(cache, {"key": key, "metrics": result["metrics"], "answers": _plain(result["answers"])})
    return result


def _plain(answers) -> list:
    return [[{"text": a.text, "ended": a.ended} for a in samples] for samples in answers]


def goals_met(point: dict, base: dict, accuracy: float | None) -> dict[str, bool]:
    """Which goals ``point`` meets against ``base`` (see the module's rules); ``accuracy`` None skips it."""
    q, b = point["quality"], base["quality"]
    met = {"NLL lower": point["metrics"]["sft_loss"] < base["metrics"]["sft_loss"],
           "looping not higher": q["looping_share"]["value"] <= b["looping_share"]["value"],
           "ending not lower": q["ended_share"]["value"] >= b["ended_share"]["value"]}
    if accuracy is not None:
        met[f"accuracy >= {accuracy:.0%}"] = (point["metrics"]["preference_accuracy"] or 0.0) >= accuracy
    return met


def choose_sft(points: list[dict]) -> dict:
    """The SFT point the rules pick: lowest NLL among those meeting the goals, fewer steps within NLL_TIE."""
    pool = [p for p in points if all(p["goals"].values())] or points
    best = min(p["metrics"]["sft_loss"] for p in pool)
    near = [p for p in pool if p["metrics"]["sft_loss"] <= best + NLL_TIE]
    return min(near, key=lambda p: (p["options"]["max_steps"], p["metrics"]["sft_loss"]))


def choose_dpo(points: list[dict]) -> dict:
    """The DPO+NLL point the rules pick: highest accuracy among those meeting the goals, then lowest NLL."""
    pool = [p for p in points if all(p["goals"].values())] or points
    return min(pool, key=lambda p: (-(p["metrics"]["preference_accuracy"] or 0.0), p["metrics"]["sft_loss"]))


def table(points: list[dict], base: dict, chosen: dict, n_prompts: int) -> str:
    """A markdown table of the points, the base first, the chosen point marked."""
    from alignkit.quality import format_measure
    from alignkit.report import QUALITY_COLUMNS

    head = ("| point | time (s) | held-out accuracy | rewards chosen / rejected | held-out NLL (chosen) | "
            + " | ".join(title for _, title, _ in QUALITY_COLUMNS) + " | goals met |")
    lines = [head, "|" + " --- |" * (6 + len(QUALITY_COLUMNS))]
    for p in [base] + points:
        acc = p["metrics"]["preference_accuracy"]
        seconds = p.get("seconds")
        cells = [p["name"] + (" **(chosen)**" if p is chosen else ""),
                 "-" if seconds is None else f"{seconds:.0f}",
                 "-" if acc is None else f"{acc:.1%}",
                 f"{p['metrics']['reward_chosen']:+.3f} / {p['metrics']['reward_rejected']:+.3f}",
                 f"{p['metrics']['sft_loss']:.3f}"]
        cells += [format_measure(p["quality"][key], fmt) for key, _, fmt in QUALITY_COLUMNS]
        goals = p.get("goals")
        cells.append("-" if goals is None else ("all" if all(goals.values())
                                                else "missed: " + ", ".join(k for k, v in goals.items() if not v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nRewards and accuracy against the base model on the held-out pairs; answers " \
        f"to {n_prompts} held-out prompts, greedy, 95% bootstrap intervals; * = the paired difference from the " \
        "base excludes 0.\n"


def sweep(args) -> dict:
    """Run both stages; returns everything ``sweep.json`` holds."""
    from alignkit.compare import Decoding, Evaluator, read_run_record
    from alignkit.config import DPOConfig
    from alignkit.quality import answer_quality

    decoding = Decoding(max_new_tokens=args.max_new_tokens, eval_prompts=args.eval_prompts or None)
    default_beta = DPOConfig().beta
    evaluator = None
    base = None

    def scored_point(name, folder, algo, options, beta):
        nonlocal evaluator, base
        train_point(args, folder, algo, options)
        if evaluator is None:   # the split the first run records: every point shares it
            record = read_run_record(folder)
            evaluator = Evaluator(args.model or _base_model(folder), record.split)
            base = {"name": "base model", **score(evaluator, decoding, None, default_beta, record.max_length,
                                                  args.out / "base_score.json")}
            base["quality"] = answer_quality(base["answers"])
        point = {"name": name, "folder": str(folder), "options": options, "seconds": run_seconds(folder),
                 **score(evaluator, decoding, folder, beta, read_run_record(folder).max_length,
                         folder / "sweep_score.json")}
        point["quality"] = answer_quality(point["answers"], base["answers"])
        point["goals"] = goals_met(point, base, 0.95 if algo == "dpo" else None)
        print(f"== {name}: NLL {point['metrics']['sft_loss']:.3f}, looping "
              f"{point['quality']['looping_share']['value']:.0%}, ended {point['quality']['ended_share']['value']:.0%}")
        return point

    sft_points = [scored_point(f"SFT lr {lr:g}, {steps} steps", args.out / f"sft_lr{lr:g}_steps{steps}", "sft",
                               {"lr": lr, "max_steps": steps}, default_beta)
                  for steps in args.sft_steps for lr in args.sft_lrs]
    sft = choose_sft(sft_points)
    start = str(Path(sft["folder"]) / "actor")
    dpo_points = [scored_point(f"DPO+NLL beta {beta:g}, lr {lr:g}", args.out / f"dpo_nll_beta{beta:g}_lr{lr:g}",
                               "dpo", {"beta": beta, "lr": lr, "max_steps": args.dpo_steps, "nll_alpha": 1.0,
                                       "load_path": start}, beta)
                  for beta in args.dpo_betas for lr in args.dpo_lrs]
    dpo = choose_dpo(dpo_points)
    return {"base": base, "sft": sft_points, "dpo_nll": dpo_points, "chosen_sft": sft["name"],
            "chosen_dpo_nll": dpo["name"], "held_out_prompts": len(base["answers"]),
            "tables": {"sft": table(sft_points, base, sft, len(base["answers"])),
                       "dpo_nll": table(dpo_points, base, dpo, len(base["answers"]))}}


def _base_model(folder: Path) -> str:
    from alignkit.adapters import adapter_base_model

    return adapter_base_model(folder / "actor")


def main(argv=None) -> int:
    def go():
        from alignkit.io import atomic_write_json, atomic_write_text

        args = parse_args(argv)
        args.out.mkdir(parents=True, exist_ok=True)
        result = sweep(args)
        text = (f"## SFT: learning rate x steps\n\n{result['tables']['sft']}\nchosen: {result['chosen_sft']}\n\n"
                f"## DPO+NLL from the chosen SFT: beta x learning rate ({args.dpo_steps} steps)\n\n"
                f"{result['tables']['dpo_nll']}\nchosen: {result['chosen_dpo_nll']}\n")
        atomic_write_text(args.out / "sweep.md", text)

        def plain(point):
            return {**point, "answers": _plain(point["answers"])}

        atomic_write_json(args.out / "sweep.json", {
            **{k: v for k, v in result.items() if k not in ("base", "sft", "dpo_nll")},
            "base": plain(result["base"]), "sft": [plain(p) for p in result["sft"]],
            "dpo_nll": [plain(p) for p in result["dpo_nll"]]})
        print(text)

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())

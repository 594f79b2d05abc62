"""Does the NLL term hold the chosen likelihood up? Vanilla DPO against DPO+NLL, from the base model.

Trains DPO twice on the embedded model and data with the same seed, split and schedule, once with
``--nll-alpha 0`` (vanilla) and once with ``--nll-alpha 1``, for ``--epochs`` epochs, evaluating
on the held-out pairs every ``--eval-interval`` steps. Then it answers every held-out prompt with
the base model and both adapters (greedy, ``--max-new-tokens``) and scores the answers.

    python benchmarking/study_nll.py --epochs 3 --out outputs/study_nll

Writes into ``--out``: ``study_nll.png`` (held-out chosen and rejected log-probs, rewards and
accuracy over steps), ``study_nll.md`` (the table) and ``study_nll.json`` (every number). The claim
it tests: without the NLL term the chosen log-prob falls along with the rejected one; with it, the
chosen log-prob stays near or above where it started.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alignkit.cliutil import ArgParser, guarded, output_folder, positive_int

RUNS = {"vanilla DPO": 0.0, "DPO+NLL": 1.0}
CURVES = [(("logps/chosen",), "held-out chosen log-prob (sum per answer)"),
          (("logps/rejected",), "held-out rejected log-prob (sum per answer)"),
          (("rewards/chosen", "rewards/rejected", "rewards/margins"),
           "held-out rewards: chosen (solid), rejected (dashed), margin (dotted)"),
          (("rewards/accuracies",), "held-out preference accuracy (margin > 0; all ties at step 0)")]
STYLES = ("-", "--", ":")


def parse_args(argv=None):
    p = ArgParser(prog="study_nll.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the training split [default: 3]")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: --epochs decides)")
    p.add_argument("--eval-interval", type=positive_int, default=10, help="held-out evaluation every N steps")
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate of both runs [default: 5e-5]")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta of both runs [default: 0.1]")
    p.add_argument("--max-new-tokens", type=positive_int, default=200, help="answer length limit [default: 200]")
    p.add_argument("--eval-prompts", type=int, default=0, help="answer only the first N held-out prompts (0: all)")
    p.add_argument("--out", type=output_folder, default=Path("outputs/study_nll"), help="output folder")
    p.add_argument("--reuse", action="store_true", help="keep finished runs in --out instead of training again")
    args = p.parse_args(argv)
    from alignkit.config import build_config

    build_config("dpo", training_options(args))   # a bad value is refused before --out is made
    return args


def training_options(args, nll_alpha: float = 0.0) -> dict:
    """The options both runs take from the command line (beside their folder and NLL weight)."""
    return {"nll_alpha": nll_alpha, "epochs": args.epochs, "max_steps": args.max_steps,
            "eval_interval": args.eval_interval, "lr": args.lr, "beta": args.beta, "plot": False}


def train_runs(args) -> dict[str, dict]:
    """Train both runs (or reuse them); returns per run its folder, seconds and eval rows."""
    from alignkit.config import build_config
    from alignkit.plots import read_metrics
    from alignkit.runs import read_run_info
    from alignkit.train import run

    out = {}
    for name, alpha in RUNS.items():
        folder = args.out / f"dpo_alpha{alpha:g}"
        if not (args.reuse and (folder / "actor" / "adapter_model.safetensors").is_file()):
            cfg = build_config("dpo", {"save_path": str(folder), "no_timestamp": True, "overwrite": True,
                                       **training_options(args, alpha)})
            run(cfg)
        rows = read_metrics(folder)
        seconds = max(r.get("time", 0.0) for r in rows)   # the run's own clock, also for a reused run
        evals = [r for r in rows if r.get("split") == "eval"]
        out[name] = {"folder": folder, "seconds": seconds, "eval": evals,
                     "steps": max(r["step"] for r in rows), "config": read_run_info(folder)["config"]}
    return out


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alignkit.io import atomic_write

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (keys, title) in zip(axes.flat, CURVES, strict=True):
        for color, (name, r) in enumerate(runs.items()):
            for key, style in zip(keys, STYLES, strict=False):
                ax.plot([e["step"] for e in r["eval"]], [e[key] for e in r["eval"]], style, color=f"C{color}",
                        marker="o", ms=3, label=name if key == keys[0] else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Vanilla DPO vs DPO+NLL from the base model (held-out pairs)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def answer_scores(args, runs: dict[str, dict]) -> dict[str, dict]:
    """Held-out answers of the base and each run, scored with intervals (paired against the base)."""
    import torch

    from alignkit.compare import Decoding, Evaluator, read_run_record
    from alignkit.config import DPOConfig
    from alignkit.quality import answer_quality

    first = next(iter(runs.values()))
    evaluator = Evaluator(split=read_run_record(first["folder"]).split)
    decoding = Decoding(max_new_tokens=args.max_new_tokens, eval_prompts=args.eval_prompts or None)
    defaults = DPOConfig()
    configs = [("base", None)] + [(n, r["folder"]) for n, r in runs.items()]
    with torch.no_grad():   # every configuration answers in shared batches
        scored = evaluator.score_all([(folder, defaults.max_length, defaults.beta) for _, folder in configs], [],
                                     decoding)
    answers = {name: s["held_out_answers"] for (name, _), s in zip(configs, scored, strict=True)}
    return {name: {"quality": answer_quality(a, None if name == "base" else answers["base"]), "n": len(a)}
            for name, a in answers.items()}


def table(runs: dict[str, dict], scores: dict[str, dict]) -> str:
    from alignkit.quality import format_measure
    from alignkit.report import QUALITY_COLUMNS

    lines = ["| run | steps | time (s) | chosen log-prob start -> end | rejected log-prob start -> end | "
             "margin end | accuracy end |", "| --- | ---: | ---: | --- | --- | ---: | ---: |"]
    for name, r in runs.items():
        first, last = r["eval"][0], r["eval"][-1]
        lines.append(f"| {name} | {r['steps']} | {r['seconds']:.0f} | {first['logps/chosen']:.1f} -> "
                     f"{last['logps/chosen']:.1f} ({last['logps/chosen'] - first['logps/chosen']:+.1f}) | "
                     f"{first['logps/rejected']:.1f} -> {last['logps/rejected']:.1f} "
                     f"({last['logps/rejected'] - first['logps/rejected']:+.1f}) | "
                     f"{last['rewards/margins']:.3f} | {last['rewards/accuracies']:.1%} |")
    if scores:
        n = next(iter(scores.values()))["n"]
        lines += ["", f"Answers to {n} held-out prompts (greedy), 95% bootstrap intervals; * = the paired "
                  "difference from the base excludes 0:", "",
                  "| answers of | repetition | looping share | ended on their own | mean words | distinct-2 |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, s in scores.items():
            cells = [format_measure(s["quality"][key], fmt) for key, _, fmt in QUALITY_COLUMNS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    def go():
        from alignkit.io import atomic_write_json, atomic_write_text

        args = parse_args(argv)
        args.out.mkdir(parents=True, exist_ok=True)
        runs = train_runs(args)
        plot(runs, args.out / "study_nll.png")
        scores = answer_scores(args, runs)
        text = table(runs, scores)
        atomic_write_text(args.out / "study_nll.md", text)
        atomic_write_json(args.out / "study_nll.json", {
            "runs": {n: {**r, "folder": str(r["folder"])} for n, r in runs.items()}, "answers": scores})
        print(text)
        print(f"figure: {args.out / 'study_nll.png'}")

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())

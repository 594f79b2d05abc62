"""Train one algorithm on the defaults, then show base and fine-tuned answers to held-out prompts.

Used by ``benchmarking/benchmarking_sft.py`` and ``benchmarking/benchmarking_dpo.py``.
"""

from __future__ import annotations

import textwrap

from .cliutil import guarded
from .config import build_config
from .data import make_dataset
from .evaluate import generate_answers


def _block(label: str, text: str) -> str:
    body = textwrap.indent(textwrap.fill(text, 96, replace_whitespace=False) if text else "(empty)", "    ")
    return f"  {label}:\n{body}"


def train_and_show(algo: str, n_prompts: int = 3, max_new_tokens: int = 200, **options) -> dict:
    """Train ``algo`` with default options (plus ``options``), print answers and metrics; returns them."""
    from .runs import check_save_path
    from .train import setup, train

    cfg = build_config(algo, {"save_path": f"outputs/benchmark_{algo}", **options})
    check_save_path(cfg)
    s = setup(cfg)
    final = train(s)
    _, test = make_dataset(cfg.dataset, test_size=cfg.test_split, seed=cfg.seed, eval_dataset=cfg.eval_dataset)
    rows = [test[i] for i in range(min(n_prompts, len(test)))]
    prompts = [r["prompt"] for r in rows]
    model = s.agent.unwrapped_model()
    tuned = generate_answers(model, s.tokenizer, prompts, max_new_tokens=max_new_tokens)
    with model.disable_adapter():
        base = generate_answers(model, s.tokenizer, prompts, max_new_tokens=max_new_tokens)
    print(f"\n=== {algo.upper()}: answers to held-out prompts (greedy, max_new_tokens={max_new_tokens}) ===")
    for row, b, t in zip(rows, base, tuned, strict=True):
        print(f"\nPROMPT: {row['prompt']}")
        print(_block("dataset chosen", row["chosen"]))
        print(_block("dataset rejected", row["rejected"]))
        print(_block("base model", b))
        print(_block(f"after {algo.upper()}", t))
    print(f"\n=== final held-out metrics ({s.run_dir}) ===")
    for key, value in final.items():
        print(f"  {key:<22} {value:.4f}")
    return {"metrics": final, "prompts": prompts, "base": base, "tuned": tuned}


def script_main(algo: str, argv: list[str]) -> int:
    """Entry of the argument-free ``benchmarking_<algo>.py`` scripts."""
    import sys

    about = (f"benchmarking_{algo}.py takes no arguments: it trains {algo.upper()} with the command line's defaults "
             f"and shows the held-out answers before and after; 'alignkit {algo} --help' shows a configurable run")
    if argv in (["--help"], ["-h"]):
        print(about)
        return 0
    if argv:
        print(f"error: {about}", file=sys.stderr)
        return 2
    return guarded(train_and_show, algo)

"""Compare trained configurations: held-out numbers, greedy answers, figures, one HTML report.

Every configuration is an adapter on the same base model (``None`` = the base with an untrained
LoRA, whose B matrices are zero, so it answers exactly as the base). Rewards of every
configuration are measured against that same base, on the same held-out preference pairs, so the
numbers in one table are comparable.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .agents import DPO
from .checkpoints import adapter_base_model, load_adapter
from .data import BUNDLED_DATASET, make_dataset
from .errors import UserError
from .evaluate import generate_answers
from .gyms import PreferenceGym
from .models import DEFAULT_MODEL, add_lora, load_model, load_tokenizer
from .plots import plot_runs
from .report import repetition_score, write_report

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


def read_prompts(path) -> list[str]:
    """Prompts from a text file, one per non-empty line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompts file not found: {path}")
    prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{path} holds no prompts (one per line)")
    return prompts


def check_same_base(runs: dict[str, str | None], model: str | None) -> str:
    """The one base model all run adapters share (``model`` if given); a mix is a UserError."""
    bases = {name: adapter_base_model(Path(d) / "actor") for name, d in runs.items() if d}
    wanted = model or next(iter(bases.values()), None) or DEFAULT_MODEL
    wrong = [f"{name} ({base})" for name, base in bases.items() if base and base != wanted]
    if wrong:
        raise UserError(f"all runs must share the base model {wanted!r}; these do not: {', '.join(wrong)}")
    return wanted


class Evaluator:
    """Loads the base model and the held-out pairs once, then scores one configuration at a time."""

    def __init__(self, model_name=DEFAULT_MODEL, dataset=BUNDLED_DATASET, test_size=0.1, seed=42, max_length=256,
                 beta=0.1, device=None, dtype=None):
        self.tokenizer = load_tokenizer(model_name)
        self.base = load_model(model_name, device=device, dtype=dtype)
        _, test = make_dataset(dataset, test_size=test_size, seed=seed)
        # Only the held-out split is scored; it stands in as the (unused) training split too.
        self.gym = PreferenceGym(test, test, self.tokenizer, data_batch_size_per_gpu=8,
                                 max_context_length=max_length, seed=seed)
        self.beta = beta
        self.ref_cache: dict = {}  # the reference (the base) is the same for every configuration

    def score(self, run_dir: str | None, prompts: list[str], max_new_tokens: int = 200) -> dict:
        """Answers to ``prompts`` and held-out metrics of the adapter in ``run_dir`` (None = base)."""
        if run_dir:
            # Loaded as trainable only because the agent wants parameters to own; nothing is stepped.
            model = load_adapter(self.base, Path(run_dir) / "actor", is_trainable=True)
        else:
            model = add_lora(self.base)
        try:
            agent = DPO(model, self.tokenizer.pad_token_id, self.tokenizer.pad_token, beta=self.beta, nll_alpha=1.0)
            agent.ref_cache = self.ref_cache
            held_out = agent.test(self.gym)
            answers = generate_answers(model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                       batch_size=len(prompts))
        finally:
            self.base = model.unload()  # drop the LoRA layers: the next configuration starts clean
        metrics = {
            # The base is its own reference: every reward is 0 and "accuracy" says nothing.
            "preference_accuracy": held_out["rewards/accuracies"] if run_dir else None,
            "reward_chosen": held_out["rewards/chosen"],
            "reward_rejected": held_out["rewards/rejected"],
            "sft_loss": held_out["nll_loss"],  # mean NLL per chosen-response token = SFT loss on chosen
            "mean_answer_words": sum(len(a.split()) for a in answers) / max(len(answers), 1),
            "repetition": sum(repetition_score(a) for a in answers) / max(len(answers), 1),
        }
        return {"answers": answers, "metrics": metrics}


def compare(runs: dict[str, str | None], out_dir, prompts: list[str] | None = None, model: str | None = None,
            max_new_tokens: int = 200, dataset: str = BUNDLED_DATASET, seed: int = 42, test_size: float = 0.1,
            max_length: int = 256, progress=print) -> Path:
    """Score every configuration in ``runs`` (label key -> run folder or None) and write the report.

    Returns the path of ``out_dir/index.html``; ``out_dir/results.json`` holds the same numbers.
    """
    prompts = prompts or DEFAULT_PROMPTS
    base_model = check_same_base(runs, model)
    evaluator = Evaluator(base_model, dataset=dataset, test_size=test_size, seed=seed, max_length=max_length)
    configs = []
    for key, run_dir in runs.items():
        progress(f"evaluating {LABELS.get(key, key)} ({run_dir or 'untrained LoRA'})")
        with torch.no_grad():
            scored = evaluator.score(run_dir, prompts, max_new_tokens)
        configs.append({"name": LABELS.get(key, key), "run_dir": str(run_dir) if run_dir else None, **scored})
    out_dir = Path(out_dir)
    run_dirs = [d for d in runs.values() if d]
    figures = plot_runs(run_dirs, out_dir=out_dir / "figures") if run_dirs else []
    return write_report(out_dir, prompts, configs, figures=figures,
                        generation={"do_sample": False, "max_new_tokens": max_new_tokens})

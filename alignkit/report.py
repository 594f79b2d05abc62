"""One self-contained HTML page comparing training configurations, plus ``results.json``.

The page holds a table of numbers per configuration, each prompt's answers behind a tab
bar (one tab per configuration) and the training-curve figures. Everything is inline:
figures as base64 data URIs, CSS and JavaScript in the page, no fonts or scripts fetched,
so the file opens from disk on a machine with no network. Without JavaScript every answer
is shown one under the other, so nothing is lost.

The page comes from the Jinja2 template ``templates/report.html.j2`` with autoescaping on,
so text from prompts, answers, names and captions can never turn into markup.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import jinja2

from alignkit.errors import UserError
from alignkit.io import atomic_write_json, atomic_write_text, unwritable

DEFAULT_TITLE = "SFT and DPO: comparing training configurations"
DEFAULT_GENERATION = {"do_sample": False, "max_new_tokens": 200}

# (key, column heading, formatter). The order is the table's column order.
METRIC_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("preference_accuracy", "Held-out preference accuracy", "{:.1%}"),
    ("reward_chosen", "Mean chosen reward", "{:+.3f}"),
    ("reward_rejected", "Mean rejected reward", "{:+.3f}"),
    ("sft_loss", "Held-out SFT loss", "{:.3f}"),
    ("mean_answer_words", "Mean answer length (words)", "{:.1f}"),
    ("repetition", "Repetition score", "{:.3f}"),
)

# Answer-quality measures over the held-out prompts (see alignkit.quality), in table order.
QUALITY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("repetition", "Repetition score", "{:.3f}"),
    ("looping_share", "Looping answers (repetition > 0.3)", "{:.0%}"),
    ("ended_share", "Answers that end on their own", "{:.0%}"),
    ("mean_words", "Mean length (words)", "{:.1f}"),
    ("distinct_2", "Distinct-2", "{:.3f}"),
)

# Captions for the figure names alignkit.plots writes; other figures get their file name.
FIGURE_CAPTIONS = {
    "sft_training_loss.png": "SFT training loss per step (faint) with its exponential moving average on top.",
    "dpo_training_loss.png": "DPO training loss without the NLL term. It can fall close to zero while "
    "both likelihoods fall: see the rewards.",
    "dpo_plus_nll_training_loss.png": "DPO + NLL training loss, with its DPO and NLL parts. The NLL part "
    "keeps the total above plain DPO's.",
    "dpo_reward_margins.png": "DPO implicit rewards without NLL: chosen and rejected rewards, and the "
    "margin between them.",
    "dpo_plus_nll_reward_margins.png": "DPO + NLL implicit rewards: the NLL term holds the chosen reward "
    "up while the rejected one falls.",
    "dpo_nll_comparison.png": "DPO training loss without (left) and with (right) the NLL term, on one y axis.",
    "eval_metrics.png": "Held-out metrics at each evaluation.",
}

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
         ".svg": "image/svg+xml", ".webp": "image/webp"}
_WORD = re.compile(r"\w+")
_DASH = "\u2013"


def repetition_score(text: str, n: int = 3) -> float:
    """Share of the word n-grams in ``text`` that repeat an n-gram seen earlier in it.

    ``score = (N - U) / N`` where ``N = W - n + 1`` is the number of word n-grams in a text
    of ``W`` words and ``U`` the number of distinct ones. 0 means no n-gram occurs twice; a
    text stuck in a loop tends to 1. Words are the lower-cased runs of letters and digits
    (``\\w+``), so "feel?" and "feel" count as one word and a loop inside one
    whitespace-separated chunk ("remis-s-s-s-s") is still a loop of words.
    Example with ``n = 3``: "a b c a b c a b c" has N = 7 trigrams, U = 3 distinct
    (abc, bca, cab), so the score is 4/7.

    Returns:
        A float in ``[0, 1)``; 0.0 when the text has fewer than ``n`` words.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams)


def _number(value: Any) -> float | None:
    """A finite float, or None for missing, non-numeric, NaN and infinite values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _check_configs(prompts: Sequence[str], configs: Sequence[dict]) -> list[dict]:
    """Validate ``configs`` against ``prompts``; return clean copies with every metric filled."""
    problems: list[str] = []
    if not configs:
        problems.append("at least one configuration is needed")
    names = [str(c.get("name", "")).strip() if isinstance(c, dict) else "" for c in configs]
    for i, (config, name) in enumerate(zip(configs, names, strict=True)):
        if not isinstance(config, dict):
            problems.append(f"configuration {i} is a {type(config).__name__}, not a dict")
            continue
        if not name:
            problems.append(f"configuration {i} has no name")
        elif names.count(name) > 1 and names.index(name) == i:
            problems.append(f"configuration name {name!r} is used more than once")
        answers = config.get("answers")
        if (not isinstance(answers, (list, tuple)) or len(answers) != len(prompts)
                or not all(isinstance(a, str) for a in answers)):
            got = len(answers) if isinstance(answers, (list, tuple)) else type(answers).__name__
            problems.append(f"configuration {name or i!r} needs one answer string per prompt "
                            f"({len(prompts)}), got {got}")
    if problems:
        raise UserError("cannot write the report: " + "; ".join(problems))
    cleaned = []
    for config, name in zip(configs, names, strict=True):
        answers = list(config["answers"])
        given = config.get("metrics") or {}
        metrics = {key: _number(given.get(key)) for key, _, _ in METRIC_COLUMNS}
        # Length and repetition come from the answers themselves unless the caller measured them.
        if metrics["mean_answer_words"] is None and answers:
            metrics["mean_answer_words"] = sum(len(a.split()) for a in answers) / len(answers)
        if metrics["repetition"] is None and answers:
            metrics["repetition"] = sum(repetition_score(a) for a in answers) / len(answers)
        run_dir = config.get("run_dir")
        entry = {"name": name, "run_dir": None if run_dir is None else str(run_dir),
                 "metrics": metrics, "answers": answers}
        if isinstance(config.get("split"), dict):  # which held-out split the numbers come from
            entry["split"] = dict(config["split"])
        if isinstance(config.get("quality"), dict):  # answer quality on the held-out prompts, with intervals
            entry["quality"] = {key: dict(value) for key, value in config["quality"].items()
                                if isinstance(value, dict)}
        if isinstance(config.get("held_out"), list):  # the held-out answers behind those numbers
            entry["held_out"] = list(config["held_out"])
        cleaned.append(entry)
    return cleaned


def _load_figures(figures: Iterable[Any]) -> list[dict]:
    """Read each figure (a path, or a ``(path, caption)`` pair) into a data URI."""
    loaded = []
    for item in figures:
        path, caption = (item if isinstance(item, (tuple, list)) else (item, None))
        path = Path(path)
        if not path.is_file():
            raise UserError(f"figure not found: {path}")
        mime = _MIME.get(path.suffix.lower())
        if mime is None:
            raise UserError(f"figure {path} is not an image type the report can embed ({', '.join(_MIME)})")
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        loaded.append({"file": path.name, "path": str(path),
                       "caption": caption or FIGURE_CAPTIONS.get(path.name, path.name),
                       "src": f"data:{mime};base64,{data}"})
    return loaded


def _format_metric(value: float | None, fmt: str) -> str:
    """A table cell's text: ``value`` through its column's format, or a dash when not measured."""
    return _DASH if value is None else fmt.format(value)


@functools.cache
def _environment() -> jinja2.Environment:
    """The template environment, built on first use and shared by every report."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("alignkit", "templates"),
        autoescape=True,
        # Block tags on lines of their own leave no blank lines or indentation in the page.
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        # A misspelt name in the template fails loudly instead of printing nothing.
        undefined=jinja2.StrictUndefined,
    )
    env.filters["metric"] = _format_metric
    env.filters["quality"] = _quality_cell
    return env


def _quality_cell(entry: dict | None, fmt: str) -> str:
    """``value [low, high]`` of one measure, with ``*`` when it differs from the base beyond noise."""
    if not entry or _number(entry.get("value")) is None:
        return _DASH
    low, high = _number(entry.get("low")), _number(entry.get("high"))
    text = fmt.format(entry["value"])
    if low is not None and high is not None:
        text += f" [{fmt.format(low)}, {fmt.format(high)}]"
    return text + (" *" if entry.get("outside_noise") else "")


def _render_page(title: str, prompts: list[str], configs: list[dict], figures: list[dict],
                 generation: dict, quality_prompts: int | None = None) -> str:
    """The HTML page as a string; every value in it is escaped by the template."""
    # Strings show quoted so that do_sample=False and mode='False' stay apart.
    settings = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in generation.items()]
    return _environment().get_template("report.html.j2").render(
        title=title, prompts=prompts, configs=configs, figures=figures, generation=generation,
        settings=settings, columns=METRIC_COLUMNS, dash=_DASH, quality_columns=QUALITY_COLUMNS,
        quality_prompts=quality_prompts, has_quality=any("quality" in c for c in configs))


def write_report(out_dir: str | os.PathLike, prompts: Sequence[str], configs: Sequence[dict],
                 figures: Iterable[Any] = (), title: str = DEFAULT_TITLE,
                 generation: dict | None = None, quality_prompts: int | None = None) -> Path:
    """Write ``out_dir/index.html`` and ``out_dir/results.json``; return the HTML path.

    Args:
        out_dir: folder to write into (created if needed).
        prompts: the prompts every configuration answered, in order.
        configs: one dict per configuration, in tab order: ``{"name": str, "run_dir": str | None,
            "answers": [str per prompt], "metrics": {...}}``, optionally ``"split"``: a dict naming the
            held-out split the numbers were measured on, copied into ``results.json``. Metric keys are
            ``preference_accuracy`` (share in [0, 1]), ``reward_chosen``, ``reward_rejected``,
            ``sft_loss``, ``mean_answer_words`` and ``repetition``; a missing, None or
            non-finite value shows as a dash. ``mean_answer_words`` (whitespace-split words)
            and ``repetition`` (mean :func:`repetition_score`) are computed from the answers
            when not given.
            Optionally ``"quality"``: ``{measure: {"value", "low", "high", "outside_noise"?}}`` as
            :func:`alignkit.quality.answer_quality` gives it, shown in a second table.
        figures: image paths, or ``(path, caption)`` pairs, embedded in the page in order.
        title: the page heading.
        generation: decoding settings printed with the answers; defaults to
            ``{"do_sample": False, "max_new_tokens": 200}``.
        quality_prompts: how many held-out prompts the ``quality`` numbers come from.

    Raises:
        UserError: for configurations without a name, duplicate names, an answer count that
            does not match the prompts, or a figure that is missing or not an image.
    """
    prompts = [str(p) for p in prompts]
    generation = dict(DEFAULT_GENERATION if generation is None else generation)
    cleaned = _check_configs(prompts, configs)
    loaded = _load_figures(figures)
    out = Path(out_dir)
    results = {
        "title": title,
        "generation": generation,
        "prompts": prompts,
        "configs": cleaned,
        "figures": [{"file": f["file"], "caption": f["caption"]} for f in loaded],
        "quality_prompts": quality_prompts,
    }
    check_report_folder(out)
    # Render before touching the disk, so a failure leaves the folder as it was.
    page = _render_page(title, prompts, cleaned, loaded, generation, quality_prompts)
    # results.json first, so a new index.html never appears without the numbers behind it.
    atomic_write_json(out / "results.json", results, indent=2)
    return atomic_write_text(out / "index.html", page)


REPORT_FILES = ("index.html", "results.json")


def check_report_folder(out_dir: str | os.PathLike) -> None:
    """Raise a UserError when writing a report into ``out_dir`` would replace files it did not write: an
    ``index.html`` or ``results.json`` there that is not an earlier report's (its ``results.json`` read
    back). A missing folder, one without those files, or an earlier report is fine (other files stay)."""
    out = Path(out_dir)
    problem = unwritable(out)
    if problem:
        raise UserError(f"the report folder {out} cannot be written: {problem}")
    if not any((out / name).exists() for name in REPORT_FILES):
        return
    try:
        earlier = json.loads((out / "results.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        earlier = None
    if not (isinstance(earlier, dict) and isinstance(earlier.get("configs"), list)
            and isinstance(earlier.get("prompts"), list) and (out / "index.html").is_file()):
        raise UserError(f"{out} holds an index.html or results.json that no earlier report wrote; the report would "
                        "replace them: choose another output folder or move them away")

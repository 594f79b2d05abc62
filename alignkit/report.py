"""One self-contained HTML page comparing training configurations, plus ``results.json``.

The page holds a table of numbers per configuration, each prompt's answers behind a tab
bar (one tab per configuration) and the training-curve figures. Everything is inline:
figures as base64 data URIs, CSS and JavaScript in the page, no fonts or scripts fetched,
so the file opens from disk on a machine with no network. Without JavaScript every answer
is shown one under the other, so nothing is lost.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from alignkit.errors import UserError

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
        cleaned.append({"name": name, "run_dir": None if run_dir is None else str(run_dir),
                        "metrics": metrics, "answers": answers})
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


def _describe_generation(generation: dict) -> str:
    """One sentence of HTML naming the decoding settings, e.g. greedy with max_new_tokens=200."""
    settings = ", ".join(f"<code>{html.escape(f'{k}={v!r}' if isinstance(v, str) else f'{k}={v}')}</code>"
                         for k, v in generation.items())
    how = "greedy decoding" if generation.get("do_sample") is False else "these settings"
    return f"Answers were generated with {how} ({settings})." if settings else "Answers as generated."


def _table(configs: list[dict]) -> str:
    head = "".join(f'<th scope="col">{html.escape(label)}</th>' for _, label, _ in METRIC_COLUMNS)
    rows = []
    for config in configs:
        cells = []
        for key, _, fmt in METRIC_COLUMNS:
            value = config["metrics"][key]
            cells.append(f"<td>{_DASH if value is None else fmt.format(value)}</td>")
        title = f' title="{html.escape(config["run_dir"])}"' if config["run_dir"] else ""
        rows.append(f'<tr><th scope="row"{title}>{html.escape(config["name"])}</th>{"".join(cells)}</tr>')
    return (f'<div class="scroll"><table><thead><tr><th scope="col">Configuration</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _prompt_block(index: int, prompt: str, configs: list[dict]) -> str:
    tabs, panels = [], []
    for j, config in enumerate(configs):
        tab_id, panel_id = f"p{index}-tab-{j}", f"p{index}-panel-{j}"
        name = html.escape(config["name"])
        selected = "true" if j == 0 else "false"
        tabs.append(f'<button type="button" role="tab" id="{tab_id}" aria-controls="{panel_id}" '
                    f'aria-selected="{selected}" tabindex="{0 if j == 0 else -1}">{name}</button>')
        answer = config["answers"][index - 1]
        body = html.escape(answer) if answer.strip() else '<span class="empty">(empty answer)</span>'
        panels.append(f'<div role="tabpanel" class="panel" id="{panel_id}" aria-labelledby="{tab_id}" '
                      f'data-config="{j}"><p class="panel-name">{name}</p>'
                      f'<div class="answer">{body}</div></div>')
    return (f'<section class="prompt" id="prompt-{index}"><h3>Prompt {index}</h3>'
            f'<blockquote class="prompt-text">{html.escape(prompt)}</blockquote>'
            f'<div class="tabs" role="tablist" aria-label="Configurations for prompt {index}">{"".join(tabs)}</div>'
            f'{"".join(panels)}</section>')


def _figure_block(figures: list[dict]) -> str:
    if not figures:
        return ""
    items = "".join(f'<figure><img src="{f["src"]}" alt="{html.escape(f["caption"], quote=True)}">'
                    f'<figcaption>{html.escape(f["caption"])}</figcaption></figure>' for f in figures)
    return f'<section id="figures"><h2>Training curves</h2>{items}</section>'


_CSS = """
:root{--fg:#1d2433;--muted:#5b6474;--line:#dde1e8;--accent:#2f5fb3;--soft:#f5f7fa}
*{box-sizing:border-box}
body{margin:0;font:16px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:var(--fg);background:#fff}
main{max-width:1000px;margin:0 auto;padding:2rem 1.25rem 4rem}
h1{font-size:1.7rem;margin:0 0 .4rem}h2{font-size:1.25rem;margin:2.4rem 0 .8rem}h3{font-size:1rem;margin:0 0 .5rem}
.intro,.note{color:var(--muted)}.note{font-size:.92rem}
code{font:.88em ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:var(--soft);padding:.1em .3em;border-radius:4px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:.92rem}
th,td{padding:.5rem .6rem;border-bottom:1px solid var(--line);text-align:right;vertical-align:bottom}
thead th{font-weight:600;color:var(--muted);font-size:.82rem}
tbody th,tbody td{vertical-align:middle}
th[scope=row],thead th:first-child{text-align:left}th[scope=row]{white-space:nowrap}
td{font-variant-numeric:tabular-nums}
tbody tr:hover{background:var(--soft)}
.prompt{border:1px solid var(--line);border-radius:10px;padding:1rem 1.1rem;margin:1.2rem 0}
.prompt-text{margin:0 0 .9rem;padding:.5rem .8rem;border-left:3px solid var(--accent);background:var(--soft);
white-space:pre-wrap;overflow-wrap:anywhere}
.tabs{display:none;flex-wrap:wrap;gap:.25rem;border-bottom:1px solid var(--line)}
.js .tabs{display:flex}
.tabs button{font:inherit;font-size:.9rem;border:1px solid transparent;border-bottom:none;background:none;
color:var(--muted);padding:.4rem .8rem;border-radius:6px 6px 0 0;cursor:pointer;margin-bottom:-1px}
.tabs button:hover{color:var(--fg);background:var(--soft)}
.tabs button[aria-selected=true]{color:var(--accent);background:#fff;border-color:var(--line);
border-bottom:1px solid #fff;font-weight:600}
.tabs button:focus-visible{outline:2px solid var(--accent);outline-offset:1px}
.panel{padding:.8rem .2rem 0}
.panel-name{margin:.6rem 0 .2rem;font-weight:600;font-size:.9rem}
.js .panel-name{display:none}
.answer{white-space:pre-wrap;overflow-wrap:anywhere}
.empty{color:var(--muted);font-style:italic}
figure{margin:1.5rem 0}figure img{max-width:100%;height:auto;display:block;margin:0 auto;
border:1px solid var(--line);border-radius:6px}
figcaption{color:var(--muted);font-size:.9rem;margin-top:.4rem;text-align:center}
"""

# Tabs follow the WAI-ARIA tabs pattern: click or arrow keys select, one panel visible.
_JS = """
(function(){
  document.documentElement.classList.add('js');
  function select(tab){
    var list=tab.parentNode, tabs=list.querySelectorAll('[role=tab]');
    for(var i=0;i<tabs.length;i++){
      var on=tabs[i]===tab, panel=document.getElementById(tabs[i].getAttribute('aria-controls'));
      tabs[i].setAttribute('aria-selected', on?'true':'false');
      tabs[i].tabIndex=on?0:-1;
      panel.hidden=!on;
    }
  }
  var lists=document.querySelectorAll('[role=tablist]');
  for(var i=0;i<lists.length;i++){
    var tabs=lists[i].querySelectorAll('[role=tab]');
    select(tabs[0]);
    lists[i].addEventListener('click',function(e){
      var tab=e.target.closest('[role=tab]'); if(tab) select(tab);
    });
    lists[i].addEventListener('keydown',function(e){
      var all=Array.prototype.slice.call(this.querySelectorAll('[role=tab]'));
      var k=all.indexOf(document.activeElement), n=all.length, next=null;
      if(k<0) return;
      if(e.key==='ArrowRight') next=all[(k+1)%n];
      else if(e.key==='ArrowLeft') next=all[(k-1+n)%n];
      else if(e.key==='Home') next=all[0];
      else if(e.key==='End') next=all[n-1];
      if(next){e.preventDefault(); select(next); next.focus();}
    });
  }
})();
"""


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and ``os.replace`` so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(out_dir: str | os.PathLike, prompts: Sequence[str], configs: Sequence[dict],
                 figures: Iterable[Any] = (), title: str = DEFAULT_TITLE,
                 generation: dict | None = None) -> Path:
    """Write ``out_dir/index.html`` and ``out_dir/results.json``; return the HTML path.

    Args:
        out_dir: folder to write into (created if needed).
        prompts: the prompts every configuration answered, in order.
        configs: one dict per configuration, in tab order: ``{"name": str, "run_dir": str | None,
            "answers": [str per prompt], "metrics": {...}}``. Metric keys are
            ``preference_accuracy`` (share in [0, 1]), ``reward_chosen``, ``reward_rejected``,
            ``sft_loss``, ``mean_answer_words`` and ``repetition``; a missing, None or
            non-finite value shows as a dash. ``mean_answer_words`` (whitespace-split words)
            and ``repetition`` (mean :func:`repetition_score`) are computed from the answers
            when not given.
        figures: image paths, or ``(path, caption)`` pairs, embedded in the page in order.
        title: the page heading.
        generation: decoding settings printed with the answers; defaults to
            ``{"do_sample": False, "max_new_tokens": 200}``.

    Raises:
        UserError: for configurations without a name, duplicate names, an answer count that
            does not match the prompts, or a figure that is missing or not an image.
    """
    prompts = [str(p) for p in prompts]
    generation = dict(DEFAULT_GENERATION if generation is None else generation)
    cleaned = _check_configs(prompts, configs)
    loaded = _load_figures(figures)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    results = {
        "title": title,
        "generation": generation,
        "prompts": prompts,
        "configs": cleaned,
        "figures": [{"file": f["file"], "caption": f["caption"]} for f in loaded],
    }
    intro = (f"{len(cleaned)} training configurations answer the same {len(prompts)} "
             f"prompt{'s' if len(prompts) != 1 else ''}; their numbers come first, then their answers, "
             "then the training curves.")
    page = "".join([
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>",
        f'<h1>{html.escape(title)}</h1><p class="intro">{html.escape(intro)}</p>',
        '<section id="numbers"><h2>Numbers</h2>', _table(cleaned),
        '<p class="note">Accuracy and rewards are measured on held-out preference pairs; rewards are '
        "β·log(π/π<sub>ref</sub>) summed over the response. Repetition score: share of word trigrams "
        f"that repeat an earlier one (0 = none, near 1 = looping). {_DASH} = not measured.</p></section>",
        f'<section id="answers"><h2>Answers</h2><p class="note">{_describe_generation(generation)} '
        "Click a tab to see that configuration's answer.</p>",
        *(_prompt_block(i, p, cleaned) for i, p in enumerate(prompts, start=1)),
        "</section>", _figure_block(loaded),
        f"</main><script>{_JS}</script></body></html>\n",
    ])
    _atomic_write(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    index = out / "index.html"
    _atomic_write(index, page)
    return index

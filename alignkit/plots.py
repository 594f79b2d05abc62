"""Training-curve figures from a run folder's ``metrics.jsonl`` and ``run.json``.

Each line of ``metrics.jsonl`` is one JSON object such as ``{"step": 12, "split": "train",
"loss": 1.9}``. Lines are read defensively (missing keys, NaN/inf values, a last line cut
short by a crash) and drawn as the figures the tutorial shows:

* SFT: ``sft_training_loss.png``
* DPO: ``dpo_training_loss.png`` and ``dpo_reward_margins.png``, or the
  ``dpo_plus_nll_*`` names when the run used an NLL term (``nll_alpha > 0``)
* both: ``eval_metrics.png`` when the run logged held-out evaluations

Figures are drawn on matplotlib's Agg canvas directly, so plotting never switches the
caller's pyplot backend and works on machines without a display.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

from alignkit.errors import UserError
from alignkit.io import atomic_write

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RUN_INFO_FILE = "run.json"
COMPARISON_FILE = "dpo_nll_comparison.png"

# One colour per quantity, reused across figures so a reader learns them once.
_RAW_ALPHA = 0.25
_COLORS = {"loss": "#1f77b4", "chosen": "#2a9d4b", "rejected": "#d1495b", "margins": "#3d5a98",
           "dpo_loss": "#8c6bb1", "nll_loss": "#e08a1e", "accuracy": "#2a9d4b", "perplexity": "#8c6bb1"}


def ema(values: Sequence[float], smoothing: float = 0.9) -> list[float]:
    """Debiased exponential moving average, the smoothing TensorBoard applies to scalars.

    ``m_t = smoothing * m_{t-1} + (1 - smoothing) * x_t`` with ``m_0 = 0``, reported as
    ``m_t / (1 - smoothing ** k)`` where ``k`` counts the finite values seen so far. The
    division removes the pull towards zero that the ``m_0 = 0`` start would otherwise give
    the first points. A non-finite input is passed through unchanged and does not update the
    average, so one NaN step does not poison the rest of the curve.

    Args:
        values: the raw series, in step order.
        smoothing: weight of the past, in ``[0, 1)``; 0 returns the input unchanged.

    Returns:
        A list of the same length as ``values``.
    """
    _check_smoothing(smoothing)
    out: list[float] = []
    last = 0.0
    seen = 0
    for value in values:
        value = float(value)
        if not math.isfinite(value):
            out.append(value)
            continue
        last = last * smoothing + (1.0 - smoothing) * value
        seen += 1
        out.append(last / (1.0 - smoothing**seen))
    return out


def _check_smoothing(smoothing: float) -> None:
    """Raise ValueError unless ``smoothing`` is a number in ``[0, 1)`` (1 would freeze the EMA)."""
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)):
        raise ValueError(f"smoothing must be a number in [0, 1), got {smoothing!r}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Read every well-formed line of ``<run_dir>/metrics.jsonl``, in file order.

    Blank lines and lines that are not JSON objects are skipped with a logged warning; a cut
    short last line (the loop crashed mid-write) is expected and tolerated the same way.

    Raises:
        UserError: when the folder has no ``metrics.jsonl``.
    """
    path = Path(run_dir) / METRICS_FILE
    if not Path(run_dir).exists():
        raise UserError(f"{run_dir}: no such run folder")
    if not path.is_file():
        raise UserError(f"no metrics file at {path}: is {Path(run_dir)} a training run folder?")
    records: list[dict] = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            where = "last line" if number == len(lines) else f"line {number}"
            logger.warning("%s: skipping unreadable %s (a crash mid-write?)", path, where)
            continue
        if not isinstance(record, dict):
            logger.warning("%s: skipping line %d, not a JSON object", path, number)
            continue
        records.append(record)
    return records


def read_run_info(run_dir: str | os.PathLike, records: list[dict] | None = None) -> dict:
    """Read ``<run_dir>/run.json`` as ``{"algo", "run_name", "config"}``.

    A missing ``run.json`` is not fatal: the algorithm is guessed from the metric names
    (DPO runs log ``rewards/*``; ``records``, the run's metrics when already read) and the folder
    name stands in for the run name.

    Raises:
        UserError: when ``run.json`` exists but is not a JSON object.
    """
    run_dir = Path(run_dir)
    path = run_dir / RUN_INFO_FILE
    info: dict[str, Any] = {}
    if path.is_file():
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(info, dict):
            raise UserError(f"{path} must hold a JSON object, not {type(info).__name__}")
    config = info.get("config") if isinstance(info.get("config"), dict) else {}
    algo = info.get("algo")
    if algo not in ("sft", "dpo"):
        # Only DPO runs log rewards, so the metric names tell the two apart.
        if records is None:
            records = read_metrics(run_dir) if (run_dir / METRICS_FILE).is_file() else []
        algo = "dpo" if any("rewards/margins" in r or "dpo_loss" in r for r in records) else "sft"
    return {**info, "algo": algo, "run_name": str(info.get("run_name") or run_dir.name), "config": config}


def _load_run(run_dir: str | os.PathLike) -> tuple[list[dict], dict]:
    """A run's metrics and record, its metrics file read once (so each bad line is warned about once)."""
    records = read_metrics(run_dir)
    return records, read_run_info(run_dir, records)


def _finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (bools excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _series(records: Iterable[dict], split: str, key: str) -> tuple[list[float], list[float]]:
    """Steps and values of one metric, finite points only, sorted by step.

    When a step appears twice (a resumed run logs again from its last checkpoint) the later
    line wins, because it describes the run that carried on.
    """
    by_step: dict[float, float] = {}
    for record in records:
        if record.get("split", "train") != split:
            continue
        step, value = _finite(record.get("step")), _finite(record.get(key))
        if step is not None and value is not None:
            by_step[step] = value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _nll_alpha(info: dict) -> float:
    """The run's NLL weight; 0 when absent or not a finite number."""
    return _finite(info.get("config", {}).get("nll_alpha")) or 0.0


def _figure_prefix(info: dict) -> str:
    """File-name prefix the tutorial uses: 'sft', 'dpo' or 'dpo_plus_nll'."""
    if info["algo"] != "dpo":
        return "sft"
    return "dpo_plus_nll" if _nll_alpha(info) > 0 else "dpo"


def _describe(info: dict) -> str:
    """A short 'run name (lr 5e-05, LoRA r 16, ...)' line for figure titles."""
    config = info.get("config", {})
    lora = config.get("lora") if isinstance(config.get("lora"), dict) else {}
    dpo = info["algo"] == "dpo"
    picks = [("lr", config.get("lr")), ("LoRA r", config.get("lora_r", lora.get("r"))),
             ("β", config.get("beta") if dpo else None), ("α_NLL", config.get("nll_alpha") if dpo else None),
             ("loss", config.get("loss_type") if dpo else None)]
    parts = []
    for label, value in picks:
        if value is not None and value != "":
            parts.append(f"{label} {value:g}" if _finite(value) is not None else f"{label} {value}")
    name = info["run_name"]
    model = config.get("model")
    if isinstance(model, str) and model:
        name += f" · {Path(model).name}"
    return f"{name} ({', '.join(parts)})" if parts else name


def _new_figure(ncols: int = 1, width: float = 8.0, height: float = 4.5, sharey: bool = False):
    """A figure on its own Agg canvas, plus its axes (a list, one per column)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, sharey=sharey, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3, linewidth=0.6)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, list(axes)


def _raw_and_smooth(ax, steps, values, smoothing, color, label, raw=True, **line_kw) -> None:
    """Draw a metric as its raw per-step line (faint) with the EMA on top."""
    if not steps:
        return
    if raw and len(steps) > 1:
        ax.plot(steps, values, color=color, alpha=_RAW_ALPHA, linewidth=0.8)
    marker = "o" if len(steps) == 1 else None
    ax.plot(steps, ema(values, smoothing), color=color, linewidth=1.8, label=label, marker=marker, **line_kw)


def _save(fig, path: Path) -> Path:
    """Write the figure atomically so a crash never leaves a half-written PNG behind. A title's characters the
    font lacks (a run folder named in Japanese) are drawn as boxes without a warning per character."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _plot_training_loss(records, info, out_dir: Path, smoothing: float) -> Path | None:
    steps, losses = _series(records, "train", "loss")
    if not steps:
        logger.warning("%s: no finite training loss, skipping the loss figure", info["run_name"])
        return None
    prefix = _figure_prefix(info)
    fig, (ax,) = _new_figure()
    _raw_and_smooth(ax, steps, losses, smoothing, _COLORS["loss"], f"loss (EMA {smoothing:g})")
    if prefix == "dpo_plus_nll":
        # Showing the two parts explains where the total settles: the NLL part keeps it up.
        for key in ("dpo_loss", "nll_loss"):
            ks, kv = _series(records, "train", key)
            _raw_and_smooth(ax, ks, kv, smoothing, _COLORS[key], f"{key} (EMA)", raw=False, linestyle="--")
    kind = {"sft": "SFT", "dpo": "DPO", "dpo_plus_nll": "DPO + NLL"}[prefix]
    ax.set_title(f"{kind} training loss\n{_describe(info)}", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("loss" if prefix == "sft" else "loss (per step)")
    ax.legend(frameon=False)
    return _save(fig, out_dir / f"{prefix}_training_loss.png")


def _plot_reward_margins(records, info, out_dir: Path, smoothing: float) -> Path | None:
    labels = {"chosen": "chosen reward", "rejected": "rejected reward", "margins": "margin (chosen − rejected)"}
    series = {key: _series(records, "train", f"rewards/{key}") for key in labels}
    if not any(steps for steps, _ in series.values()):
        logger.warning("%s: no finite rewards, skipping the reward figure", info["run_name"])
        return None
    prefix = _figure_prefix(info)
    fig, (ax,) = _new_figure()
    ax.axhline(0.0, color="0.35", linewidth=0.9, zorder=0)
    for key, (steps, values) in series.items():
        _raw_and_smooth(ax, steps, values, smoothing, _COLORS[key], f"{labels[key]}, EMA")
    kind = "DPO + NLL" if prefix == "dpo_plus_nll" else "DPO"
    ax.set_title(f"{kind} implicit rewards\n{_describe(info)}", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("reward  β·log(π/π_ref)")
    ax.legend(frameon=False)
    return _save(fig, out_dir / f"{prefix}_reward_margins.png")


def _plot_eval(records, info, out_dir: Path) -> Path | None:
    if info["algo"] == "dpo":
        panels = [("loss", "loss", "loss"), ("rewards/accuracies", "accuracy", "accuracy"),
                  ("rewards/margins", "reward margin", "margins")]
    else:
        panels = [("loss", "loss", "loss"), ("perplexity", "perplexity", "perplexity")]
    data = [(_series(records, "eval", key), label, color) for key, label, color in panels]
    data = [d for d in data if d[0][0]]
    if not data:
        return None
    fig, axes = _new_figure(ncols=len(data), width=3.6 * len(data) + 0.8, height=3.8)
    for ax, ((steps, values), label, color) in zip(axes, data, strict=True):
        ax.plot(steps, values, color=_COLORS[color], marker="o", markersize=4, linewidth=1.5)
        ax.set_title(f"held-out {label}", fontsize=10)
        ax.set_xlabel("step")
        if color == "accuracy":
            ax.set_ylim(-0.02, 1.02)
        if color == "margins":
            ax.axhline(0.0, color="0.35", linewidth=0.9, zorder=0)
    fig.suptitle(f"Evaluation: {_describe(info)}", fontsize=10)
    return _save(fig, out_dir / "eval_metrics.png")


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
             smoothing: float = 0.9) -> list[Path]:
    """Draw one run's figures and return the paths written.

    SFT runs get ``sft_training_loss.png``; DPO runs ``dpo_training_loss.png`` and
    ``dpo_reward_margins.png`` (``dpo_plus_nll_*`` when ``nll_alpha > 0``); any run with
    held-out lines also gets ``eval_metrics.png``, a population run ``population.png``. A figure whose metrics have no finite
    point is skipped with a logged warning.

    Args:
        run_dir: the run folder holding ``metrics.jsonl`` (and usually ``run.json``).
        out_dir: where to write; defaults to ``run_dir``.
        smoothing: EMA weight in ``[0, 1)`` for the smoothed lines.

    Raises:
        UserError: when ``run_dir`` has no ``metrics.jsonl``.
    """
    _check_smoothing(smoothing)  # before any file is touched
    return _plot_loaded(Path(run_dir), *_load_run(run_dir), Path(out_dir) if out_dir is not None else Path(run_dir),
                        smoothing)


def _plot_loaded(run_dir: Path, records: list[dict], info: dict, out: Path, smoothing: float) -> list[Path]:
    """:func:`plot_run` of a run already read."""
    written = [_plot_training_loss(records, info, out, smoothing)]
    if info["algo"] == "dpo":
        written.append(_plot_reward_margins(records, info, out, smoothing))
    written.append(_plot_eval(records, info, out))
    record = run_dir / "population.json"   # a population run: each member's fitness and learning rate too
    if record.is_file():
        try:
            history = json.loads(record.read_text())["generations"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{record} is not a readable population record ({exc})") from None
        written.append(plot_population(history, out / "population.png"))
    return [p for p in written if p is not None]


def plot_dpo_comparison(run_dirs: Sequence[str | os.PathLike], out_path: str | os.PathLike,
                        smoothing: float = 0.9) -> Path:
    """DPO training loss of several runs side by side, sharing one y axis.

    Meant for a run without the NLL term next to one with it: one panel per run, in the
    order given, each titled with its ``nll_alpha``.

    Raises:
        UserError: when no run is given, a folder lacks metrics, or a run is not DPO.
    """
    _check_smoothing(smoothing)
    if not run_dirs:
        raise UserError("plot_dpo_comparison needs at least one DPO run folder")
    runs = [_load_run(run_dir) for run_dir in run_dirs]
    for run_dir, (_, info) in zip(run_dirs, runs, strict=True):
        if info["algo"] != "dpo":
            raise UserError(f"{run_dir} is a {info['algo']} run; the comparison takes DPO runs only")
    return _draw_comparison(runs, Path(out_path), smoothing)


def _draw_comparison(runs: list[tuple[list[dict], dict]], out_path: Path, smoothing: float) -> Path:
    """:func:`plot_dpo_comparison` of DPO runs already read."""
    fig, axes = _new_figure(ncols=len(runs), width=4.6 * len(runs) + 0.6, height=4.2, sharey=True)
    for ax, (records, info) in zip(axes, runs, strict=True):
        steps, losses = _series(records, "train", "loss")
        _raw_and_smooth(ax, steps, losses, smoothing, _COLORS["loss"], f"loss (EMA {smoothing:g})")
        alpha = _nll_alpha(info)
        kind = "DPO + NLL" if alpha > 0 else "DPO"
        ax.set_title(f"{kind} — nll_alpha = {alpha:g}\n{info['run_name']}", fontsize=10)
        ax.set_xlabel("step")
        if not steps:
            ax.text(0.5, 0.5, "no finite loss logged", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_ylabel("training loss")
    axes[0].legend(frameon=False)
    kinds = {_nll_alpha(info) > 0 for _, info in runs}
    fig.suptitle("DPO training loss with and without the NLL term" if len(kinds) == 2 else
                 f"DPO training loss of {len(runs)} runs{' with the NLL term' if kinds == {True} else ''}", fontsize=11)
    return _save(fig, out_path)


def plot_runs(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None,
              smoothing: float = 0.9) -> list[Path]:
    """Plot every run, plus ``dpo_nll_comparison.png`` when two or more runs are DPO.

    A run folder given twice (by any path) is plotted once. Without ``out_dir`` each run's figures
    go into its own folder and the comparison into the first run's folder. With ``out_dir`` each run's figures go into
    ``out_dir/<run folder name>/`` (two runs of one kind would otherwise overwrite each
    other's files) and the comparison into ``out_dir`` itself. In the comparison, runs
    without the NLL term come first.

    Returns:
        Every path written, per run in the order given, then the comparison.
    """
    _check_smoothing(smoothing)
    if not run_dirs:
        raise UserError("plot_runs needs at least one run folder")
    by_folder: dict[Path, Path] = {}
    for r in run_dirs:
        by_folder.setdefault(Path(r).resolve(), Path(r))   # a folder given twice: its first path, in its first place
    run_dirs = list(by_folder.values())
    loaded = {run_dir: _load_run(run_dir) for run_dir in run_dirs}
    written: list[Path] = []
    used_names: set[str] = set()
    for run_dir in run_dirs:
        target = None
        if out_dir is not None:
            name = run_dir.resolve().name or "run"
            unique, k = name, 2
            while unique in used_names:
                unique, k = f"{name}_{k}", k + 1
            used_names.add(unique)
            target = Path(out_dir) / unique
        written.extend(_plot_loaded(run_dir, *loaded[run_dir], target or run_dir, smoothing))
    dpo_runs = [(_nll_alpha(info), i, r) for i, r in enumerate(run_dirs) if (info := loaded[r][1])["algo"] == "dpo"]
    if len(dpo_runs) >= 2:
        ordered = [loaded[r] for _, _, r in sorted(dpo_runs)]
        where = Path(out_dir) if out_dir is not None else run_dirs[0]
        written.append(_draw_comparison(ordered, where / COMPARISON_FILE, smoothing))
    return written


def plot_population(history: list[dict], out_path: str | os.PathLike) -> Path:
    """``population.png``: each member's fitness per generation (left) and the learning rate (and
    beta, for DPO) of the member each slot holds after selection (right, log scale).

    ``history`` is ``population.json``'s ``generations``: per generation its ``step`` and, per member,
    ``fitness`` (first entry: accuracy for DPO, minus the held-out loss for SFT), ``lr`` and ``beta``.
    """
    if not history:
        raise UserError("no generations to plot")
    has_beta = "beta" in history[0]["members"][0]
    fig, (fit_ax, hyper_ax) = _new_figure(ncols=2, width=11.0)
    steps = [g["step"] for g in history]
    for i in range(len(history[0]["members"])):
        fitness = [g["members"][i]["fitness"][0] for g in history]
        line, = fit_ax.plot(steps, fitness, marker="o", label=f"member {i}")
        hyper_ax.plot(steps, [g["members"][i]["lr"] for g in history], marker="o", color=line.get_color())
        if has_beta:
            hyper_ax.plot(steps, [g["members"][i]["beta"] for g in history], marker="s", linestyle="--",
                          color=line.get_color())
    best = [g["members"][g["elite"]]["fitness"][0] for g in history]
    fit_ax.plot(steps, best, color="black", linewidth=2.2, alpha=0.35, label="elite")
    fit_ax.set(xlabel="optimizer step", title="Fitness per member",
               ylabel="held-out preference accuracy" if has_beta else "minus held-out loss")
    fit_ax.legend(fontsize=8)
    hyper_ax.set_yscale("log")
    hyper_ax.set(xlabel="optimizer step", title="learning rate (o)" + (" and beta (s, dashed)" if has_beta else ""),
                 ylabel="value at evaluation (log scale)")
    return _save(fig, Path(out_path))

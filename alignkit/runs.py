"""Run folders: claimed so that no run overwrites another, checked before anything loads, resumed.

A run's folder holds ``run.json`` (the algorithm, the resolved options, the base model: the truth
about the run), ``metrics.jsonl``, its ``checkpoint-<step>/`` folders, the final ``actor/`` and the
figures. ``--no-timestamp`` writes into ``--save-path`` itself, which must then be empty (unless
``--resume`` or ``--overwrite``); otherwise each run claims a new ``<YYYYmmdd_HHMMSS>_<ALGO>``
subfolder with an atomic ``mkdir`` (a second run in the same second gets ``..._2``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import shutil
import time
from datetime import datetime
from pathlib import Path

from .checkpoints import STATE_FILE, numbered, remove_leftovers
from .config import CONFIGS, RESUME_MAY_CHANGE, SFTConfig, absolute_paths, flag, load_yaml
from .errors import UserError
from .io import append_jsonl, atomic_write_text, read_jsonl, unwritable

logger = logging.getLogger(__name__)

RUN_RECORD = "run.json"


def check_save_path(cfg: SFTConfig) -> None:
    """Refuse, before anything loads, a run whose folder cannot be written or holds another run."""
    if cfg.resume:
        folder = Path(cfg.resume)
        if not folder.exists():
            raise UserError(f"--resume {folder}: no such folder")
        if not folder.is_dir():
            raise UserError(f"--resume {folder} is a file; give the folder of the run to continue")
        if not (folder / RUN_RECORD).is_file():
            raise UserError(f"--resume {folder}: not a run folder (no {RUN_RECORD})")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"--resume {folder}: the folder cannot be written")
        return
    base = Path(cfg.save_path)
    if base.exists() and not base.is_dir():
        raise UserError(f"--save-path {base} is a file; give a folder")
    problem = unwritable(base)
    if problem:
        raise UserError(f"--save-path {base} cannot be written: {problem}")
    if not cfg.no_timestamp or not base.is_dir() or not any(base.iterdir()):
        return
    if not (base / RUN_RECORD).is_file():   # someone's own files: never deleted, not even with --overwrite
        raise UserError(f"--save-path {base} already holds files that are not an alignkit run (no {RUN_RECORD}); "
                        "choose another folder or an empty one")
    if not cfg.overwrite and not numbered(base) and not (base / STATE_FILE).is_file():
        raise UserError(f"--save-path {base} holds a run stopped before its first checkpoint (nothing to resume); "
                        "pass --overwrite to start it again, or choose another folder")
    if not cfg.overwrite:
        raise UserError(f"--save-path {base} already holds a run; pass --resume {base} to continue it, "
                        "--overwrite to replace it, or choose another folder")
    if cfg.load_path and base.resolve() in [Path(cfg.load_path).resolve(), *Path(cfg.load_path).resolve().parents]:
        raise UserError(f"--overwrite would delete the adapter --load-path {cfg.load_path} starts from; "
                        "choose another --save-path")


_HELD: dict[Path, int] = {}   # run folders this process trains, each by an open descriptor holding its lock


def _hold(run_dir: Path) -> None:
    """Lock ``run_dir`` for this process (``flock`` on the folder, released by :func:`release_run_dirs` or at
    exit): a second process that resumes or overwrites a run while it trains is refused, where both would
    write its checkpoints and log. Without ``flock`` (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        return
    key = run_dir.resolve()
    if key in _HELD:   # this process again (a run that failed before releasing it): one lock is enough
        return
    fd = os.open(key, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"{run_dir} is being trained by another process right now; let it end (or stop it) "
                        "first") from None
    _HELD[key] = fd


def release_run_dirs() -> None:
    """Unlock every run folder this process has claimed (:func:`claim_run_dir`), once its run has ended."""
    while _HELD:
        os.close(_HELD.popitem()[1])


def claim_run_dir(cfg: SFTConfig, now: datetime | None = None) -> Path:
    """Create the run's folder, or take ``--resume``'s (clearing what a killed save left in it), and lock it
    for this process until :func:`release_run_dirs`; no other run can claim the same one meanwhile."""
    if cfg.resume:
        _hold(Path(cfg.resume))
        removed = remove_leftovers(cfg.resume)
        if removed:
            logger.info("removed %d temporary files of an interrupted save", len(removed))
        return Path(cfg.resume)
    base = Path(cfg.save_path)
    if cfg.no_timestamp:
        base.mkdir(parents=True, exist_ok=True)
        _hold(base)   # before --overwrite empties it
        if cfg.overwrite:
            for child in base.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        try:  # the record is created exclusively, so two runs started into one folder cannot both go on
            with open(base / RUN_RECORD, "x"):
                pass
        except FileExistsError:
            raise UserError(f"--save-path {base}: another run has just claimed this folder") from None
        return base
    base.mkdir(parents=True, exist_ok=True)
    stem = f"{(now or datetime.now()).strftime('%Y%m%d_%H%M%S')}_{cfg.algo.upper()}"
    for n in itertools.count(1):
        folder = base / (stem if n == 1 else f"{stem}_{n}")
        try:
            folder.mkdir()
            _hold(folder)
            return folder
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def read_run_info(run_dir) -> dict:
    """The run's ``run.json`` as a dict (a UserError when it is missing or unreadable)."""
    path = Path(run_dir) / RUN_RECORD
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise UserError(f"{run_dir} is a file; give the run's folder (the one holding {RUN_RECORD})")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
            raise ValueError("no options recorded")
        return info
    except FileNotFoundError:
        if not Path(run_dir).exists():
            raise UserError(f"no such run folder: {run_dir}") from None
        raise UserError(f"{run_dir} is not a run folder (no {RUN_RECORD})") from None
    except OSError as exc:
        raise UserError(f"{path} is not a readable run record ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise UserError(f"{path} is not a readable run record ({exc})") from None


def resumed_config(algo: str, given: dict) -> SFTConfig:
    """The options of the run in ``given['resume']``, with the few that may change taken from ``given``.

    ``given`` holds only what the user set (flags and ``--config`` keys). An option that would change
    the result of the steps already taken is refused with one line naming each.
    """
    run_dir = Path(given["resume"])
    info = read_run_info(run_dir)
    if info.get("algo") != algo:
        raise UserError(f"{run_dir} is a {info.get('algo')} run; resume it with: alignkit {info.get('algo')} "
                        f"--resume {run_dir}")
    cls = CONFIGS[algo]
    if given.get("config"):
        given = {**load_yaml(given["config"], cls), **given}
    elsewhere = given.get("save_path")
    if elsewhere and Path(elsewhere).resolve() not in (run_dir.resolve(), run_dir.resolve().parent):
        raise UserError(f"--resume continues {run_dir} in place; it cannot write to --save-path {elsewhere}: "
                        "drop --save-path (or copy the run folder there first and resume the copy)")
    names = {f.name for f in dataclasses.fields(cls)}
    # Paths as absolute on both sides (a record from before they were kept absolute names them as typed).
    recorded = absolute_paths({k: v for k, v in info["config"].items() if k in names})
    given = absolute_paths(given)
    kept = {k: v for k, v in given.items() if k in RESUME_MAY_CHANGE or _same_setting(k, recorded, given)}
    changed = [f"--{flag(k)} {v} (recorded: {recorded.get(k)})" for k, v in given.items() if k not in kept]
    if changed:
        raise UserError(f"--resume continues with the run's recorded options; these would change its result: "
                        f"{', '.join(changed)}")
    options = {**recorded, **kept, "resume": str(run_dir), "overwrite": False}
    cfg = cls(**options)
    cfg.validate()
    return cfg


def _same_setting(key: str, recorded: dict, given: dict) -> bool:
    """Whether option ``key`` as ``given`` now means what the run recorded: the same value, or, for the model,
    device and dtype, the same once resolved here (``--device cpu`` where the run recorded ``auto`` on a
    machine without CUDA; the embedded model named where the run recorded the default)."""
    from .models import DEFAULT_MODEL, resolve_device, resolve_dtype

    then, now = recorded.get(key), given.get(key)
    if then == now:
        return True
    if key == "model":
        return (then or DEFAULT_MODEL) == (now or DEFAULT_MODEL)
    if key not in ("device", "dtype"):
        return False
    try:
        device_then = resolve_device(recorded.get("device"))
        device_now = resolve_device(given.get("device", recorded.get("device")))
        if key == "device":
            return device_then == device_now
        return resolve_dtype(then, device_then) == resolve_dtype(now, device_now)
    except UserError:   # a device or dtype not available here: not the same
        return False


class MetricsLog:
    """Appends one JSON line per record to ``metrics.jsonl`` and mirrors it to optional loggers.

    A new run starts the file empty; a resumed run (``resume_after`` = the checkpoint's step) keeps
    the records up to that step and appends from there. With ``enabled`` off (a process other than
    the main one) nothing is written.
    """

    def __init__(self, run_dir: Path, report_to: str = "none", run_name: str = "", config: dict | None = None,
                 resume_after: int | None = None, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.start = time.time()
        self.kept_evals: dict[int, dict] = {}
        self.sinks: list = []
        self.closers: list = []
        self.enabled = enabled
        if not enabled:  # another process writes the log
            return
        if resume_after is None:
            atomic_write_text(self.path, "")
        else:
            # Steps after the checkpoint are done again: drop their records, and go on with the clock.
            records, _ = read_jsonl(self.path) if self.path.exists() else ([], 0)
            kept = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= resume_after]
            if resume_after > 0 and not any(r.get("split") == "train" for r in kept):
                logger.warning("%s %s: the records of steps 1-%d are gone, so the run's curves start at step %d",
                               self.path, "holds no training record up to the checkpoint" if self.path.exists()
                               else "is missing", resume_after, resume_after + 1)
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            self.kept_evals = {r["step"]: r for r in kept if r.get("split") == "eval"}
            self.start -= max((r.get("time", 0) for r in kept), default=0)
        targets = {t.strip() for t in report_to.split(",")} - {"none"}
        if "tensorboard" in targets:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--report-to tensorboard needs the tensorboard package: "
                                "pip install tensorboard") from None
            writer = SummaryWriter(log_dir=str(run_dir))
            self.closers.append(writer.close)
            self.sinks.append(lambda rec, w=writer: [w.add_scalar(f"{rec['split']}/{k}", v, rec["step"])
                                                     for k, v in rec.items() if k not in ("step", "split", "epoch")]
                              and w.flush())
        if "wandb" in targets:
            try:
                import wandb
            except ImportError:
                raise UserError("--report-to wandb needs the wandb package: pip install wandb") from None
            wb = wandb.init(mode="offline", dir=str(run_dir), name=run_name, config=config)
            self.closers.append(wb.finish)
            self.sinks.append(lambda rec, r=wb: r.log({f"{rec['split']}/{k}": v for k, v in rec.items()
                                                       if k not in ("step", "split")}, step=rec["step"]))

    def log(self, step: int, epoch: float, split: str, metrics: dict) -> dict:
        record = {"step": step, "epoch": round(epoch, 4), "split": split,
                  "time": round(time.time() - self.start, 3), **metrics}
        if self.enabled:
            append_jsonl(self.path, record)
        for sink in self.sinks:
            sink(record)
        return record

    def close(self) -> None:
        """Flush and close the optional loggers (a finished wandb run, closed event files)."""
        for close in self.closers:
            close()
        self.closers = []

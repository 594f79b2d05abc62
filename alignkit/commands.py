"""The command line's other subcommands: ``plot`` and ``export`` (``pipeline`` lives in ``pipeline``)."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .io import atomic_folder


def add_parsers(sub) -> None:
    """Register the subcommands on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("plot", help="write training-curve figures of run folders",
                       description="Read <run>/metrics.jsonl and write PNG figures into each run folder.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (holding metrics.jsonl)")
    p.add_argument("--out", default=None, help="write all figures into this folder instead")
    p.add_argument("--smoothing", type=float, default=0.9, help="EMA smoothing in [0, 1) [default: 0.9]")
    p.set_defaults(handler=plot)

    p = sub.add_parser("export", help="merge an adapter into its base and write a standard model folder",
                       description="Merge the LoRA adapter at --load-path into its base model and write a "
                       "folder that transformers' AutoModelForCausalLM.from_pretrained loads.")
    p.add_argument("--load-path", required=True, help="adapter folder, e.g. outputs/sft/actor")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default=None, help="base model [default: the adapter's recorded base]")
    p.add_argument("--dtype", default="float32", help="dtype of the written weights [default: float32]")
    p.set_defaults(handler=export)


def plot(flags: dict) -> int:
    """``alignkit plot``: figures of each run (and a DPO with/without NLL comparison)."""
    from .plots import plot_runs

    if not 0 <= flags["smoothing"] < 1:
        raise UserError(f"--smoothing must be in [0, 1) (got {flags['smoothing']})")
    for path in plot_runs(flags["runs"], out_dir=flags["out"], smoothing=flags["smoothing"]):
        print(path)
    return 0


def export(flags: dict) -> int:
    """``alignkit export``: merged model + tokenizer (with chat template) as safetensors."""
    from .adapters import adapter_base_model, check_adapter_folder
    from .evaluate import load_for_generation

    out = Path(flags["out"])
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder to create")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; choose another folder")
    base = adapter_base_model(flags["load_path"])
    if flags["model"] and base and flags["model"] != base:
        raise UserError(f"the adapter at {flags['load_path']} was trained on {base!r}, not {flags['model']!r}")
    check_adapter_folder(flags["load_path"])
    model, tokenizer = load_for_generation(flags["model"] or base, flags["load_path"], device="cpu",
                                           dtype=flags["dtype"])
    merged = model.merge_and_unload()
    if out.exists():
        out.rmdir()  # empty (checked above): the finished folder takes its place
    with atomic_folder(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"merged model written to {out}")
    return 0

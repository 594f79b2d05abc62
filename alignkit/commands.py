"""The command line's other subcommands: ``plot`` and ``export`` (``pipeline`` lives in ``pipeline``)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path

from .errors import RunInterrupted, UserError
from .io import atomic_folder, unwritable


def add_parsers(sub) -> None:
    """Register the subcommands on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("plot", help="write training-curve figures of run folders",
                       description="Read <run>/metrics.jsonl and write PNG figures into each run folder.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (holding metrics.jsonl)")
    p.add_argument("--out", default=None, help="write all figures into this folder instead")
    p.add_argument("--smoothing", type=float, default=0.9, help="EMA smoothing in [0, 1) [default: 0.9]")
    p.set_defaults(handler=plot)

    p = sub.add_parser("export", help="merge an adapter into its base and write a model folder or a GGUF file",
                       description="Merge the LoRA adapter at --load-path into its base model and write a folder that\n"
                       "transformers' AutoModelForCausalLM.from_pretrained loads, or (--format gguf) one GGUF\n"
                       "file for llama.cpp, Ollama and LM Studio (llama-architecture bases).",
                       epilog="examples: alignkit export --load-path outputs/sft/actor --out merged\n"
                       "          alignkit export --load-path outputs/sft/actor --format gguf --out model.gguf "
                       "--ollama", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-path", required=True, help="adapter folder, e.g. outputs/sft/actor")
    p.add_argument("--out", required=True, help="output folder, or with --format gguf a file ending in .gguf")
    p.add_argument("--model", default=None, help="base model [default: the adapter's recorded base]")
    p.add_argument("--dtype", default="float32", help="dtype the adapter is merged in (and of a folder's "
                   "weights) [default: float32]")
    p.add_argument("--format", default="folder", choices=("folder", "gguf"),
                   help="a transformers model folder, or one GGUF file [default: folder]")
    p.add_argument("--quant", default=None, metavar="{f32,f16,q8_0}",
                   help="GGUF weight type [default: f16]; requantize f16 with llama.cpp's llama-quantize for others")
    p.add_argument("--ollama", action="store_true", help="with --format gguf, also write an Ollama Modelfile "
                   "beside the file (then: ollama create NAME -f Modelfile)")
    p.add_argument("--system", default=None, metavar="TEXT", help="with --ollama, the Modelfile's system message "
                   "(e.g. the one the adapter was trained with) [default: the chat template's default]")
    p.set_defaults(handler=export)


def plot(flags: dict) -> int:
    """``alignkit plot``: figures of each run (and a DPO with/without NLL comparison)."""
    from .plots import plot_runs

    if not 0 <= flags["smoothing"] < 1:
        raise UserError(f"--smoothing must be in [0, 1) (got {flags['smoothing']})")
    for target in [flags["out"]] if flags["out"] else flags["runs"]:
        named = f"--out {target}" if flags["out"] else target
        if Path(target).exists() and not Path(target).is_dir():
            raise UserError(f"{named} is a file; give a folder")
        _check_writable(target, named)
    written = plot_runs(flags["runs"], out_dir=flags["out"], smoothing=flags["smoothing"])
    if not written:
        raise UserError(f"no figure written: {', '.join(flags['runs'])} hold(s) no finite metrics to plot")
    for path in written:
        print(path)
    return 0


def _base_model(flags: dict) -> str:
    """The base model to merge the adapter at --load-path into (checked against --model; the embedded
    model when the adapter names none), after checking the adapter folder."""
    from .adapters import adapter_base_model, check_adapter_folder
    from .models import DEFAULT_MODEL

    base = adapter_base_model(flags["load_path"])
    if flags["model"] and base and flags["model"] != base:
        raise UserError(f"the adapter at {flags['load_path']} was trained on {base!r}, not {flags['model']!r}")
    check_adapter_folder(flags["load_path"])
    return flags["model"] or base or DEFAULT_MODEL


def _check_writable(out, named: str | None = None) -> None:
    """Refuse, before any work, an output ``out`` that cannot be written (``named``: how the message
    names it, by default ``--out <out>``)."""
    problem = unwritable(out)
    if problem:
        raise UserError(f"{named or f'--out {out}'} cannot be written: {problem}")


def _merged_model(flags: dict, base: str):
    """The base model with the adapter at --load-path merged in, and its tokenizer."""
    from .evaluate import load_for_generation

    model, tokenizer = load_for_generation(base, flags["load_path"], device="cpu", dtype=flags["dtype"])
    return model.merge_and_unload(), tokenizer


def _sigterm_stops(what: str):
    """A context in which SIGTERM stops ``what`` with an exception (exit 143), so the partial files of an
    atomic write are removed as on Ctrl-C; by default the process died, leaving its temporary files.
    Training's signal takeover (:class:`alignkit.train.StopSignals`) installs and restores the handler."""
    from .train import StopSignals

    class SigtermStops(StopSignals):
        SIGNALS = (signal.SIGTERM,)

        def _handle(self, signum, frame):
            raise RunInterrupted(f"SIGTERM: {what} stopped; nothing was written", 128 + signum)

    return SigtermStops()


def export(flags: dict) -> int:
    """``alignkit export``: merged model + tokenizer (with chat template) as safetensors, or one GGUF file."""
    if flags.get("format") == "gguf":
        return _export_gguf(flags)
    if flags.get("quant") is not None or flags.get("ollama") or flags.get("system") is not None:
        raise UserError("--quant, --ollama and --system apply to --format gguf")
    out = Path(flags["out"])
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder to create")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; choose another folder")
    _check_writable(out)
    merged, tokenizer = _merged_model(flags, _base_model(flags))
    # An empty --out (checked above) is swapped for the finished folder, and kept when the export stops.
    # transformers' save imports DeepSpeed where it is installed, which prints a warning on stdout: the
    # command's output is its result line, so anything printed on the way goes to stderr
    with _sigterm_stops("the export"), atomic_folder(out, replace=out.exists()) as tmp, \
            contextlib.redirect_stdout(sys.stderr):
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"merged model written to {out}")
    return 0


def _export_gguf(flags: dict) -> int:
    """``alignkit export --format gguf``: the merged model as one GGUF file (+ an Ollama Modelfile)."""
    from .gguf_export import (
        check_gguf_out,
        check_quant,
        check_supported,
        read_pre_tokenizer,
        write_gguf,
        write_modelfile,
    )
    from .models import resolve_model_source

    quant = check_quant(flags["quant"] or "f16")
    if flags.get("system") is not None and not flags["ollama"]:
        raise UserError("--system sets the Ollama Modelfile's system message: add --ollama")
    if flags.get("system") is not None and ('"""' in flags["system"] or not flags["system"].strip()):
        raise UserError('--system must be non-empty text without """ (the Modelfile quotes it with """)')
    out = check_gguf_out(flags["out"], modelfile=flags["ollama"])
    _check_writable(out)
    base = _base_model(flags)
    source = resolve_model_source(base)
    if source.kind == "local":   # refuse another architecture before loading any weights
        from transformers import AutoConfig

        check_supported(AutoConfig.from_pretrained(source.location))
    merged, tokenizer = _merged_model(flags, base)
    check_supported(merged.config)
    # A base read from a GGUF file (the embedded model) keeps that file's pre-tokenizer name.
    pre = read_pre_tokenizer(source.location) if source.kind in ("embedded", "gguf") else None
    with _sigterm_stops("the export"):
        path, notes = write_gguf(merged, tokenizer, out, quant=quant, pre_tokenizer=pre, name=Path(base).name)
    print(f"GGUF written to {path} ({path.stat().st_size / 1e6:.1f} MB, {quant}, "
          f"{sum(p.numel() for p in merged.parameters()) / 1e6:.1f}M parameters)")
    if flags["ollama"]:
        modelfile, more = write_modelfile(path, tokenizer, context_length=merged.config.max_position_embeddings,
                                          system=flags.get("system"))
        notes += more
        cd = "" if modelfile.parent.resolve() == Path.cwd().resolve() else f"cd {modelfile.parent} && "
        print(f"Ollama Modelfile written to {modelfile} (then: {cd}ollama create NAME -f Modelfile)")
    for note in notes:
        print(note)
    return 0

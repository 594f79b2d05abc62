"""The ``alignkit`` command line: argument parsing only; the work happens in the library.

    alignkit sft [options]                 supervised fine-tuning
    alignkit dpo [options]                 DPO (+NLL) training
    alignkit sft|dpo --eval --load-path P  chat with a trained adapter
    alignkit plot RUN [RUN ...]            training-curve figures
    alignkit export --load-path P --out D  merge an adapter into its base model
    alignkit pipeline                      SFT -> DPO+NLL -> comparison report

A mistake a user can fix prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import CONFIGS, add_arguments, build_config
from .errors import UserError

EPILOG = {
    "sft": "example: alignkit sft --save-path outputs/sft --no-timestamp",
    "dpo": "examples: alignkit dpo --save-path outputs/dpo --no-timestamp\n"
           "          alignkit dpo --load-path outputs/sft/actor --save-path outputs/sft_dpo --no-timestamp\n"
           "          alignkit dpo --eval --load-path outputs/dpo/actor",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UserError (one line, exit 2) like every other user mistake."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="alignkit", description="Fine-tune language models with SFT and DPO (+NLL) "
                     "through LoRA adapters. Runs offline on the embedded SmolLM2-135M-Instruct by default.",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="show diagnostic logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for algo, cls in CONFIGS.items():
        p = sub.add_parser(algo, help=cls.__doc__.splitlines()[0], description=cls.__doc__,
                           epilog=EPILOG[algo], formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(p, cls)
    from . import commands

    commands.add_parsers(sub)
    return parser


def train_or_chat(algo: str, flags: dict) -> int:
    """``alignkit sft|dpo``: train, or chat with ``--load-path`` when ``--eval`` is given."""
    cfg = build_config(algo, flags)
    if cfg.eval:
        from .evaluate import interactive, load_for_generation
        from .train import resolve_base_model

        model, tokenizer = load_for_generation(resolve_base_model(cfg), cfg.load_path, cfg.device, cfg.dtype)
        return interactive(model, tokenizer, max_new_tokens=cfg.max_new_tokens)
    from .train import run

    run(cfg)
    return 0


def guarded(fn, *args) -> int:
    """Run ``fn(*args)`` as a command: its int result is the exit code (anything else means 0);
    a UserError becomes one line on stderr and exit code 2."""
    try:
        result = fn(*args)
        return result if isinstance(result, int) else 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _dispatch(argv) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "verbose", "handler")}
    if args.command in CONFIGS:
        return train_or_chat(args.command, flags)
    return args.handler(flags)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``alignkit`` console command."""
    return guarded(_dispatch, argv)


if __name__ == "__main__":
    sys.exit(main())

"""The ``alignkit`` command line: argument parsing only; the work happens in the library.

    alignkit sft [options]                 supervised fine-tuning
    alignkit dpo [options]                 DPO (+NLL) training
    alignkit sft|dpo --resume RUN_DIR      continue an interrupted run exactly
    alignkit sft|dpo --eval --load-path P  chat with a trained adapter
    alignkit plot RUN [RUN ...]            training-curve figures
    alignkit export --load-path P --out D  merge an adapter into its base model
    alignkit export --load-path P --format gguf --out F.gguf [--ollama]   ... as one GGUF file
    alignkit pipeline                      SFT -> DPO+NLL -> comparison report

A mistake a user can fix prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

try:   # torch, transformers and peft load here: Ctrl-C meanwhile ends with one line, as it does later
    from . import __version__, commands
    from .cliutil import ArgParser, guarded
    from .config import CONFIGS, add_arguments, build_config, unused_options
    from .errors import UserError
    from .pipeline import add_pipeline_parser
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    raise SystemExit(130) from None

_SEVERAL = ("\n\nseveral processes (DDP; FSDP2 or DeepSpeed ZeRO-2/3 on GPUs): accelerate launch --config_file "
            "configs/accelerate/<ddp_cpu|ddp_gpu|fsdp_gpu|zero2_gpu|zero3_gpu>.yaml -m alignkit.cli {algo} ...")
EPILOG = {
    "sft": "example: alignkit sft --save-path outputs/sft --no-timestamp" + _SEVERAL.format(algo="sft"),
    "dpo": "examples: alignkit dpo --save-path outputs/dpo --no-timestamp\n"
           "          alignkit dpo --load-path outputs/sft/actor --save-path outputs/sft_dpo --no-timestamp\n"
           "          alignkit dpo --eval --load-path outputs/dpo/actor" + _SEVERAL.format(algo="dpo"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgParser(prog="alignkit", description="Fine-tune language models with SFT and DPO (+NLL) "
                     "through LoRA adapters. Runs offline on the embedded SmolLM2-135M-Instruct by default.",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="show diagnostic logging")
    parser.add_argument("--version", action="version", version=f"alignkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgParser)
    for algo, cls in CONFIGS.items():
        p = sub.add_parser(algo, help=cls.__doc__.splitlines()[0], description=cls.__doc__,
                           epilog=EPILOG[algo], formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(p, cls)
    commands.add_parsers(sub)
    add_pipeline_parser(sub)
    return parser


def train_or_chat(algo: str, flags: dict) -> int:
    """``alignkit sft|dpo``: train, continue a run (``--resume``), or chat (``--eval --load-path``)."""
    if flags.get("resume") and flags.get("eval"):
        raise UserError("--eval chats with the adapter at --load-path; --resume continues training: give one of them")
    if flags.get("resume"):
        from .runs import resumed_config

        if flags.get("overwrite"):
            raise UserError("--overwrite does not apply to --resume, which continues the run in its folder: drop it")
        cfg = resumed_config(algo, flags)
    else:
        cfg = build_config(algo, flags)
        unused = unused_options(cfg, flags)
        if unused:
            raise UserError("invalid options: " + "; ".join(unused))
    if cfg.eval:
        from .evaluate import interactive, load_for_generation
        from .processes import launched_processes

        if launched_processes() > 1:
            raise UserError("--eval is an interactive chat for one process; run it without accelerate launch")
        from .generation import Sampling
        from .train import resolve_base_model, run_chat_template

        if cfg.threads:
            import torch

            torch.set_num_threads(cfg.threads)
        template = run_chat_template(cfg)   # --chat-template's (checked), else the adapter's
        model, tokenizer = load_for_generation(resolve_base_model(cfg), cfg.load_path, cfg.device, cfg.dtype,
                                               trust_remote_code=cfg.trust_remote_code, chat_template=template)
        sampling = Sampling(cfg.temperature, cfg.top_p, cfg.repetition_penalty, seed=cfg.seed)
        return interactive(model, tokenizer, max_new_tokens=cfg.max_new_tokens, sampling=sampling)
    if cfg.pop_size > 1:
        from .population import run_population

        run_population(cfg)
        return 0
    from .train import run

    run(cfg)
    return 0


def _dispatch(argv) -> int:
    args = build_parser().parse_args(argv)
    from .processes import is_main_process, launched_processes

    # Under a multi-process launch every process reads the same data: one speaks for all, the others only err.
    level = (logging.INFO if args.verbose else logging.WARNING) if is_main_process() else logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "verbose", "handler")}
    if args.command not in CONFIGS and launched_processes() > 1:   # each process would do it all, and race
        raise UserError(f"alignkit {args.command} runs in one process; under accelerate launch only sft and dpo "
                        "train (run it without accelerate launch)")
    if args.command in CONFIGS:
        return train_or_chat(args.command, flags)
    return args.handler(flags)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``alignkit`` console command."""
    return guarded(_dispatch, argv)


if __name__ == "__main__":
    sys.exit(main())

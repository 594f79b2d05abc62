"""The five-way comparison: Base model, SFT, DPO, DPO + NLL and SFT -> DPO + NLL.

Given no run folders, it trains the four configurations on the embedded defaults (each with its
recipe in ``alignkit.pipeline.RECIPES``; ``--max-steps N`` gives every stage N optimizer steps, 0 one epoch
each) and compares them with the base model (an untrained LoRA) on a fixed prompt set that includes the seed's four prompts: greedy decoding
(``do_sample=False``) and ``max_new_tokens=200``. Given run folders (``--sft outputs/sft`` ...), it
compares those and trains only what is missing.

    python benchmarking/evaluate_models.py --out outputs/five_way

It writes ``<out>/report/index.html`` (one self-contained page with a tab per configuration for each
prompt, the numbers and the training curves) and ``<out>/report/results.json``.
"""

import argparse
import sys

from alignkit.cliutil import ArgParser, guarded
from alignkit.pipeline import ALL_CONFIGS, add_comparison_arguments, decoding_from, train_and_compare


def main(argv=None) -> int:
    parser = ArgParser(prog="evaluate_models.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_comparison_arguments(parser, "outputs/five_way", from_base=True)
    for name in ALL_CONFIGS[1:]:
        parser.add_argument(f"--{name.replace('_', '-')}", metavar="RUN_DIR", default=None,
                            help=f"an existing {name} run folder (holding actor/) to use instead of training")
    parser.add_argument("--configs", nargs="+", default=list(ALL_CONFIGS), choices=ALL_CONFIGS,
                        help="which configurations to compare [default: all five]")

    def run():
        args = parser.parse_args(argv)
        given = {n: getattr(args, n) for n in ALL_CONFIGS[1:] if getattr(args, n)}
        train_and_compare(args.configs, args.out, args.max_steps, args.prompts, args.max_new_tokens, args.model,
                          args.dataset, given=given, reuse=args.reuse, seed=args.seed, test_size=args.test_size,
                          overwrite=args.overwrite, decoding=decoding_from(args),
                          eval_dataset=args.eval_dataset)

    return guarded(run)


if __name__ == "__main__":
    sys.exit(main())

"""DPO on the embedded defaults with the default config, no arguments.

    python benchmarking/benchmarking_dpo.py

Trains, then prints, for a few held-out prompts, the dataset's chosen and rejected answers next to
the base model's and the fine-tuned model's greedy answers, and the final held-out metrics. The run
folder goes under outputs/benchmark_dpo/.
"""

import sys

from alignkit.errors import UserError
from alignkit.showcase import train_and_show


def main() -> int:
    if len(sys.argv) > 1:
        print("benchmarking_dpo.py takes no arguments; use 'alignkit dpo --help' for a configurable run", file=sys.stderr)
        return 2
    try:
        train_and_show("dpo")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DPO on the embedded defaults with the default config, no arguments.

    python benchmarking/benchmarking_dpo.py

Trains, then prints, for a few held-out prompts, the dataset's chosen and rejected answers next to
the base model's and the fine-tuned model's greedy answers, and the final held-out metrics. The run
folder goes under outputs/benchmark_dpo/.
"""

import sys

from alignkit.showcase import script_main

if __name__ == "__main__":
    sys.exit(script_main("dpo", sys.argv[1:]))

"""Fine-tune with SFT or DPO (+NLL) from the command line; the same command as ``alignkit``.

    python demos/llm/demo_llm_finetuning.py sft --save-path outputs/sft --no-timestamp
    python demos/llm/demo_llm_finetuning.py dpo --save-path outputs/dpo --no-timestamp
    python demos/llm/demo_llm_finetuning.py dpo --load-path outputs/sft/actor --save-path outputs/sft_dpo --no-timestamp
    python demos/llm/demo_llm_finetuning.py sft --eval --load-path outputs/sft/actor

Run with --help for every flag.
"""

import sys

from alignkit.cli import main

if __name__ == "__main__":
    sys.exit(main())

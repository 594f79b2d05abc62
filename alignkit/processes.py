"""Several processes through Hugging Face accelerate: who does what, and how they agree.

``accelerate launch`` (or ``torchrun``) starts one process per device; each process builds an
``Accelerator`` here, takes its share of every batch, and the gradients are averaged by
accelerate's DDP wrapper. Only the main process writes files or prints progress. One process is
the plain PyTorch path: no accelerator is built and nothing here costs anything.
"""

from __future__ import annotations

import os

import torch

from .errors import UserError


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 when run directly)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """Whether this process is the one that writes and prints (global rank 0)."""
    return os.environ.get("RANK", "0") == "0"


def make_accelerator(device: str = "auto"):
    """An ``accelerate.Accelerator`` for a multi-process launch, or None in a single process.

    CPU processes (``--device cpu``: asked for, never a silent fallback) talk over gloo; GPU
    processes each take the device accelerate gives them. Only data parallelism (DDP) is driven by alignkit's training step:
    an FSDP or DeepSpeed launch is refused with one line.
    """
    if launched_processes() <= 1:
        return None
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    processes = launched_processes()
    # accelerate's launcher says what a config asks for in the environment. Checked before anything
    # else: with --device cpu accelerate would build plain CPU processes and train DDP silently.
    asked = [name for flag, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
                                     ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM"))
             if os.environ.get(flag, "").strip().lower() in ("1", "true", "yes")]
    if asked:
        raise UserError(f"this launch asks for {asked[0]}; alignkit trains with data parallelism (DDP) only: "
                        "use a DDP config (configs/accelerate/ddp*.yaml)")
    if device in (None, "auto") and not torch.cuda.is_available():
        raise UserError(f"accelerate launched {processes} processes but this machine has no CUDA device; for CPU "
                        "processes pass --device cpu (see configs/accelerate/ddp_cpu.yaml)")
    if str(device).startswith("cuda:"):
        raise UserError(f"--device {device} names one GPU; under accelerate launch each process gets its own: "
                        "use --device auto or cuda")
    try:
        accelerator = Accelerator(cpu=device == "cpu")
    except (RuntimeError, ValueError) as exc:  # e.g. a GPU-only launch (FSDP, DeepSpeed) with no GPU here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"accelerate could not start {processes} processes: {first}") from None
    supported = (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    if accelerator.distributed_type not in supported:
        raise UserError(f"accelerate launched a {accelerator.distributed_type.value} run; alignkit trains with "
                        "data parallelism (DDP) only: use a DDP config (configs/accelerate/ddp*.yaml)")
    return accelerator


def broadcast_from_main(value, accelerator):
    """``value`` as the main process has it, on every process (a picklable object)."""
    if accelerator is None:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def gather_dicts(part: dict, accelerator) -> dict:
    """The union of every process's ``part`` (a picklable dict), on every process."""
    if accelerator is None:
        return part
    from accelerate.utils import gather_object

    merged: dict = {}
    for piece in gather_object([part]):
        merged.update(piece)
    return merged

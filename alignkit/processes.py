"""Several processes through Hugging Face accelerate: who does what, and how they agree.

``accelerate launch`` (or ``torchrun``) starts one process per device; each process builds an
``Accelerator`` here, takes its share of every batch, and the gradients are averaged by
accelerate's DDP wrapper, or reduce-scattered by its FSDP2 wrapper, which also shards the weights
(a launch is *sharded* then). Only the main process writes files or prints progress. One process is
the plain PyTorch path: no accelerator is built and nothing here costs anything.

Sharded processes must run every forward together (each gathers the weights from all of them), so
a forward one process may skip (a cached reference, an uneven share of the held-out rows) is
agreed first (:func:`any_process`), and weights are gathered whole before they are written
(:func:`full_tensor`) and sharded again when read (:func:`shard_like`).
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
    processes each take the device accelerate gives them. alignkit's training step runs under
    data parallelism (DDP) and under FSDP2 (``fsdp_version: 2``, which accelerate builds on GPUs);
    FSDP1, DeepSpeed and Megatron-LM launches are refused with one line.
    """
    if launched_processes() <= 1:
        return None
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    processes = launched_processes()
    # accelerate's launcher says what a config asks for in the environment. Checked before anything
    # else: with --device cpu accelerate would build plain CPU processes and train DDP silently.
    asked = [name for flag, name in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
                                     ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")) if _flag(flag)]
    if asked:
        raise UserError(f"this launch asks for {asked[0]}; alignkit trains with DDP or FSDP2: use a config from "
                        "configs/accelerate/")
    if _flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1").strip() != "2":
        raise UserError("this launch asks for FSDP version 1; alignkit shards with FSDP2: set fsdp_version: 2 in "
                        "the config's fsdp_config (see configs/accelerate/fsdp_gpu.yaml)")
    if _flag("ACCELERATE_USE_FSDP"):
        unwired = [name for flag, name in (
            ("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params: true (weights kept on the CPU between uses)"),
            ("FSDP_ACTIVATION_CHECKPOINTING", "fsdp_activation_checkpointing: true (use --gradient-checkpointing "
                                              "instead)")) if _flag(flag)]
        if unwired:
            raise UserError(f"this FSDP launch asks for {unwired[0]}, which alignkit's step does not run under; "
                            "drop it from the config")
    if device in (None, "auto") and not torch.cuda.is_available():
        raise UserError(f"accelerate launched {processes} processes but this machine has no CUDA device; for CPU "
                        "processes pass --device cpu (see configs/accelerate/ddp_cpu.yaml)")
    if str(device).startswith("cuda:"):
        raise UserError(f"--device {device} names one GPU; under accelerate launch each process gets its own: "
                        "use --device auto or cuda")
    from accelerate.utils import DistributedDataParallelKwargs

    try:
        # DDP would broadcast the model's buffers (rotary frequencies, the same in every process) at
        # every forward, a collective: processes with unequal shares of the held-out rows, which run
        # unequal numbers of no-grad forwards, would then pair mismatched collectives.
        accelerator = Accelerator(cpu=device == "cpu",
                                  kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    except (RuntimeError, ValueError) as exc:  # e.g. a GPU-only launch with no GPU here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"accelerate could not start {processes} processes: {first}") from None
    kind = accelerator.distributed_type
    if _flag("ACCELERATE_USE_FSDP") and kind != DistributedType.FSDP:
        # accelerate builds FSDP for GPU processes only; CPU processes come back as plain DDP
        raise UserError("this launch asks for FSDP, which accelerate runs on GPUs only, with --device cpu; for CPU "
                        "processes use configs/accelerate/ddp_cpu.yaml")
    if kind not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.FSDP):
        raise UserError(f"accelerate launched a {kind.value} run; alignkit trains with DDP or FSDP2: use a config "
                        "from configs/accelerate/")
    return accelerator


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def is_sharded(accelerator) -> bool:
    """Whether ``accelerator``'s processes shard the weights (FSDP), so every forward is a collective."""
    if accelerator is None:
        return False
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def any_process(flag: bool, accelerator) -> bool:
    """Whether ``flag`` holds in any process (every process must call this together; plain ``flag`` alone)."""
    return most_over_processes(int(flag), accelerator) > 0


def most_over_processes(count: int, accelerator) -> int:
    """The largest ``count`` any process has (every process must call this together)."""
    if accelerator is None or accelerator.num_processes == 1:
        return count
    device = accelerator.device
    return int(accelerator.gather(torch.tensor([count], device=device)).max().item())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a sharded one (a DTensor of FSDP2) gathered from every process, others as they are.

    Gathering is a collective: every process calls this for the same tensors in the same order.
    """
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of ``tensor`` (a DTensor of FSDP2), or ``tensor`` itself; no communication."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def shard_like(like: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out as ``like`` is: sharded over the same processes when ``like`` is a DTensor
    (a collective), else on its device and dtype."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(whole.to(like.device, like.dtype), like.device_mesh, like.placements)
    return whole.to(like.device, like.dtype)


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

"""Several processes through Hugging Face accelerate: who does what, and how they agree.

``accelerate launch`` (or ``torchrun``) starts one process per device; each process builds an
``Accelerator`` here, takes its share of every batch, and the gradients are averaged by
accelerate's DDP wrapper, or reduce-scattered by its FSDP2 wrapper or DeepSpeed's ZeRO engine;
FSDP2 and ZeRO-3 also shard the weights (a launch is *sharded* then). Only the main process writes
files or prints progress. One process is the plain PyTorch path: no accelerator is built and
nothing here costs anything.

Sharded processes must run every forward together (each gathers the weights from all of them), so
a forward one process may skip (a cached reference, an uneven share of the held-out rows) is
agreed first (:func:`any_process`), and weights are gathered whole before they are written
(:func:`full_tensor`) and sharded again when read (:func:`shard_like`).
"""

from __future__ import annotations

import contextlib
import importlib.util
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


@contextlib.contextmanager
def main_process_first():
    """Run the block in process 0 first, then in the others (every process enters it); plain in one process
    or before the processes have connected."""
    if launched_processes() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        from accelerate import PartialState

        with PartialState().main_process_first():
            yield
    else:
        yield


def no_forward_buffer_sync():
    """accelerate's DDP options with the buffers left unsynchronised at each forward. DDP would broadcast
    the model's buffers (rotary frequencies, the same in every process) at every forward, a collective:
    processes with unequal shares of the held-out rows, which run unequal numbers of no-grad forwards,
    would then pair mismatched collectives. torch 2.13 names the option ``forward_sync_buffers`` (its
    old name, ``broadcast_buffers``, warns in every process) and accelerate passes on only the old one,
    so on such a torch the handler hands DDP the new name; older torch knows only the old one."""
    import inspect

    from accelerate.utils import DistributedDataParallelKwargs

    handler = DistributedDataParallelKwargs(broadcast_buffers=False)
    if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters:
        kwargs = {k: v for k, v in handler.to_kwargs().items() if k != "broadcast_buffers"}
        handler.to_kwargs = lambda: {**kwargs, "forward_sync_buffers": False}   # accelerate maps handlers by class
    return handler


def make_accelerator(device: str = "auto"):
    """An ``accelerate.Accelerator`` for a multi-process launch, or None in a single process.

    CPU processes (``--device cpu``: asked for, never a silent fallback) talk over gloo; GPU
    processes each take the device accelerate gives them. alignkit's training step runs under
    data parallelism (DDP), under FSDP2 (``fsdp_version: 2``) and under DeepSpeed ZeRO stages 1 to 3
    (both of which accelerate builds on GPUs); FSDP1, ZeRO stage 0, Megatron-LM, and the options the
    step does not run under, are refused with one line.
    """
    if launched_processes() <= 1:
        return None
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    processes = launched_processes()
    # accelerate's launcher says what a config asks for in the environment. Checked before anything
    # else: with --device cpu accelerate would build plain CPU processes and train DDP silently.
    if _flag("ACCELERATE_USE_MEGATRON_LM"):
        raise UserError("this launch asks for Megatron-LM; alignkit trains with DDP, FSDP2 or DeepSpeed ZeRO: use a "
                        "config from configs/accelerate/")
    if _flag("ACCELERATE_USE_DEEPSPEED") and importlib.util.find_spec("deepspeed") is None:
        raise UserError("this launch asks for DeepSpeed, which is not installed here: pip install 'alignkit[deepspeed]' "
                        "(or use a DDP or FSDP2 config from configs/accelerate/)")
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
    try:
        accelerator = Accelerator(cpu=device == "cpu", kwargs_handlers=[no_forward_buffer_sync()])
    except (RuntimeError, ValueError) as exc:  # e.g. a GPU-only launch with no GPU here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"accelerate could not start {processes} processes: {first}") from None
    kind = accelerator.distributed_type
    for flag, name, wanted in (("ACCELERATE_USE_FSDP", "FSDP", DistributedType.FSDP),
                               ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed", DistributedType.DEEPSPEED)):
        if _flag(flag) and kind != wanted:
            # accelerate builds FSDP and DeepSpeed for GPU processes only; CPU processes come back as plain DDP
            raise UserError(f"this launch asks for {name}, which accelerate runs on GPUs only, with --device cpu; "
                            "for CPU processes use configs/accelerate/ddp_cpu.yaml")
    if kind == DistributedType.DEEPSPEED:
        _check_deepspeed(accelerator.state.deepspeed_plugin)
    if kind not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.FSDP,
                    DistributedType.DEEPSPEED):
        raise UserError(f"accelerate launched a {kind.value} run; alignkit trains with DDP, FSDP2 or DeepSpeed ZeRO: "
                        "use a config from configs/accelerate/")
    return accelerator


def _check_deepspeed(plugin) -> None:
    """Refuse, in one line, the DeepSpeed settings alignkit's step does not run under.

    The step accumulates its own micro-batches (``--micro-batch-size``), keeps the weights in
    ``--dtype`` with float32 Adam moments, clips with ``--max-grad-norm`` and adds the adapter to a
    loaded base; a config that hands any of these to DeepSpeed would change the run quietly.
    """
    config = plugin.deepspeed_config
    zero = config.get("zero_optimization", {}) or {}
    stage = _zero_stage(config)
    problems = []
    if stage == 0:
        problems.append("ZeRO stage 0 (plain data parallelism: use configs/accelerate/ddp_gpu.yaml)")
    if stage >= 3 and getattr(plugin, "zero3_init_flag", False):
        problems.append("zero3_init_flag: true (alignkit loads the base, adds the adapter, then DeepSpeed "
                        "partitions both)")
    for key in ("offload_optimizer", "offload_param"):
        device = str((zero.get(key) or {}).get("device", "none")).lower()
        if device not in ("none", "auto"):
            problems.append(f"{key} to {device}")
    steps = config.get("gradient_accumulation_steps", "auto")
    if steps not in ("auto", None, 1, "1"):
        problems.append(f"gradient_accumulation_steps: {steps} (use --micro-batch-size for that)")
    for precision in ("fp16", "bf16"):
        if (config.get(precision) or {}).get("enabled") in (True, "true"):
            problems.append(f"{precision} mixed precision (use --dtype)")
    if problems:
        raise UserError(f"this DeepSpeed launch asks for {problems[0]}, which alignkit's step does not run under; "
                        "use configs/accelerate/zero2_gpu.yaml or zero3_gpu.yaml, or drop it from the config")


def _zero_stage(config: dict) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0) or 0)


def deepspeed_stage(accelerator) -> int:
    """The ZeRO stage of a DeepSpeed ``accelerator`` (0 for any other)."""
    return _zero_stage(accelerator.state.deepspeed_plugin.deepspeed_config) if is_deepspeed(accelerator) else 0


def is_deepspeed(accelerator) -> bool:
    """Whether ``accelerator`` runs DeepSpeed, whose engine steps the optimizer and keeps its moments
    partitioned over the processes."""
    if accelerator is None:
        return False
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def prepare_deepspeed(accelerator, micro_rows: int, max_grad_norm: float) -> None:
    """Fill the DeepSpeed config with the step alignkit runs, before ``accelerator.prepare``: ``micro_rows``
    rows per process and backward, gradient accumulation kept by alignkit (DeepSpeed sees one step per
    micro-batch boundary alignkit marks), clipping at ``max_grad_norm`` (0 = none)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    clipping = config.get("gradient_clipping", "auto")
    if clipping not in ("auto", None) and float(clipping) != float(max_grad_norm):
        raise UserError(f"the DeepSpeed config clips at gradient_clipping: {clipping} but this run at --max-grad-norm "
                        f"{max_grad_norm}; drop it from the config (alignkit sets it from --max-grad-norm)")
    config.update(train_micro_batch_size_per_gpu=micro_rows, gradient_accumulation_steps=1,
                  train_batch_size=micro_rows * accelerator.num_processes, gradient_clipping=float(max_grad_norm))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def is_sharded(accelerator) -> bool:
    """Whether ``accelerator``'s processes shard the weights (FSDP, ZeRO-3), so every forward is a collective."""
    if accelerator is None:
        return False
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP or deepspeed_stage(accelerator) >= 3


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
    """This process's shard of ``tensor`` (a DTensor of FSDP2, a ZeRO-3 partitioned parameter), or ``tensor``
    itself; no communication."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.to_local()
    return tensor.ds_tensor if hasattr(tensor, "ds_id") else tensor


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

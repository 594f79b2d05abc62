"""Several processes through accelerate: 2 CPU processes (gloo, accelerate's launcher) train like 1,
data-parallel (DDP), sharded (FSDP2) and with DeepSpeed ZeRO-2's and ZeRO-3's partitions."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from alignkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demos" / "llm" / "demo_llm_finetuning.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")

# The command line with one rank failing at its first step: the other must not wait forever.
FAILING_RANK = """
import os, sys
import alignkit.agents as agents
def fail(self, batch):
    if os.environ.get("RANK") == "1":
        raise RuntimeError("forced failure in rank 1")
    return learn(self, batch)
learn = agents.LLMAgent.learn
agents.LLMAgent.learn = fail
from alignkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


# The command line with process 0 slow to start: another process finds a mistake first and exits, and
# the launcher must not stop process 0 before it has said what the mistake is.
SLOW_MAIN = """
import os, sys, time
if os.environ.get("RANK") == "0":
    time.sleep(4)
from alignkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


# accelerate builds FSDP and DeepSpeed for GPU processes only (CPU ones come back as plain DDP). This
# entry point lets their paths run on the CPU processes the launcher starts (FSDP2: fully_shard of each
# decoder layer and the root, sharded optimizer; DeepSpeed: its plugin and config, deepspeed.initialize,
# ZeRO's partitioned optimizer and weights), so alignkit's step is checked under them without GPUs.
ON_CPU = """
import os, sys
import accelerate.state as state
from accelerate.utils import DistributedType
init = state.AcceleratorState.__init__
def on_cpu(self, *args, **kwargs):
    init(self, *args, **kwargs)
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    if os.environ.get("ACCELERATE_USE_FSDP") == "true":
        self.distributed_type = state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = kwargs["fsdp_plugin"]
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        self.distributed_type = state.PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
        plugin = kwargs["deepspeed_plugin"]
        plugin.set_mixed_precision(self._mixed_precision)
        plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = plugin
state.AcceleratorState.__init__ = on_cpu
import alignkit.train as train
from alignkit.processes import is_sharded
make = train.make_accelerator
def make_and_tell(device):
    accelerator = make(device)
    if accelerator.is_main_process:
        print("distributed:", accelerator.distributed_type.value, "sharded:", is_sharded(accelerator), flush=True)
    return accelerator
train.make_accelerator = make_and_tell
from alignkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


# The command line with DDP's per-forward broadcast of the model's buffers made an error: a no-grad
# forward must not be a collective, since processes with unequal held-out shares run unequal numbers.
NO_FORWARD_COLLECTIVE = """
import sys
import torch.nn.parallel.distributed as ddp
def sync(self):
    raise RuntimeError("DDP synchronised buffers in a forward")
ddp.DistributedDataParallel._sync_buffers = sync
from alignkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script_args, timeout=240, env=None, config="ddp_cpu.yaml"):
    # a shipped config, as a user runs it, on 2 processes (a free port so tests never collide)
    cmd = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "configs" / "accelerate" / config),
           "--num_processes", "2", "--main_process_port", str(_free_port()), *script_args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _flags(model_dir, data, out, *extra):
    return ["--model", str(model_dir), "--dataset", str(data), "--save-path", str(out), "--no-timestamp",
            "--max-steps", "3", "--batch-size", "4", "--max-length", "64", "--test-size", "9", "--lr", "1e-2",
            "--eval-interval", "2", "--no-plot", "--device", "cpu", *extra]


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", ["sft", "dpo"])
@pytest.mark.parametrize("layout", ["ddp", "fsdp2", "zero2", "zero3"])
def test_two_processes_train_the_same_adapter_as_one(algo, layout, tiny_model_dir, rows_file, tmp_path, monkeypatch):
    # 9 held-out rows: shares of 5 and 4, so one process evaluates a batch more than the other
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache-one"))
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([algo, *_flags(tiny_model_dir, rows_file, one)]) == 0
    env = {**os.environ, "ALIGNKIT_CACHE": str(tmp_path / "cache-two")}
    script, config = tmp_path / "on_cpu.py", {"ddp": "ddp_cpu.yaml", "fsdp2": "fsdp_gpu.yaml"}.get(
        layout, f"{layout}_gpu.yaml")
    script.write_text(ON_CPU)
    proc = _launch([str(script), algo, *_flags(tiny_model_dir, rows_file, two, "--save-interval", "1",
                                               "--keep-checkpoints", "3")], env=env, config=config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kind = {"ddp": "MULTI_CPU", "fsdp2": "FSDP"}.get(layout, "DEEPSPEED")
    assert f"distributed: {kind} sharded: {layout in ('fsdp2', 'zero3')}" in proc.stdout
    assert proc.stdout.count("adapter saved to") == 1   # one process speaks for all
    _assert_same(one, two)
    if algo == "dpo":   # the reference cache is written once, by the main process, with every pair
        shards = list((tmp_path / "cache-two" / "reference_logps").glob("*/*.json"))
        assert len({shard.name.split("-")[0] for shard in shards}) == 1   # one writer (shards are <pid>-...)
        stores = {}
        for shard in shards:
            stores.setdefault(shard.parent, []).append(json.loads(shard.read_text())["entries"])
        # the reference's store: every pair once; the finished adapter's: the final eval's 9 held-out pairs,
        # from both processes' shares
        sizes = sorted((len(set().union(*entries)), sum(map(len, entries))) for entries in stores.values())
        assert sizes == [(9, 9), (9 + 3 * 4, 9 + 3 * 4)]
        # a crash after checkpoint-2, resumed by 2 processes, ends where 1 uninterrupted process does
        for name in ("actor", "checkpoint-3"):
            shutil.rmtree(two / name)
        (two / "training_state.json").unlink()
        proc = _launch([str(script), algo, "--resume", str(two)], env=env, config=config)
        assert proc.returncode == 0 and "resuming at step 2 of 3" in proc.stdout, proc.stderr[-3000:]
        _assert_same(one, two)


def _assert_same(one, two):
    a = load_file(str(one / "actor" / "adapter_model.safetensors"))
    b = load_file(str(two / "actor" / "adapter_model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    ra, rb = _records(one), _records(two)
    assert [(r["step"], r["split"]) for r in ra] == [(r["step"], r["split"]) for r in rb]   # written once
    for x, y in zip(ra, rb, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-4, (x, y)
        assert x["tokens"] == y["tokens"]   # every process's share is counted


def test_bad_launches_are_one_line_and_no_process_waits_forever(tiny_model_dir, rows_file, tmp_path):
    proc = _launch([str(DEMO), "sft", *_flags(tiny_model_dir, rows_file, tmp_path / "odd", "--batch-size", "3")])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and errors == [
        "error: --batch-size 3 does not split evenly over 2 processes; give a multiple of 2"]
    slow = tmp_path / "slow_main.py"   # the other process finds the mistake first: still said, once
    slow.write_text(SLOW_MAIN)
    proc = _launch([str(slow), "sft", *_flags(tiny_model_dir, rows_file, tmp_path / "gpu")[:-2]])   # no --device
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and errors == [
        "error: accelerate launched 2 processes but this machine has no CUDA device; for CPU processes pass "
        "--device cpu (see configs/accelerate/ddp_cpu.yaml)"], proc.stderr[-3000:]
    proc = _launch([str(DEMO), "sft", "--eval", "--load-path", str(tmp_path)])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and errors == [
        "error: --eval is an interactive chat for one process; run it without accelerate launch"]
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK)
    proc = _launch([str(script), "sft", *_flags(tiny_model_dir, rows_file, tmp_path / "fail")], timeout=180)
    assert proc.returncode != 0 and "forced failure in rank 1" in proc.stderr
    assert not (tmp_path / "fail" / "actor").exists()


@pytest.mark.parametrize("env, message", [
    ({"ACCELERATE_USE_MEGATRON_LM": "true"}, "this launch asks for Megatron-LM; alignkit trains with DDP, FSDP2 or "
                                             "DeepSpeed ZeRO"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "this launch asks for FSDP version 1; alignkit shards "
                                                            "with FSDP2: set fsdp_version: 2"),
    ({"ACCELERATE_USE_FSDP": "true"}, "this launch asks for FSDP version 1"),   # accelerate's default version
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"},
     "this FSDP launch asks for fsdp_offload_params: true (weights kept on the CPU between uses), which"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"},
     "this FSDP launch asks for fsdp_activation_checkpointing: true (use --gradient-checkpointing instead)"),
])
@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_launches_alignkit_does_not_train_are_refused_before_any_process_group(env, message, device, monkeypatch):
    # what accelerate's launcher sets for such a config; refused before the processes connect, and never
    # trained as DDP instead
    from alignkit.errors import UserError
    from alignkit.processes import make_accelerator

    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=f"^{re.escape(message)}"):
        make_accelerator(device)


def test_ddp_forwards_are_not_collectives_so_unequal_held_out_shares_are_safe(tiny_model_dir, rows_file, tmp_path):
    # 9 held-out rows over 2 processes: 2 evaluation batches of 4 rows in one, 1 in the other
    script = tmp_path / "no_forward_collective.py"
    script.write_text(NO_FORWARD_COLLECTIVE)
    env = {**os.environ, "ALIGNKIT_CACHE": str(tmp_path / "cache")}
    proc = _launch([str(script), "sft", *_flags(tiny_model_dir, rows_file, tmp_path / "out", "--max-steps", "1")],
                   env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final eval" in proc.stdout
    assert "broadcast_buffers" not in proc.stderr   # torch's deprecation of the option's old name, once per process


@pytest.mark.parametrize("command", [["pipeline"], ["plot", "outputs"], ["export", "--load-path", "x", "--out", "y"]])
def test_commands_of_one_process_are_refused_under_a_launch(command, monkeypatch, capsys):
    # every process would run the whole command and write the same files
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(command) == 2
    assert capsys.readouterr().err == (f"error: alignkit {command[0]} runs in one process; under accelerate launch "
                                       "only sft and dpo train (run it without accelerate launch)\n")


@pytest.mark.parametrize("config, name", [("fsdp_gpu.yaml", "FSDP"), ("zero2_gpu.yaml", "DeepSpeed")])
def test_an_fsdp_or_deepspeed_launch_of_cpu_processes_is_refused_not_trained_as_ddp(config, name, tiny_model_dir,
                                                                                    rows_file, tmp_path):
    # accelerate itself would quietly build plain CPU (DDP) processes from such a config with --device cpu
    proc = _launch([str(DEMO), "sft", *_flags(tiny_model_dir, rows_file, tmp_path / "out")], config=config)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and errors == [
        f"error: this launch asks for {name}, which accelerate runs on GPUs only, with --device cpu; for CPU "
        "processes use configs/accelerate/ddp_cpu.yaml"]
    assert not (tmp_path / "out").exists()


def test_a_deepspeed_launch_without_deepspeed_installed_is_one_line(monkeypatch):
    import importlib.util

    from alignkit.errors import UserError
    from alignkit.processes import make_accelerator

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match=r"^this launch asks for DeepSpeed, which is not installed here: pip install "
                                        r"'alignkit\[deepspeed\]'"):
        make_accelerator("cpu")


@pytest.mark.parametrize("config, message", [
    ({"zero_optimization": {"stage": 0}}, "ZeRO stage 0 (plain data parallelism: use configs/accelerate/ddp_gpu.yaml)"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer to cpu"),
    ({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4},
     "gradient_accumulation_steps: 4 (use --micro-batch-size for that)"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, "bf16 mixed precision (use --dtype)"),
])
def test_deepspeed_settings_the_step_does_not_run_under_are_refused(config, message):
    from types import SimpleNamespace

    from alignkit.errors import UserError
    from alignkit.processes import _check_deepspeed

    with pytest.raises(UserError, match=f"^this DeepSpeed launch asks for {re.escape(message)}"):
        _check_deepspeed(SimpleNamespace(deepspeed_config=config))
    with pytest.raises(UserError, match="^this DeepSpeed launch asks for zero3_init_flag: true"):
        _check_deepspeed(SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 3}}, zero3_init_flag=True))
    for stage in (1, 2, 3):   # accepted
        _check_deepspeed(SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}, "bf16": {
            "enabled": "auto"}, "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}))


def test_deepspeed_is_told_the_step_alignkit_runs():
    from types import SimpleNamespace

    from alignkit.errors import UserError
    from alignkit.processes import prepare_deepspeed

    config = {"zero_optimization": {"stage": 2}, "gradient_clipping": "auto"}
    accelerator = SimpleNamespace(num_processes=2, state=SimpleNamespace(
        deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))
    prepare_deepspeed(accelerator, micro_rows=3, max_grad_norm=0.5)
    assert config == {"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5, "gradient_accumulation_steps": 1,
                      "train_micro_batch_size_per_gpu": 3, "train_batch_size": 6}
    config["gradient_clipping"] = 1.0   # a config's own clipping would quietly replace --max-grad-norm
    with pytest.raises(UserError, match=r"^the DeepSpeed config clips at gradient_clipping: 1.0 but this run at "
                                        r"--max-grad-norm 0.5"):
        prepare_deepspeed(accelerator, micro_rows=3, max_grad_norm=0.5)


def test_shipped_accelerate_configs_are_ddp_fsdp2_or_zero2_configs():
    from accelerate.commands.config.config_args import ClusterConfig

    paths = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
    assert [p.name for p in paths] == ["ddp_cpu.yaml", "ddp_gpu.yaml", "ddp_multinode.yaml", "fsdp_gpu.yaml",
                                       "zero2_gpu.yaml", "zero3_gpu.yaml"]
    for path in paths:
        config = ClusterConfig.from_yaml_file(str(path))
        assert config.num_processes >= 2
        if path.name.startswith("fsdp"):
            assert config.distributed_type.value == "FSDP" and config.fsdp_config["fsdp_version"] == 2
            assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        elif path.name.startswith("zero"):
            assert config.distributed_type.value == "DEEPSPEED"
            assert config.deepspeed_config["zero_stage"] == int(path.name[4])
            assert config.deepspeed_config["zero3_init_flag"] is False
            assert "gradient_accumulation_steps" not in config.deepspeed_config   # alignkit accumulates
            assert "gradient_clipping" not in config.deepspeed_config   # --max-grad-norm
        else:
            assert config.distributed_type.value == "MULTI_GPU"


def test_two_processes_on_a_cold_cache_convert_a_gguf_model_once(tokenizer, rows_file, tmp_path):
    # transformers writes a model from process 0 of a launch only: process 0 converts, the other waits and
    # reads its copy (before, the other wrote a folder without weights and one of them failed)
    from conftest import make_tiny_model

    from alignkit.gguf_export import write_gguf

    gguf, _ = write_gguf(make_tiny_model(len(tokenizer)), tokenizer, tmp_path / "tiny.gguf", quant="f32")
    env = {**os.environ, "ALIGNKIT_CACHE": str(tmp_path / "cold")}
    flags = _flags(gguf, rows_file, tmp_path / "out", "--max-steps", "1")
    proc = _launch([str(DEMO), "sft", *flags], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    converted = [f for f in (tmp_path / "cold" / "models").iterdir() if f.is_dir()]
    assert [f.name.split("-")[0] for f in converted] == ["tiny"]   # one folder, no temporary one left
    assert (converted[0] / "model.safetensors").is_file()
    assert (tmp_path / "out" / "actor" / "adapter_model.safetensors").is_file()


def test_a_mistake_only_another_process_finds_is_still_said(monkeypatch, capsys):
    # process 0 is fine (the launcher does not end this process): after its wait this one says it
    import alignkit.cliutil as cliutil
    from alignkit.errors import UserError

    def mistake():
        raise UserError("only process 1 sees this")

    waits = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(cliutil.time, "sleep", waits.append)
    assert cliutil.guarded(mistake) == 2
    assert waits == [cliutil.OTHERS_WAIT_S]
    assert capsys.readouterr().err == "error: only process 1 sees this\n"
    monkeypatch.setenv("RANK", "0")
    assert cliutil.guarded(mistake) == 2 and waits == [cliutil.OTHERS_WAIT_S]   # process 0 says it at once
    assert capsys.readouterr().err == "error: only process 1 sees this\n"

"""Data parallelism through accelerate: 2 CPU processes (gloo, accelerate's launcher) train like 1."""

import json
import os
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script_args, timeout=240, env=None):
    # the shipped config, as a user runs it (a free port so tests never collide)
    cmd = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "ddp_cpu.yaml"),
           "--main_process_port", str(_free_port()), *script_args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _flags(model_dir, data, out, *extra):
    return ["--model", str(model_dir), "--dataset", str(data), "--save-path", str(out), "--no-timestamp",
            "--max-steps", "3", "--batch-size", "4", "--max-length", "64", "--test-size", "6", "--lr", "1e-2",
            "--eval-interval", "2", "--no-plot", "--device", "cpu", *extra]


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", ["sft", "dpo"])
def test_two_processes_train_the_same_adapter_as_one(algo, tiny_model_dir, rows_file, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache-one"))
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([algo, *_flags(tiny_model_dir, rows_file, one)]) == 0
    env = {**os.environ, "ALIGNKIT_CACHE": str(tmp_path / "cache-two")}
    proc = _launch([str(DEMO), algo, *_flags(tiny_model_dir, rows_file, two, "--save-interval", "1",
                                             "--keep-checkpoints", "3")], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("adapter saved to") == 1   # one process speaks for all
    _assert_same(one, two)
    if algo == "dpo":   # the reference cache is written once, by the main process, with every pair
        shards = list((tmp_path / "cache-two" / "reference_logps").glob("*/*.json"))
        assert len({shard.name.split("-")[0] for shard in shards}) == 1   # one writer (shards are <pid>-...)
        stores = {}
        for shard in shards:
            stores.setdefault(shard.parent, []).append(json.loads(shard.read_text())["entries"])
        # the reference's store: every pair once; the finished adapter's: the final eval's 6 held-out pairs,
        # from both processes' shares
        sizes = sorted((len(set().union(*entries)), sum(map(len, entries))) for entries in stores.values())
        assert sizes == [(6, 6), (6 + 3 * 4, 6 + 3 * 4)]
        # a crash after checkpoint-2, resumed by 2 processes, ends where 1 uninterrupted process does
        for name in ("actor", "checkpoint-3"):
            shutil.rmtree(two / name)
        (two / "training_state.json").unlink()
        proc = _launch([str(DEMO), algo, "--resume", str(two)], env=env)
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
    proc = _launch([str(DEMO), "sft", *_flags(tiny_model_dir, rows_file, tmp_path / "gpu")[:-2]])   # no --device cpu
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and errors == [
        "error: accelerate launched 2 processes but this machine has no CUDA device; for CPU processes pass "
        "--device cpu (see configs/accelerate/ddp_cpu.yaml)"]
    proc = _launch([str(DEMO), "sft", "--eval", "--load-path", str(tmp_path)])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and errors == [
        "error: --eval is an interactive chat for one process; run it without accelerate launch"]
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK)
    proc = _launch([str(script), "sft", *_flags(tiny_model_dir, rows_file, tmp_path / "fail")], timeout=180)
    assert proc.returncode != 0 and "forced failure in rank 1" in proc.stderr
    assert not (tmp_path / "fail" / "actor").exists()


@pytest.mark.parametrize("flag, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_an_fsdp_or_deepspeed_launch_is_refused_not_trained_as_ddp(flag, name, device, monkeypatch):
    # what accelerate's launcher sets for such a config; with --device cpu, accelerate itself would
    # quietly build plain CPU processes (DDP) instead
    from alignkit.errors import UserError
    from alignkit.processes import make_accelerator

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(flag, "true")
    with pytest.raises(UserError, match=f"^this launch asks for {name}; alignkit trains with data parallelism"):
        make_accelerator(device)


def test_shipped_accelerate_configs_are_data_parallel_configs():
    from accelerate.commands.config.config_args import ClusterConfig

    paths = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
    assert [p.name for p in paths] == ["ddp_cpu.yaml", "ddp_gpu.yaml", "ddp_multinode.yaml"]
    for path in paths:
        config = ClusterConfig.from_yaml_file(str(path))
        assert config.distributed_type.value == "MULTI_GPU" and config.num_processes >= 2

"""The benchmark scripts refuse a bad output path (and other bad options) when their arguments are parsed:
exit code 2 and one error line, before any worker starts or any model loads."""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import pytest

from alignkit.cliutil import non_negative_float, output_file, output_folder, positive_float

ROOT = Path(__file__).resolve().parents[1]


def _script(monkeypatch, name: str):
    """``benchmarking/<name>`` loaded as a module, its sibling modules importable."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarking"))
    spec = importlib.util.spec_from_file_location(name[:-3], ROOT / "benchmarking" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _last_error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("script", ["bench_processes.py", "bench_population.py"])
def test_process_benchmarks_refuse_a_json_path_they_cannot_write_before_any_worker(monkeypatch, capsys, tmp_path,
                                                                                  script):
    module = _script(monkeypatch, script)
    monkeypatch.setattr(module, "run_worker", lambda *a, **k: pytest.fail("a worker started"))
    missing = tmp_path / "missing" / "r.json"
    for path, message in ((missing, f"{missing}: folder {missing.parent} does not exist"),
                          (tmp_path, f"{tmp_path} is a folder: give a file name inside it")):
        with pytest.raises(SystemExit) as stop:
            module.main(["--json", str(path)])
        assert stop.value.code == 2
        assert _last_error_line(capsys) == f"{script}: error: argument --json: {message}"
    assert list(tmp_path.iterdir()) == []   # nothing created


@pytest.mark.parametrize("script, prog", [("study_nll.py", "study_nll.py"), ("sweep_recipe.py", "sweep_recipe.py")])
def test_sweeps_refuse_an_out_folder_that_is_a_file(monkeypatch, capsys, tmp_path, script, prog):
    module = _script(monkeypatch, script)
    file = tmp_path / "taken"
    file.write_text("")
    assert module.main(["--out", str(file)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {prog}: argument --out: {file} cannot be written: {file} is a file, not a folder")


def test_gguf_comparison_checks_load_path_before_llama_cpp(monkeypatch, capsys, tmp_path):
    module = _script(monkeypatch, "bench_gguf_llamacpp.py")
    missing = tmp_path / "nope"
    assert module.main(["--load-path", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: bench_gguf_llamacpp.py: argument --load-path: {missing}: no such adapter folder")
    assert module.main(["--load-path", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: bench_gguf_llamacpp.py: argument --load-path: {tmp_path} "
                                               "is not a LoRA adapter folder: no adapter_config.json")


def test_gguf_comparison_without_llama_cpp_exits_2(monkeypatch, capsys):
    module = _script(monkeypatch, "bench_gguf_llamacpp.py")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else find_spec(name, *a))
    assert module.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("error: llama-cpp-python is not installed; to run this comparison: pip install "
                            "llama-cpp-python (compiles llama.cpp, ~6 minutes on 2 cores)\n")


def test_output_file_refuses_what_cannot_be_written_and_creates_nothing(monkeypatch, tmp_path):
    assert output_file(str(tmp_path / "r.json")) == tmp_path / "r.json"
    assert output_file("r.json") == Path("r.json")   # the current folder
    file = tmp_path / "f"
    file.write_text("")
    cases = [("", "empty path: give a file name"),
             (str(tmp_path), f"{tmp_path} is a folder: give a file name inside it"),
             (str(tmp_path / "a" / "r.json"), f"{tmp_path / 'a' / 'r.json'}: folder {tmp_path / 'a'} does not exist"),
             (str(file / "r.json"), f"{file / 'r.json'}: {file} is a file, not a folder")]
    for text, message in cases:
        with pytest.raises(argparse.ArgumentTypeError) as err:
            output_file(text)
        assert str(err.value) == message
    monkeypatch.setattr(os, "access", lambda *a, **k: False)   # as a user without write permission (root has it)
    with pytest.raises(argparse.ArgumentTypeError) as err:
        output_file(str(tmp_path / "r.json"))
    assert str(err.value) == f"{tmp_path / 'r.json'} cannot be written: no write permission on {tmp_path}"
    with pytest.raises(argparse.ArgumentTypeError) as err:
        output_folder(str(tmp_path / "new" / "deeper"))
    assert str(err.value) == f"{tmp_path / 'new' / 'deeper'} cannot be written: no write permission on {tmp_path}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.mark.parametrize("parse, text, message", [
    (positive_float, "0", "must be > 0 (got 0)"),
    (positive_float, "-1e-3", "must be > 0 (got -0.001)"),
    (positive_float, "nan", "must be a finite number (got 'nan')"),
    (positive_float, "inf", "must be a finite number (got 'inf')"),
    (non_negative_float, "-1", "must be >= 0 (got -1)"),
    (non_negative_float, "-inf", "must be a finite number (got '-inf')"),
    (non_negative_float, "x", "not a number: 'x'"),
])
def test_float_types_refuse_bad_values(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as err:
        parse(text)
    assert str(err.value) == message


def test_float_types_take_good_values():
    assert positive_float("5e-5") == 5e-5 and non_negative_float("0") == 0.0 and non_negative_float("1800") == 1800.0

"""Dependencies flow down: no import cycles, the library never imports the command line."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "alignkit"


def _graph() -> dict[str, set[str]]:
    """alignkit module -> the alignkit modules it imports anywhere in its code (functions included)."""
    mods = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {m: set() for m in mods}
    for m in mods:
        for node in ast.walk(ast.parse((PACKAGE / f"{m}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
                elif node.module and node.module.startswith("alignkit."):
                    names = [node.module.split(".")[1]]
                elif node.module == "alignkit":
                    names = [a.name for a in node.names]
                else:
                    continue
                graph[m] |= {n for n in names if n in mods and n != m}
    return graph


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_only_the_entry_points_import_the_command_line():
    importers = sorted(m for m, deps in _graph().items() if "cli" in deps)
    assert importers == []


def test_the_core_loads_without_command_line_or_plotting():
    code = ("import sys, alignkit.losses, alignkit.forward, alignkit.agents; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('alignkit.cli', 'alignkit.commands', "
            "'alignkit.pipeline', 'alignkit.plots', 'alignkit.report', 'matplotlib')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_import_alignkit_is_light_and_its_names_load_on_first_use():
    code = ("import sys, alignkit; light = 'torch' not in sys.modules; "
            "from alignkit import SFT, LoraConfig; print(light, SFT.__module__, LoraConfig.__module__.split('.')[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "alignkit.agents", "peft"]


def test_ctrl_c_while_the_command_line_loads_ends_with_one_line():
    import signal
    import time

    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); print('ready', flush=True); "
            "from alignkit.cli import main; print('loaded', flush=True); sys.exit(main(['--help']))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    time.sleep(0.2)   # inside torch's import, which takes seconds
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (130, "", "interrupted\n")

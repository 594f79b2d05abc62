"""Run a benchmark's worker in fresh processes and read back the JSON line it prints."""

from __future__ import annotations

import json
import subprocess
import sys


def run_worker(cmd: list[str], what: str, env: dict | None = None) -> dict:
    """Run ``cmd``; return the last JSON object line of its output, or exit with its error output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def bench_parser(doc: str, prog: str | None = None):
    """The options every process benchmark has: ``--algo``, ``--json`` (checked now: a path that cannot be
    written is refused before any worker starts), and the hidden ``--worker``; ``prog`` names the script in
    usage and error lines."""
    import argparse

    from alignkit.cliutil import output_file

    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", choices=("sft", "dpo"), default="sft")
    parser.add_argument("--json", type=output_file, default=None,
                        help="also write the results to this file (its folder must exist)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def save_results(path: str | None, algo: str, results: list[dict]) -> None:
    """Write ``{algo: results}`` as JSON to ``path`` when one was given."""
    if path:
        from pathlib import Path

        Path(path).write_text(json.dumps({algo: results}, indent=1))


def print_table(title: str, columns: list[tuple[str, int]], rows: list[list[str]]) -> None:
    """Print ``title``, then right-aligned ``columns`` (heading, width) and ``rows`` of cell texts."""
    print(title)
    for cells in ([c for c, _ in columns], *rows):
        print(" ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, columns, strict=True)))

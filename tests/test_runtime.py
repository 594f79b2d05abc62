"""The allocator setting: large blocks freed in one training step are reused in the next one."""

import json
import subprocess
import sys

import pytest

# Steps that each allocate three large "activations" and their "gradients", then free them all.
PROBE = r"""
import json, resource, sys, torch
from alignkit import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "1" else False
faults = []
for step in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    kept = [torch.ones(mb * 2**20 // 4) for mb in (40, 64, 100)]
    grads = [k * 2 for k in kept]
    del kept, grads
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def probe(tuned: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if tuned else "0"], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator settings are Linux-only")
def test_reuse_freed_memory_stops_page_faults_after_the_first_steps():
    pages_per_step = 2 * (40 + 64 + 100) * 2**20 // 4096  # 104448 pages of 4 KiB written per step
    plain, tuned = probe(False), probe(True)
    assert plain["applied"] is False and tuned["applied"] is True
    # glibc default: every large block is a fresh mapping, faulted in page by page in every step
    assert min(plain["faults"]) > pages_per_step * 0.9
    # reused: after the heap has grown in the first steps, later steps fault in (almost) nothing
    assert tuned["faults"][0] > pages_per_step * 0.9
    assert sum(tuned["faults"][2:]) < 0.25 * sum(plain["faults"][2:])


RELEASE = r"""
import json, torch
from pathlib import Path
from alignkit.runtime import release_freed_memory, reuse_freed_memory

def rss_mb():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024

reuse_freed_memory()
blocks = [torch.ones(100 * 2**20 // 4) for _ in range(4)]   # 400 MiB, from the heap
del blocks
kept = rss_mb()        # freed, but the heap keeps the pages
released = release_freed_memory()
print(json.dumps({"kept": kept, "after": rss_mb(), "released": released}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator settings are Linux-only")
def test_release_freed_memory_hands_a_finished_stage_pages_back():
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["released"] is True
    assert got["kept"] - got["after"] > 350, got   # the 400 MiB the stage freed left the process

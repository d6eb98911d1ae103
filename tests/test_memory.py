"""The C heap settings of softmerge.memory: the mmap threshold gate training pins."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from softmerge.errors import ConfigError
from softmerge.memory import DEFAULT_MMAP_THRESHOLD, MMAP_THRESHOLD_ENV, mmap_threshold_setting


def test_threshold_from_the_environment():
    assert mmap_threshold_setting({}) == DEFAULT_MMAP_THRESHOLD
    assert mmap_threshold_setting({MMAP_THRESHOLD_ENV: "1048576"}) == 1048576
    assert mmap_threshold_setting({MMAP_THRESHOLD_ENV: "off"}) is None
    # a user who tuned glibc directly keeps their setting
    assert mmap_threshold_setting({"MALLOC_MMAP_THRESHOLD_": "65536"}) is None
    assert mmap_threshold_setting({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}) is None
    assert mmap_threshold_setting({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == (
        DEFAULT_MMAP_THRESHOLD
    )


@pytest.mark.parametrize("raw", ["4MiB", "-5"])
def test_a_bad_threshold_names_the_variable(raw):
    with pytest.raises(ConfigError, match=f"{MMAP_THRESHOLD_ENV}='{raw}'"):
        mmap_threshold_setting({MMAP_THRESHOLD_ENV: raw})


# An 8 MiB tensor freed and made again, each time with a small survivor allocated after it:
# glibc's dynamic threshold moves the second one into the heap, where the survivor pins it.
# Anonymous memory only: the first calls of torch's kernels page in several MiB of its library's
# code (file-backed, more with more threads), which is not the heap this measures.
_SCENARIO = textwrap.dedent(
    """
    import torch
    from softmerge.memory import fix_mmap_threshold

    def rss_mib():
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("RssAnon"))
        return int(line.split()[1]) / 1024

    torch.set_num_threads(1)
    print(fix_mmap_threshold())
    survivors = []
    base = rss_mib()
    for _ in range(6):
        big = torch.ones(2**21)
        survivors.append(torch.ones(1024))
        del big
    print(rss_mib() - base)
    """
)


def _grown(setting: str) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}
    env[MMAP_THRESHOLD_ENV] = setting
    done = subprocess.run(
        [sys.executable, "-c", _SCENARIO], env=env, capture_output=True, text=True, check=True
    )
    applied, grown = done.stdout.split()
    return applied, float(grown)


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the mmap threshold is a glibc setting (read from /proc on Linux)",
)
def test_pinned_threshold_keeps_freed_tensors_out_of_the_heap():
    applied, grown = _grown(str(DEFAULT_MMAP_THRESHOLD))
    assert applied == str(DEFAULT_MMAP_THRESHOLD)
    assert grown < 4, f"8 MiB tensors stayed resident after free: +{grown:.1f} MiB"
    # the control: glibc's default (the setting off) keeps one of them, so the check can fail
    applied, grown = _grown("off")
    assert applied == "None"
    assert grown >= 7

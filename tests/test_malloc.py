"""`onspec serve` bounds glibc's allocator at start (apps/serve.py `bounded_malloc`): with its defaults a
server whose trainer runs on its own thread grew ~0.5 GB every 10 minutes (docs/results.md, the soak)."""

from __future__ import annotations

import ctypes.util
import sys

import pytest

from onspec.apps.serve import bounded_malloc

glibc = sys.platform.startswith("linux") and "libc.so.6" in (ctypes.util.find_library("c") or "")


@pytest.mark.skipif(not glibc, reason="glibc only: other C libraries keep their own allocator")
def test_glibc_takes_both_settings(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert bounded_malloc() is True


def test_an_allocator_set_by_the_environment_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert bounded_malloc() is False

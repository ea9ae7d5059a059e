"""Memory after loading (engine/heap.py): dropping read-only library pages from the resident set
shrinks it, keeps every written page, and leaves torch working. Each case runs in a fresh
interpreter: the drop acts on the whole process. (Every served test runs after the drop too: the
runner makes it at the end of its load.)"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")


def run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_drop_shrinks_the_file_backed_resident_set_and_torch_still_computes():
    out = run("""
        import torch
        from engine.heap import drop_unwritten_file_pages

        def rss_file():
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssFile"))

        x, w = torch.randn(5, 64), torch.randn(48, 64)
        before_y = torch.nn.functional.linear(x, w)
        before, dropped = rss_file(), drop_unwritten_file_pages()
        after = rss_file()
        y = torch.nn.functional.linear(x, w)
        print(before, dropped, after, bool(torch.equal(y, before_y)))
    """)
    before, dropped, after, same = out.split()
    before, dropped, after = int(before), int(dropped), int(after)
    assert dropped > 16 * 2**20  # torch's libraries alone map far more than this after import
    assert after <= before - dropped // 2  # the drop left the resident set (a few pages fault back at once)
    assert same == "True"


def test_drop_keeps_pages_written_before_a_mapping_became_read_only(tmp_path):
    """A private file mapping written and then made read-only (what the dynamic linker does to
    relocated data) holds the only copy of those bytes: it must stay mapped as written."""
    path = tmp_path / "data.bin"
    path.write_bytes(b"\0" * 8192)
    out = run(f"""
        import ctypes, mmap
        from engine.heap import drop_unwritten_file_pages

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        file = open({str(path)!r}, "rb")
        addr = libc.mmap(None, 8192, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, file.fileno(), 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        ctypes.memmove(addr, b"written", 7)
        assert libc.mprotect(addr, 8192, mmap.PROT_READ) == 0
        drop_unwritten_file_pages()
        print(ctypes.string_at(addr, 7).decode())
    """)
    assert out.strip() == "written"

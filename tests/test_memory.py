"""`hlm.memory`: a large buffer freed by a serving process goes back to the system, not into glibc's heap."""

import subprocess
import sys

import pytest

LIBC = """
import ctypes, mmap, sys

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
"""

PROBE = LIBC + """
from hlm.memory import return_large_buffers

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                        "fsmblks", "uordblks", "fordblks", "keepcost")]

libc.mallinfo2.restype = Info
if sys.argv[1] == "on":
    assert return_large_buffers()
libc.free(libc.malloc(8 << 20))  # glibc's default then raises its mapping threshold to 8 MiB
before = libc.mallinfo2().hblks
block = libc.malloc(2 << 20)
print(libc.mallinfo2().hblks - before)
libc.free(block)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_large_buffer_gets_its_own_mapping_after_the_call_and_not_before():
    def mapped(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout)

    assert mapped("off") == 0  # from the heap: freed, it stays in the process
    assert mapped("on") == 1  # its own mapping: freed, it is unmapped


TRIM_PROBE = LIBC + """
from hlm.memory import trim_heap

resident = lambda: int(open("/proc/self/statm").read().split()[1]) * mmap.PAGESIZE >> 20  # MiB
blocks = [libc.malloc(64 << 10) for _ in range(256)]  # 16 MiB of the heap (under the mapping threshold)
for block in blocks:
    ctypes.memset(block, 1, 64 << 10)  # resident
for block in blocks[:-1]:  # the last stays: the heap's top cannot shrink, so free() gives nothing back by itself
    libc.free(block)
before = resident()
print(int(trim_heap()), before - resident())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_trim_heap_hands_freed_heap_pages_back():
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, check=True)
    released, mib = out.stdout.split()
    assert released == "1" and int(mib) >= 12  # of the 16 MiB freed

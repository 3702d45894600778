"""`hlm.memory`: a large buffer freed by a serving process goes back to the system, not into glibc's heap."""

import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
from hlm.memory import return_large_buffers

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                        "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.mallinfo2.restype = [ctypes.c_void_p], Info
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

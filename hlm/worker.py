"""One thread for every model call of a serving process.

torch runs its CPU kernels on OpenMP (libgomp), and every thread that runs a parallel kernel keeps a team of worker
threads of its own. Once the process holds more of those threads than it has CPUs, libgomp stops spinning between
kernels (GOMP_SPINCOUNT's throttled value) and each kernel pays to wake its team. A decode step is hundreds of short
kernels, so that costs a fifth of the speed: on 2 cores, once a second thread had run torch, the int8 draft's
matrix-vector kernel took 0.23 ms against 0.12, the int4 one 0.45 against 0.35, and an `hlm` run of 96 tokens on the
embedded pair 19.8 s against 16.4 s. The dashboard therefore loads, decodes and scores on one long-lived thread, and
`serve-cloud` loads and verifies on one: no other thread of the process runs a model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class ModelThread:
    """A single thread that runs submitted calls in order; `call` from that thread itself runs at once (no
    deadlock when a model call makes another)."""

    def __init__(self, name: str = "hlm-models") -> None:
        # The thread holds its initializer: one that held `self` would keep the pool, and the thread with its
        # OpenMP team, alive after the owner is gone (a test suite makes many services).
        self._idents: list[int] = []
        idents = self._idents
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name,
                                        initializer=lambda: idents.append(threading.get_ident()))

    @property
    def here(self) -> bool:
        """Whether the caller is the model thread."""
        return threading.get_ident() in self._idents

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Queue `fn` behind what the thread is doing; its future."""
        return self._pool.submit(fn)

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()` on the thread: its result, or its exception raised here."""
        return fn() if self.here else self._pool.submit(fn).result()

    def shutdown(self) -> None:
        """Drop what is queued; the thread ends after its current call."""
        self._pool.shutdown(wait=False, cancel_futures=True)

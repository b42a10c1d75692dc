"""Quiet by default: the runtimes' own start-up lines are kept off the terminal unless ``edgeq -v``.

LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." from C++ straight to file descriptor 2,
with no environment variable or Python API to turn it off (tensorflow/tensorflow#58050), so ``runtime_lines``
catches that descriptor for the moment an interpreter is made and writes back every line but the known
informational ones: an error or warning of the runtime still shows. ``edgeq -v`` (EDGEQ_VERBOSE=1, so that child
processes follow) shows everything.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from typing import Iterator

VERBOSE_ENV = "EDGEQ_VERBOSE"
# held while descriptor 2 is caught, and by ``say``: another thread's log line waits for the moment instead of
# being caught (and split from its newline)
OUTPUT_LOCK = threading.RLock()
# LiteRT's informational lines at interpreter creation (delegate created, nodes replaced by the delegate)
RUNTIME_INFO = re.compile(r"^INFO: (Created TensorFlow Lite .*delegate for CPU\.|Replacing \d+ out of \d+ node)")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def set_verbose() -> None:
    os.environ[VERBOSE_ENV] = "1"
    os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)


@contextlib.contextmanager
def runtime_lines(drop: re.Pattern[str] = RUNTIME_INFO) -> Iterator[None]:
    """Hold what is written to descriptor 2 inside the block, then write it back without the lines ``drop``
    matches (nothing is held with ``edgeq -v``). edgeq's own lines (``say``) wait for the block to end."""
    if verbose():
        yield
        return
    with OUTPUT_LOCK, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [ln for ln in sink.read().decode(errors="replace").splitlines(keepends=True)
                    if not drop.match(ln)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def say(line: str) -> None:
    """One line of edgeq's own log on stderr, written whole (never caught by ``runtime_lines``)."""
    with OUTPUT_LOCK:
        sys.stderr.write(f"edgeq: {line}\n")
        sys.stderr.flush()

"""systemd's notify protocol (``sd_notify``) over the unix datagram socket in ``$NOTIFY_SOCKET``.

READY=1 once the model is loaded and the first frame is in; WATCHDOG=1 from the pipeline loop at half of
``$WATCHDOG_USEC``; STOPPING=1 on shutdown; STATUS= lines for ``systemctl status``. Without ``$NOTIFY_SOCKET``
(not under systemd) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET")
        self._socket: socket.socket | None = None
        self._address: str | bytes | None = None
        if address:
            if address.startswith("@"):  # abstract namespace
                self._address = "\0" + address[1:]
            else:
                self._address = address
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        enabled = usec and usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_interval = int(usec) / 2e6 if enabled else None
        self._last_watchdog = 0.0

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, *fields: str) -> bool:
        if self._socket is None or self._address is None:
            return False
        try:
            self._socket.sendto("\n".join(fields).encode(), self._address)
            return True
        except OSError:
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *( [f"STATUS={status}"] if status else []))

    def watchdog(self) -> None:
        """Send WATCHDOG=1 if half the watchdog interval has passed since the last one."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now - self._last_watchdog >= self.watchdog_interval:
            self._last_watchdog = now
            self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

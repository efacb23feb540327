"""A machine where nothing answers: a command in a network namespace of its own.

    unshare --net -- python tests/support/offline.py COMMAND ARGS…

brings the namespace's loopback up and runs the command there (it replaces this process).
Nothing listens on 127.0.0.1 in the new namespace — not the PostgreSQL on 5432 nor the Redis on
6379 that the rest of the suite uses — so the command meets a fresh machine. Other processes
join the namespace with `nsenter --net=/proc/PID/ns/net` (see `joined`).

Standard library only: it runs before any virtual environment (`uv run`) does.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import struct
import sys

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
_IFREQ = "16sH"  # struct ifreq: the interface name, then its flags


def loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack(_IFREQ, b"lo", 0)
        flags = struct.unpack(_IFREQ, fcntl.ioctl(sock, SIOCGIFFLAGS, request)[:18])[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | IFF_UP))


def available() -> str | None:
    """Why a private network namespace cannot be had here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating and entering a network namespace needs root"
    missing = [tool for tool in ("unshare", "nsenter") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (util-linux)"
    return None


def offline(command: list[str]) -> list[str]:
    """`command`, to be run in a network namespace of its own."""
    return ["unshare", "--net", "--", sys.executable, os.path.abspath(__file__), *command]


def joined(pid: int, command: list[str]) -> list[str]:
    """`command`, to be run in the network namespace of process `pid`."""
    return ["nsenter", f"--net=/proc/{pid}/ns/net", "--", *command]


if __name__ == "__main__":
    loopback_up()
    os.execvp(sys.argv[1], sys.argv[1:])

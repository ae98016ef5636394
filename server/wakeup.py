"""Waking the idle workers of this host the moment a job is queued, instead of at their next poll.

Each worker binds a Unix datagram socket in `<data_dir>/wake/`, named by its id, for as long as
it runs (`Waker`); once the API has committed a new job it sends one byte to every socket found
there (`nudge`). A worker waits for a nudge or `poll_interval`, whichever comes first, so the
poll stays: it is the fallback, and the only mechanism across hosts (a worker elsewhere has
another data dir). Workers spawned by `wan-vace serve` and `wan-vace worker` processes started
on the same data dir are found alike, with no state shared but the directory.

A nudge never slows down or fails a submit: it is non-blocking, every error is ignored (a
worker's full queue means it was nudged already), and the socket file of a worker that died
without removing it is removed by the first nudge that finds nobody listening. Linux and macOS
only (Windows is not a target).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import stat
from pathlib import Path

log = logging.getLogger("wan_vace.wakeup")

SUFFIX = ".sock"
# sun_path holds 108 bytes on Linux and 104 on macOS; a longer path is reached through the
# directory's file descriptor (`/proc/self/fd/N/name`, Linux).
_MAX_PATH = 100


def wake_dir(data_dir: Path) -> Path:
    # Absolute: the API and a worker started elsewhere must name the same directory.
    return Path(data_dir).absolute() / "wake"


class _Addresses:
    """Socket addresses of files in one directory, short enough for sun_path."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._fd: int | None = None

    def of(self, name: str) -> str:
        path = str(self.directory / name)
        if len(os.fsencode(path)) <= _MAX_PATH:
            return path
        if self._fd is None:
            self._fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        return f"/proc/self/fd/{self._fd}/{name}"

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _send(sock: socket.socket, addresses: _Addresses, name: str) -> bool:
    """One byte to the worker bound as `name`; whether it is there to wake up."""
    try:
        sock.sendto(b"\x01", addresses.of(name))
    except BlockingIOError:  # its queue is full: nudges are waiting for it already
        return True
    except ConnectionRefusedError:  # nobody listens: a worker that died without removing it
        path = addresses.directory / name
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                path.unlink()
        return False
    except OSError:  # gone meanwhile, another user's, ...: polling still finds the job
        return False
    return True


def nudge(data_dir: Path) -> int:
    """Wake every worker bound under `data_dir`; how many were reached. Never raises."""
    try:
        directory = wake_dir(data_dir)
        names = [n for n in os.listdir(directory) if n.endswith(SUFFIX)]
    except OSError:  # no worker ever ran on this host with this data dir
        return 0
    if not names:
        return 0
    addresses = _Addresses(directory)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            return sum(_send(sock, addresses, n) for n in names)
    except Exception:  # a nudge must never fail a submit
        log.debug("nudging the workers failed", exc_info=True)
        return 0
    finally:
        addresses.close()


class Waker:
    """A worker's end: a socket bound in the wake dir that nudges arrive on. Not thread-safe
    except `poke`, which any thread may call to end a `wait` (the worker stops)."""

    def __init__(self, data_dir: Path, name: str):
        directory = wake_dir(data_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.name = name + SUFFIX
        self.path = directory / self.name
        self._addresses = _Addresses(directory)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(FileNotFoundError):  # an earlier run's, under the same name
                self.path.unlink()
            self._sock.bind(self._addresses.of(self.name))
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            self._addresses.close()
            raise

    def drain(self) -> bool:
        """Take the nudges that arrived; whether there were any."""
        got = False
        while True:
            try:
                self._sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return got
            except OSError as e:  # closed by `close`: nothing more will come
                if e.errno in (errno.EBADF, errno.ENOTSOCK):
                    return got
                raise
            got = True

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a nudge; whether one came."""
        # poll, not select: select() refuses descriptors above FD_SETSIZE (1024), which a
        # long-lived process with many open files (or a test suite) reaches.
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        readable = poller.poll(max(0.0, timeout) * 1000)
        return bool(readable) and self.drain()

    def poke(self) -> None:
        """End a `wait` in progress (or the next one) at once."""
        addresses = _Addresses(self.path.parent)  # its own: `wait`'s thread may close ours
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                _send(sock, addresses, self.name)
        except OSError:
            pass
        finally:
            addresses.close()

    def unlink(self) -> None:
        """Remove the socket's file, so nudges stop coming (the process may exit at once now)."""
        with contextlib.suppress(OSError):
            self.path.unlink()

    def close(self) -> None:
        self.unlink()
        self._sock.close()
        self._addresses.close()

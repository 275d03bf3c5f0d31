"""The reverse-proxy recipe of docs/service.md, run as written (TLS and host names swapped for
loopback): nginx in front of two real `sgp serve` processes sharing one --tokens table. Every
request about a volume reaches the one server that holds it: a second check of each volume
finds it (no second upload), a run's status and result come from the server that ran it, and
the volumes are spread over both servers. Skipped where nginx is not installed."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from synthetic import synthetic_volume

from service.test_service import MODEL_ARGS, start_server
from SlicerSGP.service import protocol
from SlicerSGP.service.client import EngineClient
from SlicerSGP.service.token_table import table_line

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "proxy-" + "p" * 30
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
VOLUMES = 16

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install "
                                "nginx-light) to run the reverse-proxy recipe")


def recipe() -> str:
    """The nginx block of docs/service.md."""
    text = (ROOT / "docs" / "service.md").read_text()
    (block,) = re.findall(r"^```nginx\n(.*?)^```", text, re.M | re.S)
    return block


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginx_conf(folder: Path, backends: list[str], port: int) -> Path:
    block = recipe()
    servers = re.findall(r"^\s*server [\w.]+:\d+;\n", block, re.M)
    assert len(servers) == 2, block
    block = block.replace(servers[0], "".join(f"    server {b};\n" for b in backends))
    block = block.replace(servers[1], "")
    block = re.sub(r"listen 443 ssl;", f"listen 127.0.0.1:{port};", block)
    block = re.sub(r"^\s*(ssl_certificate\w*|server_name) .*\n", "", block, flags=re.M)
    assert "hash $http_x_sgp_volume consistent;" in block
    temp = "".join(f"{k}_temp_path {folder / k};\n" for k in
                   ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = folder / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers reach the test's folders
    conf.write_text(
        f"{user}daemon off;\npid {folder / 'nginx.pid'};\nerror_log {folder / 'error.log'};\n"
        "events {}\nhttp {\n"
        "log_format routed '$request_method $uri $http_x_sgp_volume $upstream_addr $status';\n"
        f"access_log {folder / 'access.log'} routed;\n{temp}{block}}}\n")
    return conf


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    folder = tmp_path_factory.mktemp("proxy")
    table = folder / "users.txt"
    table.write_text(table_line("alice", TOKEN) + "\n")
    servers = [start_server([*MODEL_ARGS, "--tokens", str(table)], folder / f"engine{i}.log")
               for i in range(2)]
    port = free_port()
    conf = nginx_conf(folder, [url.removeprefix("http://") for _, url in servers], port)
    nginx = subprocess.Popen([NGINX, "-p", str(folder), "-c", str(conf)],
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert nginx.poll() is None, nginx.stderr.read().decode()
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}", [url for _, url in servers], folder / "access.log"
    nginx.terminate()
    nginx.wait(10)
    for proc, _ in servers:
        proc.terminate()
        proc.wait(30)


def test_a_volumes_requests_reach_the_server_that_holds_it(proxied):
    url, backends, access_log = proxied
    client = EngineClient(url, TOKEN, timeout=60)
    volumes = [synthetic_volume(n=2, h=16, w=16, seed=100 + i)[0] for i in range(VOLUMES)]
    ids = [client.ensure_volume(v) for v in volumes]
    assert [client.ensure_volume(v) for v in volumes] == ids  # found: no second upload
    vol, lab = synthetic_volume(n=4, h=32, w=32, seed=7)
    drawn = np.zeros_like(lab)
    drawn[1] = lab[1]
    assert client.segment(vol, drawn, {1: "blob"}).labels.shape == vol.shape
    ids.append(protocol.volume_id(vol, None))
    held = [EngineClient(b, TOKEN).info()["volumes"]["count"] for b in backends]
    assert sum(held) == len(ids) and min(held) > 0, held  # each once; both servers used
    routes: dict[str, set[str]] = {}
    puts: dict[str, int] = {}
    for line in access_log.read_text().splitlines():
        method, path, volume, upstream, status = line.split(" ")
        if volume != "-":
            routes.setdefault(volume, set()).add(upstream)
            puts[volume] = puts.get(volume, 0) + (method == "PUT")
            assert status in ("200", "201", "202", "204", "404"), line
    assert set(routes) == set(ids)
    assert all(len(r) == 1 for r in routes.values()), routes
    assert all(n == 1 for n in puts.values()), puts

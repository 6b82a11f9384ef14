"""Quick TLS cost measurement (not part of the benchmark harness): server CPU per request and
per handshake, as ratios taken in one run on one machine.

    python -m benchmarks.tls_engine engines     # keep-alive HTTP/1 responder: plain,
                                                # uvloop's ssl= transport, fastmesh's engine
    python -m benchmarks.tls_engine proxy       # fastmesh (upstream behind it): plain vs TLS
    python -m benchmarks.tls_engine handshakes  # full handshakes/s: fastmesh vs Envoy

The server runs in its own process on uvloop; its CPU (user+system, /proc) is read around a
wrk run (keep-alive, 8 connections) or an `openssl s_time -new` run (a full handshake per
connection). Figures are CPU microseconds of the server per request / per handshake.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def _pki():
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from tlscerts import make_pki
    return make_pki(tempfile.mkdtemp(prefix="tlsbench-"))


# ------------------------------------------------------------------------ engines

class Responder(asyncio.BufferedProtocol):
    """Answers each request head with a fixed response (keep-alive)."""

    def __init__(self):
        self.buf = bytearray(65536)
        self.pending = b""

    def connection_made(self, transport):
        self.t = transport

    def get_buffer(self, n):
        return memoryview(self.buf)

    def buffer_updated(self, n):
        data = self.pending + bytes(self.buf[:n])
        k = data.count(b"\r\n\r\n")
        self.pending = data[data.rfind(b"\r\n\r\n") + 4:] if k else data
        if k:
            self.t.write(RESPONSE * k)

    def eof_received(self):
        return False


def serve(mode: str, port: int, cert: str, key: str) -> None:
    import uvloop
    from fastmesh._core.tls import TlsServerConfig
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    async def main():
        loop = asyncio.get_running_loop()
        if mode == "plain":
            await loop.create_server(Responder, "127.0.0.1", port)
        elif mode == "uvloop-ssl":
            await loop.create_server(Responder, "127.0.0.1", port, ssl=ctx)
        else:
            await loop.create_server(TlsServerConfig("bench", ctx).factory(Responder),
                                     "127.0.0.1", port)
        print("READY", flush=True)
        await asyncio.Event().wait()
    uvloop.run(main())


def _wrk(url: str, seconds: int = 4) -> int:
    out = subprocess.run(["wrk", "-t1", "-c8", f"-d{seconds}s", url], capture_output=True,
                         text=True).stdout
    m = re.search(r"(\d+) requests in", out)
    return int(m.group(1)) if m else 0


def _measure(pid: int, url: str) -> tuple[float, int]:
    _wrk(url, 1)                                            # warm up
    c0 = _cpu_s(pid)
    n = _wrk(url)
    return (_cpu_s(pid) - c0) * 1e6 / max(n, 1), n


def engines() -> None:
    pki = _pki()
    rows = []
    for mode in ("plain", "uvloop-ssl", "membio"):
        port = _free_port()
        p = subprocess.Popen([sys.executable, "-m", "benchmarks.tls_engine", "serve", mode,
                              str(port), pki["server"], pki["server_key"]],
                             stdout=subprocess.PIPE, cwd=os.path.join(HERE, ".."))
        try:
            assert p.stdout.readline().startswith(b"READY")
            scheme = "http" if mode == "plain" else "https"
            us, n = _measure(p.pid, f"{scheme}://127.0.0.1:{port}/")
            rows.append((mode, us, n))
        finally:
            p.kill()
            p.wait()
    base = rows[0][1]
    for mode, us, n in rows:
        print(f"{mode:12s} {us:7.2f} µs CPU/request  ({n} requests)  x{us / base:.2f} of plain")


# ------------------------------------------------------------------------ fastmesh

def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_fastmesh(cfg: dict):
    import yaml
    path = tempfile.mktemp(suffix=".yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    p = subprocess.Popen([sys.executable, "-m", "fastmesh", "run", "-c", path,
                          "--log-level", "warning"], cwd=os.path.join(HERE, ".."))
    admin = int(cfg["admin"]["address"].rsplit(":", 1)[1])
    for _ in range(200):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats", timeout=1) as r:
                st = json.loads(r.read())
                return p, st["server"]["worker_pids"][0]
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("fastmesh did not start")


def proxy() -> None:
    pki = _pki()
    up_port = _free_port()
    up = subprocess.Popen([sys.executable, "-m", "fastmesh.demo.upstream", "--listen",
                           f"127.0.0.1:{up_port}", "--name", "up"], stdout=subprocess.PIPE)
    try:
        assert up.stdout.readline().startswith(b"READY")
        rows = []
        for tls in (False, True):
            port = _free_port()
            lst = {"name": "web", "address": f"127.0.0.1:{port}", "route_table": "rt"}
            if tls:
                lst["tls"] = {"cert_chain_file": pki["server"],
                              "private_key_file": pki["server_key"]}
            cfg = {"admin": {"address": f"127.0.0.1:{_free_port()}"}, "workers": 1,
                   "listeners": [lst],
                   "route_tables": {"rt": {"routes": [{"match": {"prefix": "/"},
                                                       "cluster": "up"}]}},
                   "clusters": [{"name": "up", "endpoints": [f"127.0.0.1:{up_port}"]}]}
            p, wpid = _start_fastmesh(cfg)
            try:
                us, n = _measure(wpid, f"{'https' if tls else 'http'}://127.0.0.1:{port}/")
                rows.append(("TLS" if tls else "plain", us, n))
            finally:
                p.terminate()
                p.wait(10)
        for name, us, n in rows:
            print(f"fastmesh {name:6s} {us:7.2f} µs worker CPU/request ({n} requests)"
                  f"  x{us / rows[0][1]:.2f}")
    finally:
        up.kill()
        up.wait()


def handshakes() -> None:
    pki = _pki()
    results = []
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network."
                    "http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "h", "route_config": {"virtual_hosts": [{
               "name": "a", "domains": ["*"], "routes": [{"match": {"prefix": "/"},
                                                          "direct_response": {"status": 200}}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    for who in ("fastmesh", "envoy"):
        port, admin = _free_port(), _free_port()
        boot = {"admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                         "port_value": admin}}},
                "static_resources": {"listeners": [{
                    "name": "tls", "address": {"socket_address": {
                        "address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": hcm}],
                        "transport_socket": {"name": "envoy.transport_sockets.tls",
                                             "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.transport_sockets."
                                     "tls.v3.DownstreamTlsContext",
                            "common_tls_context": {"tls_certificates": [{
                                "certificate_chain": {"filename": pki["server"]},
                                "private_key": {"filename": pki["server_key"]}}]}}}}]}]}}
        import yaml
        path = tempfile.mktemp(suffix=".yaml")
        with open(path, "w") as f:
            yaml.safe_dump(boot, f)
        if who == "envoy":
            envoy = os.path.join(os.path.dirname(sys.executable), "envoy")
            p = subprocess.Popen([envoy, "-c", path, "--concurrency", "1", "-l", "error",
                                  "--base-id", "7321"])
            pid = p.pid
            for _ in range(200):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1)
                    break
                except OSError:
                    time.sleep(0.05)
        else:
            p = subprocess.Popen([sys.executable, "-m", "fastmesh", "run", "-c", path,
                                  "--log-level", "warning"], cwd=os.path.join(HERE, ".."))
            for _ in range(200):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats",
                                                timeout=1) as r:
                        pid = json.loads(r.read())["server"]["worker_pids"][0]
                    break
                except OSError:
                    time.sleep(0.05)
        try:
            for version in ("-tls1_2", "-tls1_3"):
                c0 = _cpu_s(pid)
                out = subprocess.run(["openssl", "s_time", "-connect", f"127.0.0.1:{port}",
                                      "-new", "-time", "4", version], capture_output=True,
                                     text=True).stdout
                cpu = _cpu_s(pid) - c0
                m = re.search(r"(\d+) connections in ([\d.]+) real seconds", out)
                n = int(m.group(1)) if m else 0
                results.append((who, version[1:], n / 4.0, cpu * 1e6 / max(n, 1)))
        finally:
            p.terminate()
            p.wait(10)
    for who, v, rate, us in results:
        print(f"{who:9s} {v:7s} {rate:7.0f} handshakes/s (openssl s_time -new)  "
              f"{us:7.0f} µs server CPU/handshake")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "serve":
        serve(*sys.argv[2:3], int(sys.argv[3]), *sys.argv[4:6])
    else:
        {"engines": engines, "proxy": proxy, "handshakes": handshakes}[cmd]()

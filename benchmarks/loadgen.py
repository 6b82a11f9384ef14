"""Load for each scenario kind, run as a separate process pinned to the load CPU, with one
normalised result:

    {"tool": "wrk", "throughput": 41234.5, "units": 412345 (what CPU time is divided by:
     requests, calls or MB), "duration_s": 10.0, "latency_us": {"p50", "p99", "p99.9", ...},
     "errors": {kind: count}, "errors_total": n, "raw": <the tool's own output>}

HTTP closed loop: wrk (with wrk_report.lua for p99.9 and the error counts) when installed,
else `benchmarks.httpload closed`. HTTP open loop: `benchmarks.httpload open` (wrk has no
open-loop mode and wrk2 is not packaged). TCP: `benchmarks.tcpbulk source`, with the rate
taken from the sink's report. Bolt: `benchmarks.boltload client`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from .procs import Proc, ProcError, run_once

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WRK_SCRIPT = HERE / "wrk_report.lua"


def find_wrk() -> str | None:
    return os.environ.get("FASTMESH_BENCH_WRK") or shutil.which("wrk")


def wrk_version(path: str) -> str | None:
    import subprocess
    try:
        out = subprocess.run([path, "-v"], capture_output=True, timeout=10)
    except OSError:
        return None
    first = (out.stdout or out.stderr).decode(errors="replace").splitlines()
    return first[0].split()[1] if first and len(first[0].split()) > 1 else None


class LoadError(RuntimeError):
    pass


class LoadGen:
    def __init__(self, cpu: int | None, log_dir: Path, wrk: str | None):
        self.cpu = cpu
        self.log_dir = Path(log_dir)
        self.wrk = wrk
        self.commands: dict[str, list[str]] = {}     # scenario kind -> last command line
        self._n = 0

    def _run(self, tag, argv, timeout_s, env=None):
        self._n += 1
        rc, out, err = run_once(f"load-{self._n:03d}-{tag}", argv, self.cpu, timeout_s,
                                self.log_dir, env=env, cwd=str(REPO))
        self.commands[tag] = argv
        return rc, out, err

    # -- HTTP closed loop ----------------------------------------------------------------

    def http_closed(self, port: int, path: str, scn, duration_s: float) -> dict:
        method = "POST" if scn.resource == "post" else "GET"
        body = scn.payload_bytes if method == "POST" else 0
        if self.wrk:
            secs = max(1, int(round(duration_s)))
            argv = [self.wrk, "-t1", f"-c{scn.connections}", f"-d{secs}s", "--timeout", "5s",
                    "-s", str(WRK_SCRIPT)]
            if scn.close:
                argv += ["-H", "Connection: close"]
            argv.append(f"{'https' if scn.tls else 'http'}://127.0.0.1:{port}{path}")
            env = dict(os.environ, WRK_METHOD=method, WRK_BODY_BYTES=str(body))
            rc, out, err = self._run("wrk", argv, secs + 60, env)
            line = next((l for l in out.splitlines() if l.startswith("WRK_JSON ")), None)
            if rc != 0 or line is None:
                raise LoadError(f"wrk failed (rc {rc}): {err or out[-500:]}")
            raw = json.loads(line[len("WRK_JSON "):])
            tool = "wrk"
        else:
            if scn.tls:
                raise LoadError("the TLS scenarios need wrk (apt-get install wrk)")
            argv = [sys.executable, "-m", "benchmarks.httpload", "closed", "--target",
                    f"127.0.0.1:{port}", "--path", path, "--connections", str(scn.connections),
                    "--duration-s", f"{duration_s:g}", "--method", method, "--body-bytes",
                    str(body), "--json"]
            if scn.close:
                argv.append("--close")
            raw = self._json(self._run("httpload", argv, duration_s + 60), "httpload")
            tool = "httpload"
        errors = {k: v for k, v in raw["errors"].items() if v}
        dur = raw["duration_s"] or duration_s
        return {"tool": tool, "throughput": round(raw["requests"] / dur, 1),
                "units": raw["requests"], "duration_s": dur,
                "latency_us": raw["latency_us"], "errors": errors,
                "errors_total": sum(errors.values()), "raw": raw}

    # -- HTTP open loop ------------------------------------------------------------------

    def http_open(self, port: int, path: str, scn, duration_s: float, rate: float) -> dict:
        argv = [sys.executable, "-m", "benchmarks.httpload", "open", "--target",
                f"127.0.0.1:{port}", "--path", path, "--connections", str(scn.connections),
                "--rate", f"{rate:g}", "--duration-s", f"{duration_s:g}", "--json"]
        raw = self._json(self._run("httpload-open", argv, duration_s + 60), "httpload open")
        errors = {k: v for k, v in raw["errors"].items() if v}
        return {"tool": "httpload-open", "throughput": raw["rps"], "units": raw["requests"],
                "duration_s": raw["duration_s"], "latency_us": raw["latency_us"],
                "service_latency_us": raw["service_latency_us"],
                "send_lateness_us": raw["send_lateness_us"], "errors": errors,
                "errors_total": sum(errors.values()), "raw": raw}

    # -- HTTP/2 --------------------------------------------------------------------------

    def h2load(self, port: int, path: str, scn, duration_s: float, extra: tuple = (),
               tag: str = "h2load") -> dict:
        """h2load (nghttp2-client) with prior knowledge: scn.connections connections with
        scn.inflight streams each, for duration_s; latency percentiles from its per-request
        log. extra: more h2load arguments (a body with -d, headers with -H)."""
        import tempfile
        h2load = shutil.which("h2load")
        if h2load is None:
            raise LoadError("h2load not found (apt-get install nghttp2-client)")
        secs = max(1, int(round(duration_s)))
        with tempfile.NamedTemporaryFile(prefix="fm-h2load-", suffix=".tsv") as logf:
            argv = [h2load, "-D", str(secs), "-c", str(scn.connections), "-m",
                    str(scn.inflight), "-t", "1", "--log-file", logf.name, *extra,
                    f"http://127.0.0.1:{port}{path}"]
            rc, out, err = self._run(tag, argv, secs + 60)
            lat = sorted(int(line.split("\t")[2]) for line in open(logf.name)
                         if line.count("\t") >= 2 and line.split("\t")[1] == "200")
        m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                      r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
        if rc != 0 or m is None:
            raise LoadError(f"h2load failed (rc {rc}): {(err or out)[-500:]}")
        done, ok, failed, errored, timeout = (int(m.group(i)) for i in (3, 4, 5, 6, 7))
        codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
        errors = {k: v for k, v in (("failed", failed), ("errored", errored),
                                    ("timeout", timeout),
                                    ("non_2xx", max(0, ok - int(codes.group(1)))
                                     if codes else 0))
                  if v}

        def pct(q):
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None
        return {"tool": "h2load", "throughput": round(ok / secs, 1), "units": ok,
                "duration_s": secs,
                "latency_us": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
                               "p99.9": pct(0.999), "max": lat[-1] if lat else None},
                "errors": errors, "errors_total": sum(errors.values()),
                "raw": {"summary": out[-1500:]}}

    # -- gRPC ----------------------------------------------------------------------------

    def grpc_unary(self, port: int, up, scn, duration_s: float) -> dict:
        """Unary gRPC calls by h2load: POST /bench.Echo/Ping with one length-prefixed
        scn.payload_bytes message (-d), `content-type: application/grpc` and `te: trailers`.
        h2load counts 2xx answers; the upstream's counters, read before and after, say how
        many calls it answered with grpc-status 0, and fewer than h2load's successes is an
        error (`not_from_upstream`: answered by the proxy, not by the server)."""
        from . import grpcload
        body = self.log_dir / f"grpc-request-{scn.payload_bytes}.bin"
        if not body.exists():
            body.write_bytes(grpcload.frame(grpcload.message(scn.payload_bytes)))
        extra = ("-d", str(body), "-H", "content-type: application/grpc",
                 "-H", "te: trailers")
        try:
            before = grpcload.upstream_stats(up.port)
            res = self.h2load(port, grpcload.METHOD, scn, duration_s, extra, tag="h2load-grpc")
            after = grpcload.upstream_stats(up.port)
        except RuntimeError as exc:
            if isinstance(exc, LoadError):
                raise
            raise LoadError(str(exc)) from exc
        delta = {k: after[k] - before[k] for k in after if k in before}
        res["raw"]["upstream"] = delta
        errors = res["errors"]
        if delta.get("calls_ok", 0) < res["units"]:
            errors["not_from_upstream"] = res["units"] - delta.get("calls_ok", 0)
        for k in ("calls_bad", "unimplemented"):
            if delta.get(k):
                errors[f"upstream_{k}"] = delta[k]
        res["errors_total"] = sum(errors.values())
        return res

    def grpc_check(self, port: int, scn) -> dict:
        """One unary call with grpcio through the proxy (after the measured run, so outside
        its CPU figures): code OK, grpc-status 0 in the trailers, the message echoed."""
        argv = [sys.executable, "-m", "benchmarks.grpcload", "call", "--target",
                f"127.0.0.1:{port}", "--payload-bytes", str(scn.payload_bytes), "--json"]
        return self._json(self._run("grpcio-call", argv, 60), "grpcload call")

    # -- TLS handshakes ------------------------------------------------------------------

    def tls_handshakes(self, port: int, duration_s: float, clients: int = 4) -> dict:
        """Full TLS handshakes (no session resumption: wrk resumes, so it cannot measure
        these), as fast as `clients` parallel `openssl s_time -new` loops make them; each
        connection is closed once its handshake is done."""
        secs = max(1, int(round(duration_s)))
        one = f"openssl s_time -connect 127.0.0.1:{port} -new -time {secs}"
        argv = ["sh", "-c", " & ".join([one] * clients) + " & wait"]
        rc, out, err = self._run("s_time", argv, secs + 60)
        counts = re.findall(r"(\d+) connections in (\d+) real seconds", out)
        if len(counts) < clients:
            raise LoadError(f"openssl s_time failed (rc {rc}): {(err or out)[-500:]}")
        total = sum(int(n) for n, _ in counts)
        failed = len(re.findall(r"(?im)^.*(?:error|failed).*$", out + err))
        errors = {"handshake_errors": failed} if failed else {}
        return {"tool": "openssl s_time", "throughput": round(total / secs, 1),
                "units": total, "duration_s": secs, "latency_us": {}, "errors": errors,
                "errors_total": failed, "raw": {"counts": counts, "clients": clients}}

    # -- TCP bulk ------------------------------------------------------------------------

    def tcp_bulk(self, port: int, sink: Proc, duration_s: float) -> dict:
        while not sink.lines.empty():              # anything left from an earlier stream
            if sink.lines.get_nowait() is None:
                sink.lines.put(None)
                break
        argv = [sys.executable, "-m", "benchmarks.tcpbulk", "source", "--target",
                f"127.0.0.1:{port}", "--duration-s", f"{duration_s:g}", "--json"]
        rc, out, err = self._run("tcpbulk", argv, duration_s + 60)
        src = self._json((0, out, err), "tcpbulk source")
        errors = {}
        if src.get("error"):
            errors["source"] = 1
        got = None
        wait_s = 2 if src.get("error") or not src["bytes"] else 15
        try:
            while got is None or got["bytes"] == 0:    # skip readiness-probe connections
                got = json.loads(sink.wait_line("CONN ", wait_s)[len("CONN "):])
        except ProcError:
            got = None
            errors["sink_report_missing"] = 1
        if got is None or got["seconds"] <= 0:
            got = {"bytes": 0, "seconds": src["seconds"], "mb_per_s": 0.0}
        if src["bytes"] and got["bytes"] < src["bytes"]:
            errors["bytes_lost"] = src["bytes"] - got["bytes"]
        mb = got["bytes"] / 1e6
        return {"tool": "tcpbulk", "throughput": got["mb_per_s"], "units": mb,
                "duration_s": got["seconds"], "latency_us": {}, "errors": errors,
                "errors_total": len(errors), "raw": {"source": src, "sink": got}}

    # -- Bolt ----------------------------------------------------------------------------

    def bolt(self, port: int, scn, duration_s: float) -> dict:
        argv = [sys.executable, "-m", "benchmarks.boltload", "client", "--target",
                f"127.0.0.1:{port}", "--connections", str(scn.connections), "--inflight",
                str(scn.inflight), "--payload-bytes", str(scn.payload_bytes), "--duration-s",
                f"{duration_s:g}", "--json"]
        raw = self._json(self._run("boltload", argv, duration_s + 60), "boltload")
        errors = dict(raw["errors"])
        for key in ("unanswered", "unknown_ids"):
            if raw.get(key):
                errors[key] = raw[key]
        if raw["connection_errors"]:
            errors["connection"] = len(raw["connection_errors"])
        if raw["connected"] < raw["connections"]:
            errors["not_connected"] = raw["connections"] - raw["connected"]
        return {"tool": "boltload", "throughput": raw["calls_per_s"],
                "units": raw["answered_total"], "duration_s": raw["duration_s"],
                "latency_us": raw["latency_us"], "errors": errors,
                "errors_total": sum(errors.values()), "raw": raw}

    # -- idle connections ----------------------------------------------------------------

    def idle_conns(self, procs, port: int, path: str, n: int, at_ready, hold_s: float = 4.0,
                   open_timeout_s: float = 240.0) -> dict:
        """Open n idle connections; call at_ready() once they are all open (it samples the
        proxy); then close them. The sampled figures come back under "at_ready"."""
        argv = [sys.executable, "-m", "benchmarks.httpload", "idle", "--target",
                f"127.0.0.1:{port}", "--path", path, "--connections", str(n),
                "--hold-s", f"{hold_s:g}"]
        self._n += 1
        opener = procs.start(f"load-{self._n:03d}-idle", argv, self.cpu, self.log_dir,
                             cwd=str(REPO))
        self.commands["httpload-idle"] = argv
        try:
            ready = json.loads(opener.wait_line("READY ", open_timeout_s)[len("READY "):])
            sampled = at_ready()
            done = json.loads(opener.wait_line("DONE ", hold_s + 30)[len("DONE "):])
        finally:
            procs.stop(opener)
        errors = {f"open_{k}": v for k, v in ready["failures"].items() if v}
        closed = ready["open"] - done["still_open"]
        if closed:
            errors["closed_by_proxy"] = closed
        if ready["attempted"] < n:
            errors["not_attempted"] = n - ready["attempted"]
        return {"tool": "httpload-idle", "throughput": done["still_open"],
                "units": max(1, ready["open"]), "duration_s": ready["open_s"],
                "latency_us": {}, "errors": errors, "errors_total": sum(errors.values()),
                "at_ready": sampled, "raw": done}

    @staticmethod
    def _json(ran, what) -> dict:
        rc, out, err = ran
        for line in reversed(out.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        raise LoadError(f"{what} printed no JSON (rc {rc}): {err[-600:] or out[-300:]}")


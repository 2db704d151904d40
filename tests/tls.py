"""TLS servers for the tests: a certificate authority made for the test run (openssl),
a redis-server with TLS on a spare port, and a TLS front (``tests/tlsproxy.py``) to the
local RabbitMQ."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .faults import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Certificates:
    """A CA and a server certificate it signed for 127.0.0.1 and localhost."""

    ca: Path
    cert: Path
    key: Path

    @staticmethod
    def available() -> bool:
        return shutil.which("openssl") is not None

    @classmethod
    def make(cls, directory: Path) -> Certificates:
        directory.mkdir(parents=True, exist_ok=True)
        ca, ca_key = directory / "ca.pem", directory / "ca.key"
        cert, key, csr = (
            directory / "server.pem",
            directory / "server.key",
            directory / "server.csr",
        )
        ext = directory / "server.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        for argv in (
            [
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=greenworker test CA",
                "-keyout",
                str(ca_key),
                "-out",
                str(ca),
            ],
            [
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=localhost",
                "-keyout",
                str(key),
                "-out",
                str(csr),
            ],
            [
                "x509",
                "-req",
                "-in",
                str(csr),
                "-CA",
                str(ca),
                "-CAkey",
                str(ca_key),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                str(ext),
                "-out",
                str(cert),
            ],
        ):
            subprocess.run(["openssl", *argv], check=True, capture_output=True, timeout=60)
        return cls(ca=ca, cert=cert, key=key)


class TLSRedis:
    """A redis-server of the test's own that speaks only TLS (no client certificates)."""

    def __init__(self, directory: Path, certificates: Certificates) -> None:
        self.directory = directory
        self.certificates = certificates
        self.port = free_port()
        self.url = f"rediss://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        certs = self.certificates
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "no",
                "--tls-auth-clients",
                "no",
                "--tls-cert-file",
                str(certs.cert),
                "--tls-key-file",
                str(certs.key),
                "--tls-ca-cert-file",
                str(certs.ca),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None


class TLSFront:
    """TLS on 127.0.0.1:<port>, forwarded in the clear to a local broker port."""

    def __init__(self, upstream_port: int, certificates: Certificates) -> None:
        self.upstream_port = upstream_port
        self.certificates = certificates
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        certs = self.certificates
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.tlsproxy",
                str(self.port),
                str(self.upstream_port),
                str(certs.cert),
                str(certs.key),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

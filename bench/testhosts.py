"""What the benchmark and reliability scripts share about the two daemons they run on this machine: their TLS
identities, a free port for each migration listener, and HTTP over a daemon's Unix control socket."""
import http.client
import os
import socket
import subprocess


def make_certificates(directory, ca_name="bench-ca"):
    """One CA and the identities host-a and host-b (EC P-256, subjectAltName DNS:host-x), as scripts/demo makes
    them: ca.pem, host-a.pem, host-a.key, host-b.pem, host-b.key in `directory`, keys readable by their owner only."""
    def openssl(*args):
        result = subprocess.run(["openssl", *args], cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-subj", f"/CN={ca_name}", "-days", "1")
    for host in ("host-a", "host-b"):
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{host}.key", "-out", f"{host}.csr", "-subj", f"/CN={host}")
        with open(os.path.join(directory, f"{host}.ext"), "w") as f:
            f.write(f"subjectAltName=DNS:{host}\n")
        openssl("x509", "-req", "-in", f"{host}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "1", "-extfile", f"{host}.ext", "-out", f"{host}.pem")
    for name in ("ca.key", "host-a.key", "host-b.key"):
        os.chmod(os.path.join(directory, name), 0o600)


def free_port():
    """A loopback TCP port free right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a daemon's Unix control socket."""

    def __init__(self, path, timeout=10):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)

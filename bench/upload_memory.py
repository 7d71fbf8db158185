"""5. Peak memory (RSS) of the web process while a 200 MB recording is uploaded.

`manage.py runserver --noreload` (one process, threads) on 127.0.0.1 and a SQLite temporary
file. A test clinician logs in through the login form (CSRF cookie and token), then the upload
form is posted as multipart, streamed from disk in 1 MiB pieces so that the client does not hold
the file either. The server's VmRSS is sampled from /proc every 10 ms; VmHWM (the kernel's
high-water mark) is read at the end. Baseline = RSS after a warm-up request, just before the
upload. Goal: flat, far below the 200 MB of the file.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
import uuid
from pathlib import Path

from common import (
    Child,
    Row,
    base_environment,
    cli,
    clinician,
    django_setup,
    emit,
    manage,
    migrate,
    sqlite_url,
    wait_for,
    workdir,
)

NAME = "upload_memory"
MIB = 1024 * 1024


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Browser:
    """Just enough of a browser: cookies and the CSRF token of the last page."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookies: dict[str, str] = {}

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def _remember(self, response: http.client.HTTPResponse) -> None:
        for header, value in response.getheaders():
            if header.lower() == "set-cookie":
                name, _, rest = value.partition("=")
                self.cookies[name] = rest.split(";", 1)[0]

    def _cookie_header(self) -> str:
        return "; ".join(f"{k}={v}" for k, v in self.cookies.items())

    def get(self, path: str) -> tuple[int, str]:
        conn = self._conn()
        conn.request("GET", path, headers={"Cookie": self._cookie_header()})
        response = conn.getresponse()
        body = response.read().decode(errors="replace")
        self._remember(response)
        conn.close()
        return response.status, body

    def post_form(self, path: str, fields: dict[str, str]) -> tuple[int, str]:
        from urllib.parse import urlencode

        conn = self._conn()
        conn.request(
            "POST",
            path,
            body=urlencode(fields),
            headers={
                "Cookie": self._cookie_header(),
                "Content-Type": "application/x-www-form-urlencoded",
                "Referer": f"http://127.0.0.1:{self.port}{path}",
            },
        )
        response = conn.getresponse()
        body = response.read().decode(errors="replace")
        self._remember(response)
        conn.close()
        return response.status, response.getheader("Location") or body

    def post_file(self, path: str, fields: dict[str, str], name: str, file: Path) -> int:
        boundary = uuid.uuid4().hex
        head = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields.items()
        )
        head += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{file.name}"\r\nContent-Type: audio/wav\r\n\r\n'
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        conn = self._conn()
        conn.putrequest("POST", path)
        conn.putheader("Cookie", self._cookie_header())
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Content-Length", str(len(head) + file.stat().st_size + len(tail)))
        conn.putheader("Referer", f"http://127.0.0.1:{self.port}{path}")
        conn.endheaders()
        conn.send(head)
        with file.open("rb") as handle:
            while piece := handle.read(MIB):
                conn.send(piece)
        conn.send(tail)
        response = conn.getresponse()
        response.read()
        conn.close()
        return response.status


def csrf_token(html: str) -> str:
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html)
    return match.group(1) if match else ""


def make_recording(path: Path, size: int) -> Path:
    """A WAV header and silence: the upload path does not decode it."""
    import struct

    data = size - 44
    header = b"RIFF" + struct.pack("<I", 36 + data) + b"WAVEfmt "
    header += struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
    header += b"data" + struct.pack("<I", data)
    with path.open("wb") as handle:
        handle.write(header)
        zero = bytes(MIB)
        left = data
        while left > 0:
            handle.write(zero[: min(MIB, left)])
            left -= MIB
    return path


def main() -> None:
    parser = cli(NAME, __doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=200)
    args = parser.parse_args()
    rows: list[Row] = []
    with workdir(NAME) as tmp:
        env = base_environment(tmp, sqlite_url(tmp), FILE_UPLOAD_TEMP_DIR=str(tmp))
        django_setup(env)
        migrate()
        password = "bench-pw-12345!"
        clinician("uploader", password)
        recording = make_recording(tmp / "long-visit.wav", args.megabytes * 1000 * 1000)
        port = free_port()
        server = Child(
            manage("runserver", f"127.0.0.1:{port}", "--noreload", "--skip-checks"),
            env,
            tmp / "runserver.log",
        ).start()
        try:
            browser = Browser(port)

            def up() -> bool:
                try:
                    return browser.get("/accounts/login/")[0] == 200
                except OSError:
                    return False

            wait_for(up, timeout=30, poll=0.2)
            _, html = browser.get("/accounts/login/")
            login_status, _ = browser.post_form(
                "/accounts/login/",
                {
                    "username": "uploader",
                    "password": password,
                    "csrfmiddlewaretoken": csrf_token(html),
                },
            )
            _, html = browser.get("/visits/new/")
            token = csrf_token(html)
            time.sleep(0.5)
            baseline = proc_kib(server.pid, "VmRSS")
            peak = [baseline]
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], proc_kib(server.pid, "VmRSS"))
                    time.sleep(0.01)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.perf_counter()
            upload_status = browser.post_file(
                "/visits/new/",
                {"csrfmiddlewaretoken": token, "label": "bench upload"},
                "recording",
                recording,
            )
            elapsed = time.perf_counter() - started
            stop.set()
            sampler.join()
            hwm = proc_kib(server.pid, "VmHWM")
        finally:
            server.kill()
        from visits.models import Visit

        stored = Visit.objects.filter(recording_bytes=recording.stat().st_size).exists()
        growth_mb = (peak[0] - baseline) / 1024
        rows.append(
            Row(
                NAME,
                f"web RSS growth during a {args.megabytes} MB upload",
                f"{growth_mb:.1f} MiB",
                baseline=f"{baseline / 1024:.1f} MiB RSS before",
                ratio=f"{growth_mb * MIB / recording.stat().st_size:.3f} of file size",
                goal="flat, << 200 MB",
                verdict="meets" if growth_mb < 20 else "MISSES",
                note=f"peak RSS {peak[0] / 1024:.1f} MiB, VmHWM {hwm / 1024:.1f} MiB; "
                f"login HTTP {login_status}, upload HTTP {upload_status} in {elapsed:.1f} s; "
                f"visit stored: {stored}; runserver",
            )
        )
    emit(rows, args.json)


if __name__ == "__main__":
    main()

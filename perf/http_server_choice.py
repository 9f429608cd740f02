"""Which asyncio HTTP server for the REST data plane: aiohttp's (already the server extra's, for
/metrics and health) against uvicorn with httptools, each a tiny fixed-response handler (a POST
whose body is read and a ~100-byte JSON answer), one process each on the default asyncio loop
(medserve's), loaded in turn by h2load over HTTP/1.1 in the same run. The figures and the choice
are in perf/README.md ("REST: the HTTP server").

    python perf/http_server_choice.py --seconds 5 --concurrency 64

Needs h2load, aiohttp and (to compare) uvicorn + httptools in the interpreter running it;
uvicorn is not one of medserve's dependencies (it lost: see the README).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ANSWER = json.dumps({"model_name": "m", "model_version": "1", "outputs": [
    {"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]}]}).encode()
BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]}).encode()

AIOHTTP = f"""
import sys
from aiohttp import web
ANSWER = {ANSWER!r}
async def infer(request):
    await request.read()
    return web.Response(body=ANSWER, content_type="application/json")
app = web.Application()
app.router.add_post("/v2/models/m/infer", infer)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""

UVICORN_APP = f"""
ANSWER = {ANSWER!r}
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({{"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]}})
    await send({{"type": "http.response.body", "body": ANSWER}})
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(port: int, timeout_s: float = 20) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"no server on port {port}")


def load(port: int, body: Path, concurrency: int, seconds: float) -> float:
    done = subprocess.run(
        ["h2load", "--h1", "-c", str(concurrency), "-m", "1", "-t", "1", "-D", f"{round(seconds * 1000)}ms", "--warm-up-time", "1s",
         "-d", str(body), "-H", "content-type: application/json", f"http://127.0.0.1:{port}/v2/models/m/infer"],
        capture_output=True, text=True, timeout=seconds + 60, check=True)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", done.stdout)
    assert codes is not None and codes.group(3) == codes.group(4) == "0", done.stdout
    found = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", done.stdout)
    assert found is not None, done.stdout
    return float(found.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="each server this many times, interleaved")
    args = p.parse_args(argv)
    if shutil.which("h2load") is None:
        print("needs h2load (nghttp2-client)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "aio.py").write_text(AIOHTTP)
        (folder / "uvapp.py").write_text(UVICORN_APP)
        (folder / "body.json").write_bytes(BODY)
        servers = {
            "aiohttp": lambda port: [sys.executable, str(folder / "aio.py"), str(port)],
            "uvicorn+httptools": lambda port: [sys.executable, "-m", "uvicorn", "uvapp:app", "--app-dir", str(folder),
                                               "--port", str(port), "--http", "httptools", "--loop", "asyncio",
                                               "--no-access-log", "--log-level", "warning"],
        }
        figures: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, cmd in servers.items():
                port = _free_port()
                proc = subprocess.Popen(cmd(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    _wait(port)
                    figures[name].append(load(port, folder / "body.json", args.concurrency, args.seconds))
                finally:
                    proc.terminate()
                    proc.wait(10)
    print(json.dumps({"concurrency": args.concurrency, "seconds": args.seconds, "req_per_s": figures}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A real OpenAI-compatible server for tests: ``transformers serve`` (from ``transformers[serving]``,
a dev dependency) on 127.0.0.1, serving saved model folders (the request's ``model`` is the folder;
nothing is downloaded).

    with TransformersServe() as server:       # ready in ~20 s on 2 CPU cores
        OpenAICompatibleBackend(server.url, str(folder))

What it does and refuses (transformers 5.24): ``/v1/completions`` takes a text prompt (token ids:
HTTP 400) and ignores ``n`` (one choice per request); ``/v1/chat/completions`` refuses unknown
fields with HTTP 422, ``continue_final_message`` included; a text model's chat drops image parts.
A vision model folder (tiny Qwen2.5-VL) does not load there without torchvision, so vision requests
are tested against tests/openai_server.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


class TransformersServe:
    def __init__(self, startup_timeout: float = 180.0):
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.log = Path(tempfile.mkdtemp(prefix="transformers-serve-")) / "serve.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "TransformersServe":
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as exc:  # a dev dependency: a missing one is a broken install, not a skip
            raise RuntimeError(f"transformers serve needs transformers[serving] (make install): {exc}") from exc
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",  # the CLI asks PyPI for a newer version otherwise
            "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": "1",  # the tests run beside it on the same cores
        }
        cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--device", "cpu", "--dtype", "float32"]
        self.process = subprocess.Popen(cmd, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        tail = self.tail()
        self.stop()
        raise RuntimeError(f"transformers serve did not answer within {self.startup_timeout:.0f} s:\n{tail}")

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        self.process = None
        shutil.rmtree(self.log.parent, ignore_errors=True)

    def __enter__(self) -> "TransformersServe":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

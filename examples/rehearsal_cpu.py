"""A CPU dress rehearsal of the paper plan: ``configs/pipeline.yaml`` with ``configs/rehearsal_cpu.yaml``.

    python examples/rehearsal_cpu.py [--workdir runs/rehearsal_cpu] [pipeline options: --stages, --rerun ...]

Every stage of the paper plan (base, Alpha SFT, Beta GRPO, PathVLM-R1 with the judge's process
reward, the Gamma/Delta/Epsilon controls), each run by the pipeline as on the GPU machines, with the
swaps ``configs/rehearsal_cpu.yaml`` lists. This script supplies what that overlay names and a CPU
does not have, then runs the pipeline command inside ``--workdir``, so the plan's relative paths
(``runs/sft/export``, ``runs/report``, ...) land there and never next to a real run's:

1. ``<workdir>/configs``: a link to this repository's ``configs/`` (the shipped files are what runs);
2. ``<workdir>/rehearsal/pathmmu_release``: a copy of ``tests/fixtures/pathmmu_release``;
3. ``<workdir>/rehearsal/qwen2_5_vl_twin``: Qwen2.5-VL's embedded twin with Qwen's real vocabulary,
   saved as a model folder, so the stages load their base model from a folder as the paper's do;
4. a loopback OpenAI-compatible judge (:class:`LoopbackJudge`); the pipeline's environment gets
   ``OPENAI_BASE_URL`` pointing at it and a fresh random ``OPENAI_API_KEY`` that it checks (the
   caller's own key, if any, is never passed on).

The exit code is the pipeline's. Finished steps are skipped on a re-run, as in any pipeline run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PLAN = "configs/pipeline.yaml"
OVERLAY = "configs/rehearsal_cpu.yaml"
FIXTURE = REPO / "tests" / "fixtures" / "pathmmu_release"
DATA = Path("rehearsal") / "pathmmu_release"  # relative to the workdir, as the overlay names them
TWIN = Path("rehearsal") / "qwen2_5_vl_twin"


class LoopbackJudge:
    """An OpenAI chat-completions server on 127.0.0.1 that grades like the paper's judge replies.

    Each reply is ``{"integrity_score": x, "knowledge_score": y}``, both in [0, 1] and a function of
    the request's text (a hash), so different completions get different scores, as a real judge's
    would, and the same completion always the same. A request without the expected bearer key gets
    a 401, as OpenAI answers.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self.requests = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def scores(self, body: dict[str, Any]) -> dict[str, float]:
        digest = hashlib.sha256(json.dumps(body.get("messages"), sort_keys=True).encode()).digest()
        return {"integrity_score": round(digest[0] / 255, 2), "knowledge_score": round(digest[1] / 255, 2)}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        judge = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.headers.get("Authorization", "") != f"Bearer {judge.key}":
                    self._send(401, {"error": {"message": "Incorrect API key provided"}})
                    return
                with judge._lock:
                    judge.requests += 1
                content = json.dumps(judge.scores(body))
                self._send(200, {
                    "id": "chatcmpl-loopback", "object": "chat.completion", "created": 0, "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 12, "total_tokens": 112},
                })  # fmt: skip

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


def prepare(workdir: Path) -> None:
    """Lay out ``workdir`` (configs link, data copy, base model folder); what exists is kept."""
    workdir.mkdir(parents=True, exist_ok=True)
    configs = workdir / "configs"
    if not configs.exists():
        configs.symlink_to(REPO / "configs", target_is_directory=True)
    elif configs.resolve() != (REPO / "configs").resolve():
        raise SystemExit(f"{configs} exists and is not a link to {REPO / 'configs'}")
    if not (workdir / DATA / "data.json").is_file():
        shutil.copytree(FIXTURE, workdir / DATA, dirs_exist_ok=True)
    if not (workdir / TWIN / "config.json").is_file():
        from pathvlm_lightning.backbone import Backbone

        Backbone(model="embedded-tiny", vocab="qwen", seed=0).export(workdir / TWIN)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/rehearsal_cpu", help="where it runs (default: runs/rehearsal_cpu)")
    args, pipeline_args = parser.parse_known_args(argv)
    workdir = Path(args.workdir).resolve()
    prepare(workdir)
    key = secrets.token_hex(16)
    judge = LoopbackJudge(key)
    env = {**os.environ, "OPENAI_BASE_URL": judge.base_url, "OPENAI_API_KEY": key}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "pathvlm_lightning", "pipeline", "--plan", PLAN, "--config", OVERLAY, "--no-ood"]
    print(f"rehearsal: in {workdir}: {' '.join(command[1:] + pipeline_args)}", flush=True)
    try:
        code = subprocess.call([*command, *pipeline_args], cwd=workdir, env=env)
    finally:
        judge.close()
    print(f"rehearsal: the loopback judge answered {judge.requests} requests; exit {code}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""A real local HTTP server speaking the OpenAI chat-completions, files and batches protocol, with faults.

Started by the tests (a thread in the pytest process, so it survives a killed client). It judges with a
`decide(instruction, output_a, output_b) -> 'a' | 'b'` callable (any other prompt: `respond(body) -> content`) and records what it was asked, so tests can
check that no answered request was ever sent twice and that Retry-After was honoured.

Faults come from `fault(key, attempt)`, with attempt counting this request's arrivals from 1:
  '429'       429 with Retry-After (seconds in `retry_after`)
  '500'       500 server error
  'timeout'   sleep past the client's timeout, then drop the connection (no answer)
  'badjson'   200 whose body is not JSON (nothing usable delivered)
  'malformed' 200 with a content that names neither output (a paid, unparseable answer)
  'slow'      answer after `slow_seconds`
"""
from __future__ import annotations

import email.parser
import email.policy
import hashlib
import json
import re
import threading
import time
import uuid
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECTION = re.compile(r"## Instruction:\n(.*?)\n\n## Output \(a\):\n(.*?)\n\n## Output \(b\):\n(.*?)\n\n## Which", re.S)


def body_key(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def longer_wins(instruction: str, a: str, b: str) -> str:
    return "a" if len(a) >= len(b) else "b"


class FakeOpenAI:
    def __init__(self, decide=longer_wins, fault=lambda key, attempt: None, respond=None, retry_after: float = 0.2,
                 slow_seconds: float = 0.3, timeout_sleep: float = 2.0, delay: float = 0.0, polls_to_complete: int = 2,
                 batch_token_limit: int | None = None):
        self.decide, self.fault, self.retry_after = decide, fault, retry_after
        self.respond = respond  # respond(body) -> content: any other prompt than the pairwise one
        self.slow_seconds, self.timeout_sleep, self.delay = slow_seconds, timeout_sleep, delay
        self.polls_to_complete = polls_to_complete
        self.batch_token_limit = batch_token_limit  # a batch whose prompts' bytes exceed it fails as a whole
        self.lock = threading.Lock()
        self.attempts: dict[str, list[tuple[float, str | None]]] = defaultdict(list)  # key -> (time, fault)
        self.answered: Counter = Counter()  # key -> 200 answers delivered
        self.auth_headers: set[str] = set()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.batches_created = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _json(self, status: int, payload, headers=None):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_POST(self):
                server.auth_headers.add(self.headers.get("Authorization", ""))
                if self.path.endswith("/chat/completions"):
                    return server._chat(self, json.loads(self._body()))
                if self.path.endswith("/files"):
                    return server._upload(self, self._body())
                if self.path.endswith("/batches"):
                    return self._json(200, server._create_batch(json.loads(self._body())))
                self._json(404, {"error": {"message": f"no route {self.path}"}})

            def do_GET(self):
                path = self.path.split("?")[0]
                if m := re.search(r"/files/([^/]+)/content$", path):
                    return self._json(200, server.files[m.group(1)])
                if m := re.search(r"/batches/([^/]+)$", path):
                    return self._json(200, server._poll_batch(m.group(1)))
                if path.endswith("/batches"):
                    data = list(server.batches.values())
                    return self._json(200, {"object": "list", "data": data, "has_more": False})
                self._json(404, {"error": {"message": f"no route {self.path}"}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- chat completions ------------------------------------------------------------------------------
    def completion(self, body: dict, content: str | None = None) -> dict:
        user = body["messages"][-1]["content"]
        if content is None and self.respond is not None:
            content = self.respond(body)
        elif content is None:
            m = SECTION.search(user)
            content = f"Output ({self.decide(*m.groups())})" if m else "Output (a)"
        return {"id": "chatcmpl-" + uuid.uuid4().hex[:8], "object": "chat.completion", "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(user) // 4 + 20, "completion_tokens": 3,
                          "total_tokens": len(user) // 4 + 23}}

    def _chat(self, handler, body: dict):
        key = body_key(body)
        with self.lock:
            attempt = len(self.attempts[key]) + 1
            fault = self.fault(key, attempt)
            self.attempts[key].append((time.monotonic(), fault))
        if self.delay:
            time.sleep(self.delay)
        if fault == "429":
            return handler._json(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                                 {"Retry-After": str(self.retry_after)})
        if fault == "500":
            return handler._json(500, {"error": {"message": "internal error"}})
        if fault == "timeout":
            time.sleep(self.timeout_sleep)
            handler.close_connection = True
            return None
        if fault == "badjson":
            return handler._json(200, b"<html>upstream hiccup</html>")
        if fault == "slow":
            time.sleep(self.slow_seconds)
        answer = self.completion(body, "I find both outputs equally good." if fault == "malformed" else None)
        with self.lock:
            self.answered[key] += 1
        handler._json(200, answer)

    def duplicates(self) -> dict[str, int]:
        return {k: n for k, n in self.answered.items() if n > 1}

    # --- files and batches -----------------------------------------------------------------------------
    def _upload(self, handler, raw: bytes):
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + handler.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
        content = next(p.get_payload(decode=True) for p in message.iter_parts() if p.get_filename())
        file_id = "file-" + uuid.uuid4().hex[:12]
        self.files[file_id] = content
        handler._json(200, {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                            "filename": "input.jsonl", "purpose": "batch", "status": "processed"})

    def _create_batch(self, req: dict) -> dict:
        batch_id = "batch_" + uuid.uuid4().hex[:12]
        lines = [json.loads(line) for line in self.files[req["input_file_id"]].decode().splitlines() if line]
        self.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": req["endpoint"], "input_file_id": req["input_file_id"],
            "completion_window": req["completion_window"], "status": "validating", "created_at": int(time.time()),
            "metadata": req.get("metadata"), "output_file_id": None, "error_file_id": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0}, "_polls": 0,
            "_tokens": sum(len(m["content"].encode()) for row in lines for m in row["body"]["messages"])}
        self.batches_created += 1
        if self.batch_token_limit is not None and self.batches[batch_id]["_tokens"] > self.batch_token_limit:
            self.batches[batch_id].update(status="failed", errors={"object": "list", "data": [
                {"code": "token_limit_exceeded", "message": "Enqueued token limit reached for gpt-4.1-nano"}]})
        return self._public(batch_id)

    def _public(self, batch_id: str) -> dict:
        return {k: v for k, v in self.batches[batch_id].items() if not k.startswith("_")}

    def _poll_batch(self, batch_id: str) -> dict:
        b = self.batches[batch_id]
        b["_polls"] += 1
        if b["status"] not in ("completed", "failed") and b["_polls"] >= self.polls_to_complete:
            out = []
            for line in self.files[b["input_file_id"]].decode().splitlines():
                row = json.loads(line)
                with self.lock:
                    self.answered[body_key(row["body"])] += 1
                out.append(json.dumps({"id": "r", "custom_id": row["custom_id"], "error": None,
                                       "response": {"status_code": 200, "body": self.completion(row["body"])}}))
            file_id = "file-" + uuid.uuid4().hex[:12]
            self.files[file_id] = "\n".join(out).encode()
            b.update(status="completed", output_file_id=file_id,
                     request_counts={"total": len(out), "completed": len(out), "failed": 0})
        elif b["status"] == "validating":
            b["status"] = "in_progress"
        return self._public(batch_id)

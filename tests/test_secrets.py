"""No secret (API keys, webhook secrets) ever appears in logs, meta or error messages."""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time

from tests.support.servers import live_server

KLEIN = "/api/v1/enterprise/flux_klein/text2img"


def test_keys_and_webhook_secrets_never_reach_logs_meta_or_errors(tmp_path, tiny_root, caplog):
    received = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    caplog.set_level(logging.DEBUG)
    try:
        with live_server(tmp_path, tiny_root, fetch_allow=["127.0.0.1/32"]) as live, live.client() as client:
            key_row = live.keys.authenticate(live.key)
            secret = live.keys.webhook_secret(key_row.id)
            hook = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
            answers = [
                client.post(KLEIN, json={"key": live.key, "prompt": "x", "width": 256, "height": 256,
                                         "num_inference_steps": 1, "webhook": hook, "track_id": "t"}),
                client.post(KLEIN, json={"key": live.key, "prompt": "x", "width": 99}),  # validation error
                client.post(KLEIN, json={"key": live.key + "x", "prompt": "x"}),  # wrong key
                client.post(KLEIN, headers={"Key": live.key}, json={"prompt": "x", "seed": "abc"}),
                client.post("/api/v1/enterprise/flux/img2img",
                            json={"key": live.key, "prompt": "x", "init_image": f"http://user:{live.key}@127.0.0.1:9/a.png"}),
                client.post("/api/v1/enterprise/realtime/system_details", json={"key": live.key}),  # not admin
                client.post("/api/v1/enterprise/realtime/system_details", json={"key": live.admin_key}),
            ]
            deadline = time.monotonic() + 30
            while not received and time.monotonic() < deadline:
                time.sleep(0.05)
            assert received, "the webhook was not delivered"
            texts = [answer.text for answer in answers] + [body.decode() for body in received]
            texts.append(json.dumps(answers[0].json()["meta"]))
    finally:
        receiver.shutdown()
    for secret_value in (live.key, live.admin_key, secret):
        assert secret_value not in caplog.text
        for text in texts:
            assert secret_value not in text

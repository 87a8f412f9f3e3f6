"""The code switchyard replaces: a FastAPI changelog listener as Port's guide has teams write it.

It verifies Port's webhook signature (`X-Port-Signature: v1,<base64 HMAC-SHA256 of
"<timestamp>.<body>">`, `X-Port-Timestamp` within five minutes), decides in Python whether the
change matters, and posts a Block Kit message through `slack_sdk`'s `WebhookClient`. It keeps
nothing: no dedup, no retry, no outbox. Run with one uvicorn worker:

    PORT_CLIENT_SECRET=… SLACK_WEBHOOK_URL=http://127.0.0.1:PORT/hook \
        uvicorn listener:app --workers 1 --port 8000

The bench (`bench/run.py --guide`) drives it with the same signed events as switchyard, mix
`one` (every event makes one message), and the same sink.
"""

import base64
import hashlib
import hmac
import json
import os
import time

from fastapi import FastAPI, HTTPException, Request, Response
from slack_sdk.webhook import WebhookClient
from starlette.concurrency import run_in_threadpool

SECRET = os.environ["PORT_CLIENT_SECRET"].encode()
slack = WebhookClient(os.environ["SLACK_WEBHOOK_URL"])
app = FastAPI()


def verify(ts: str, body: bytes, signature: str) -> bool:
    if not ts or abs(time.time() - int(ts)) > 300:
        return False
    mac = hmac.new(SECRET, ts.encode() + b"." + body, hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(mac).decode()
    return any(hmac.compare_digest(expected, s.strip()) for s in signature.split(" "))


@app.post("/hooks/port")
async def port_changelog(request: Request):
    body = await request.body()
    if not verify(request.headers.get("x-port-timestamp", ""), body, request.headers.get("x-port-signature", "")):
        raise HTTPException(status_code=401, detail="bad signature")
    event = json.loads(body)
    after = event.get("diff", {}).get("after") or {}
    before = event.get("diff", {}).get("before") or {}
    props = after.get("properties", {})
    if props.get("kind") in ("one", "three"):
        title = after.get("title") or after.get("identifier")
        blocks = [
            {"type": "header", "text": {"type": "plain_text", "text": f"{title[:100]}: CPU at {props.get('cpuUtil')}%"}},
            {"type": "section", "fields": [
                {"type": "mrkdwn", "text": f"*Entity*\n`{after.get('identifier')}` ({after.get('blueprint')})"},
                {"type": "mrkdwn", "text": f"*CPU*\n{before.get('properties', {}).get('cpuUtil')}% → *{props.get('cpuUtil')}%*"},
                {"type": "mrkdwn", "text": "*Team*\n" + ", ".join(after.get("team", []))},
            ]},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": f"guide seq {props.get('seq')} · {event.get('trigger', {}).get('at')}"}]},
        ]
        text = f"{props.get('sent_us')} {title} CPU {props.get('cpuUtil')}%"
        # Posted before answering, in a worker thread: slack_sdk's client is synchronous.
        await run_in_threadpool(slack.send, text=text, blocks=blocks)
    return Response(status_code=202)

"""A Python client for examples/echo: connect, call, send, print.

Run (with the server up):  python examples/echo/client.py ws://127.0.0.1:4200/
"""
import sys

from gevent.event import AsyncResult

from wse_sync import WseClient

url = sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:4200/"
client = WseClient(url)
said = AsyncResult()
client.channel.on("said", said.set)
print("welcome:", client.connect("alice", {"device": "script"}))
print("echo ->", client.call("echo", {"n": 1}))
client.send("say", "hi there")
print("server said:", said.get(timeout=10))
client.close()

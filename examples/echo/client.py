"""A Python client for examples/echo: connect, call, send, print.

Run (with the server up):  python examples/echo/client.py ws://127.0.0.1:4200/
"""
import sys

from wse_sync import WseClient

url = sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:4200/"
client = WseClient(url)
client.channel.on("said", lambda payload: print("server said:", payload))
print("welcome:", client.connect("alice", {"device": "script"}))
print("echo ->", client.call("echo", {"n": 1}))
client.send("say", "hi there")
client.wait(0.3)
client.close()

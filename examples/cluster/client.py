"""Connect alice and bob to different workers of examples/cluster, then
alice sends bob a direct message through the broker.

    python examples/cluster/client.py ws://127.0.0.1:4400/
"""
import sys

import gevent
from gevent.event import AsyncResult

from wse_sync import WseClient

url = sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:4400/"
alice = WseClient(url)
alice_pid = alice.connect("alice")["pid"]

# the kernel spreads connections over the workers: retry until bob sits elsewhere
for _ in range(50):
    bob = WseClient(url)
    bob_pid = bob.connect("bob")["pid"]
    if bob_pid != alice_pid:
        break
    bob.close()
else:
    sys.exit("could not place bob on another worker (is --workers above 1?)")

received = AsyncResult()
bob.channel.on("dm", received.set)
print(f"alice is on worker {alice_pid}, bob on worker {bob_pid}")
# another worker's users reach server.clients within a second (a replica)
for _ in range(40):
    online = alice.call("online")
    if "bob" in online:
        break
    gevent.sleep(0.05)
print("online:", online)
print("dm ->", alice.call("dm", {"to": "bob", "text": "hello from the other worker"}))
msg = received.get(timeout=10)
print(f"bob got: {msg['text']!r} from {msg['from']} (sent by worker {msg['sender_pid']})")
alice.close()
bob.close()

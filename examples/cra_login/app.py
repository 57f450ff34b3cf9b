"""Challenge-response login: the password never crosses the wire, and a
captured answer is worth nothing on the next connection.

The server stores, per user, a random salt and the salted hash of the
password, key = PBKDF2-HMAC-SHA256(password, salt, ITERATIONS); never the
password. Each connection gets a challenge with a fresh random nonce:
{"salt", "iterations", "nonce"}. The client derives the same key from the
password and answers HMAC-SHA256(key, nonce); the server computes the
expected answer from the stored key and compares with hmac.compare_digest
(constant time). Unknown users get a decoy salt derived from a server secret,
so the challenge does not tell who exists.

    wse-sync serve examples/cra_login/app.py:server --port 4300 --workers 1
    python examples/cra_login/client.py ws://127.0.0.1:4300/ alice "correct horse battery staple"
"""
import hashlib
import hmac
import os
import secrets

from wse_sync import WseServer

ITERATIONS = 100_000
SERVER_SECRET = os.environ.get("CRA_SERVER_SECRET", secrets.token_hex(32)).encode()


def hash_password(password, salt=None, iterations=ITERATIONS):
    """What the user store keeps: {"salt", "iterations", "key"} (hex)."""
    salt = salt or os.urandom(16)
    key = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return {"salt": salt.hex(), "iterations": iterations, "key": key.hex()}


# a real app loads these from its database; never store the passwords themselves
USERS = {
    "alice": hash_password("correct horse battery staple"),
    "bob": hash_password("hunter2"),
}


def answer(key_hex, nonce_hex):
    """HMAC-SHA256(key, nonce): the expected answer to a challenge (hex)."""
    return hmac.new(bytes.fromhex(key_hex), bytes.fromhex(nonce_hex), hashlib.sha256).hexdigest()


def challenge(identity, meta, quest, refuse):
    user = USERS.get(identity) if isinstance(identity, str) else None
    if user is not None:
        salt, iterations = user["salt"], user["iterations"]
    else:  # the same kind of challenge for everyone: no user enumeration
        salt = hmac.new(SERVER_SECRET, str(identity).encode(), hashlib.sha256).hexdigest()[:32]
        iterations = ITERATIONS
    quest({"salt": salt, "iterations": iterations, "nonce": secrets.token_hex(32)})


def identify(identity, challenge, accept, refuse, **_):
    user = USERS.get(identity) if isinstance(identity, str) else None
    response = (challenge or {}).get("response")
    # the quest is the server's own record of what it sent (the nonce of this connection)
    nonce = (challenge or {}).get("quest", {}).get("nonce")
    if user is None or not isinstance(response, str) or not nonce:
        refuse()
        return
    if hmac.compare_digest(answer(user["key"], nonce).encode(), response.encode()):
        accept(identity, {"hello": identity})
    else:
        refuse()


server = WseServer(identify=identify, conn_per_user=3, port=4300)
server.use_challenge(challenge)


@server.register("whoami")
def whoami(conn, payload):
    return conn.cid

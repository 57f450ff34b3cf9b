"""Log in to examples/cra_login with a password, challenge-response style.

    python examples/cra_login/client.py ws://127.0.0.1:4300/ alice "correct horse battery staple"

Exit code 0 when logged in, 1 when refused.
"""
import hashlib
import hmac
import sys

from wse_sync import WseClient, WseError


def solver(password):
    def solve_challenge(quest, solve):
        key = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), bytes.fromhex(quest["salt"]),
                                  int(quest["iterations"]))
        solve(hmac.new(key, bytes.fromhex(quest["nonce"]), hashlib.sha256).hexdigest())
    return solve_challenge


def main(url, user, password):
    client = WseClient(url)
    client.challenge(solver(password))
    try:
        welcome = client.connect(user)
    except WseError as exc:
        print(f"refused: {exc.code}")
        return 1
    print("welcome:", welcome, "| whoami ->", client.call("whoami"))
    client.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))

"""Every example, run the way its docstring says: echo, chat (with two pages in
headless Chromium), flask_app (under gunicorn), cra_login, cluster."""
import hashlib
import hmac
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from deploy_helpers import Proc, child_env, gunicorn, http, python
from helpers import ROOT, UNIT, RawWS, free_port, serve_process, spread_clients, wait_for
from wse_sync import WSE_REASON, WseClient, WseError

EXAMPLES = os.path.join(ROOT, "examples")
# the JS client the pages import (chat and flask_app serve it as /wse.js)
SHIPPED_CLIENT = importlib.resources.files("wse_sync") / "static" / "wse.js"


def run_script(*args, env=None, timeout=60 * UNIT):
    out = subprocess.run(python(*args), capture_output=True, text=True, cwd=ROOT,
                         env=env or child_env(), timeout=timeout)
    return out.returncode, out.stdout, out.stderr


# -- echo ------------------------------------------------------------------------------

def test_echo_example():
    with serve_process("examples/echo/app.py:server", workers=1) as sp:
        rc, out, err = run_script("examples/echo/client.py", sp.url)
        assert rc == 0, err
        lines = out.splitlines()
        assert lines[0].startswith("welcome: {'hello': 'alice', 'pid': ")
        assert lines[1] == "echo -> {'n': 1}"
        assert lines[2] == "server said: hi there"


# -- chat ------------------------------------------------------------------------------

def start_chat(port):
    p = Proc(python("examples/chat/app.py", "--port", str(port)))
    p.wait_line(r"chat serving on http://127\.0\.0\.1:%d/" % port)
    return p


def test_chat_example_serves_the_page_and_the_protocol():
    port = free_port()
    p = start_chat(port)
    try:
        status, headers, body, _ = http(port, "GET", "/")
        assert status == 200 and b'<script type="module" src="chat.js">' in body
        status, headers, body, _ = http(port, "GET", "/chat.js")
        assert status == 200 and b"import { WseClient, WSE_STATUS } from './wse.js'" in body
        # /wse.js is the client shipped in the package, byte for byte
        status, headers, body, _ = http(port, "GET", "/wse.js")
        assert status == 200 and "javascript" in headers["content-type"][0]
        assert body == SHIPPED_CLIENT.read_bytes() and b"export class WseClient" in body
        assert not os.path.exists(os.path.join(EXAMPLES, "chat", "static", "wse.js"))
        assert http(port, "GET", "/../app.py")[0] == 404
        assert http(port, "GET", "/%2e%2e/app.py")[0] == 404
        assert http(port, "GET", "/nothing.js")[0] == 404
        url = f"ws://127.0.0.1:{port}/ws"
        a, b = WseClient(url), WseClient(url)
        said, online = [], []
        b.channel.on("said", said.append)
        b.channel.on("joined", online.append)
        assert a.connect("ann")["name"] == "ann"
        b.connect("ben")
        with pytest.raises(WseError):
            WseClient(url).connect("   ")  # no name: refused
        wait_for(lambda: a.call("who") == ["ann", "ben"])
        a.send("say", "hello ben")
        wait_for(lambda: [m["text"] for m in said] == ["hello ben"])
        assert said[0]["from"] == "ann"
        a.close()
        b.close()
    finally:
        assert p.stop() == 0, p.output


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1000,800"]


@pytest.fixture
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver;"
                    " .ci/run does it)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30 * UNIT)
    try:
        yield driver
    finally:
        driver.quit()


def test_chat_in_two_browser_pages(browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def until(cond, what, timeout=30 * UNIT):
        return WebDriverWait(browser, timeout, poll_frequency=0.05).until(
            lambda d: cond(), message=f"{what}\nlog: {text('log')!r} online: {text('online')!r}")

    # read the page in one script each: the list is re-rendered under our feet
    def text(element_id):
        return browser.execute_script(
            "const e = document.getElementById(arguments[0]); return e ? e.innerText : null",
            element_id)

    def online():
        return browser.execute_script(
            "return [...document.querySelectorAll('#online li')].map(li => li.textContent)")

    def join(name):
        browser.get(base)
        browser.find_element(By.ID, "name").send_keys(name)
        browser.find_element(By.ID, "join").click()
        until(lambda: text("status") == "READY", f"{name} ready")

    def say(message):
        browser.find_element(By.ID, "text").send_keys(message)
        browser.find_element(By.ID, "send").click()

    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    server = start_chat(port)
    try:
        join("alice")
        page_a = browser.current_window_handle
        browser.switch_to.new_window("tab")
        join("bob")
        page_b = browser.current_window_handle
        # who is online: the `who` RPC on ready, then joined events
        until(lambda: online() == ["alice", "bob"], "bob sees alice")
        browser.switch_to.window(page_a)
        until(lambda: online() == ["alice", "bob"], "alice sees bob join")
        assert "bob joined" in text("log")
        # one page sends, the other sees it
        say("hello bob")
        browser.switch_to.window(page_b)
        until(lambda: "alice: hello bob" in text("log"), "bob gets alice's message")
        say("hi alice")
        browser.switch_to.window(page_a)
        until(lambda: "bob: hi alice" in text("log"), "alice gets bob's answer")

        # the server restarts: both pages reconnect by themselves (1012, re: true)
        attempts = {h: None for h in (page_a, page_b)}
        for handle in attempts:
            browser.switch_to.window(handle)
            attempts[handle] = browser.execute_script("return window.chatClient.reused")
        assert server.stop() == 0, server.output
        server = start_chat(port)
        for handle, before in attempts.items():
            browser.switch_to.window(handle)
            until(lambda before=before: text("status") == "READY" and browser.execute_script(
                "return window.chatClient.reused") > before, "reconnected after the restart")
            assert "disconnected (1012" in text("log")
            until(lambda: online() == ["alice", "bob"], "both online again")
        browser.switch_to.window(page_a)
        say("still here?")
        browser.switch_to.window(page_b)
        until(lambda: "alice: still here?" in text("log"), "a message after the restart")

        # bob closes his page: alice sees him leave
        browser.close()
        browser.switch_to.window(page_a)
        until(lambda: online() == ["alice"], "bob left")
        assert "bob left" in text("log")
    finally:
        assert server.stop() == 0, server.output


# -- flask_app -------------------------------------------------------------------------

def test_flask_app_example_under_gunicorn(tmp_path):
    pytest.importorskip("flask")
    endpoint = f"ipc://{tmp_path}/notes.sock"
    env = child_env(HOME=str(tmp_path), NOTES_DB=str(tmp_path / "notes.sqlite3"),
                    WSE_SYNC_BROKER_BIND=endpoint)
    with gunicorn("app:application", chdir=os.path.join(EXAMPLES, "flask_app"), workers=2,
                  env=env) as g:
        by_pid = spread_clients(g.url, workers=2, per_worker=1, prefix="reader")
        readers = [c for cs in by_pid.values() for c in cs]
        notes = {c.identity: [] for c in readers}
        notices = {c.identity: [] for c in readers}
        for c in readers:
            c.channel.on("note", lambda n, box=notes[c.identity]: box.append(n["text"]))
            c.channel.on("notice", notices[c.identity].append)
        # the Flask app works as before
        status, headers, body, _ = http(g.port, "GET", "/")
        assert status == 200 and b"<h1>notes</h1>" in body
        assert b'<script type="module">' in body and b"from '/wse.js'" in body
        status, headers, body, _ = http(g.port, "GET", "/wse.js")
        assert status == 200 and "javascript" in headers["content-type"][0]
        assert body == SHIPPED_CLIENT.read_bytes()
        assert http(g.port, "GET", "/missing")[0] == 404
        # a view broadcasts: every reader on every worker gets it
        status, _, body, _ = http(g.port, "POST", "/notes", json.dumps({"text": "first"}).encode(),
                                  headers={"Content-Type": "application/json"})
        assert status == 201, body
        wait_for(lambda: all(box == ["first"] for box in notes.values()))
        assert b"<li>first</li>" in http(g.port, "GET", "/")[2]
        # views on either worker see the whole cluster's users
        cids = sorted(notes)
        seen = {}

        def ask_until_both_workers_answered():
            answer = json.loads(http(g.port, "GET", "/api/online")[2])
            seen[answer["pid"]] = answer["online"]
            return len(seen) == 2
        wait_for(ask_until_both_workers_answered, 20 * UNIT)
        assert all(users == cids for users in seen.values())
        # a direct message from a view, whichever worker holds the user
        for cid in cids:
            assert http(g.port, "POST", f"/api/notify/{cid}", f"hi {cid}".encode())[0] == 204
        wait_for(lambda: all(box == [f"hi {cid}"] for cid, box in notices.items()))
        # and from outside the web app, through the broker
        rc, out, err = run_script("examples/flask_app/notify.py", "from cron", "--broker", endpoint)
        assert rc == 0, err
        assert out.strip() == f"sent to {len(readers)} user(s)"
        wait_for(lambda: all(box == ["first", "from cron"] for box in notes.values()))
        for c in readers:
            c.close()


# -- cra_login -------------------------------------------------------------------------

def _solve(password, quest):
    key = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(quest["salt"]),
                              quest["iterations"])
    return hmac.new(key, bytes.fromhex(quest["nonce"]), hashlib.sha256).hexdigest()


def _hi(url, identity):
    ws = RawWS(url)
    ws.send_text(json.dumps(["~wse:hi", {"identity": identity, "meta": {}}, None]))
    kind, frame = ws.recv(10 * UNIT)
    assert kind == "text"
    type_, quest, _ = json.loads(frame)
    assert type_ == "~wse:challenge"
    return ws, quest


def test_cra_login_example():
    with serve_process("examples/cra_login/app.py:server", workers=1) as sp:
        client = "examples/cra_login/client.py"
        rc, out, _ = run_script(client, sp.url, "alice", "correct horse battery staple")
        assert (rc, out.strip()) == (0, "welcome: {'hello': 'alice'} | whoami -> alice")
        rc, out, _ = run_script(client, sp.url, "alice", "wrong password")
        assert (rc, out.strip()) == (1, "refused: wse.not-authorized")
        rc, out, _ = run_script(client, sp.url, "mallory", "anything")
        assert (rc, out.strip()) == (1, "refused: wse.not-authorized")

        # a fresh nonce per challenge: an answer captured on one connection
        # does not open another
        ws, quest = _hi(sp.url, "alice")
        assert set(quest) == {"salt", "iterations", "nonce"}
        captured = _solve("correct horse battery staple", quest)
        ws.send_text(json.dumps(["~wse:challenge", captured, None]))
        assert json.loads(ws.recv(10 * UNIT)[1])[0] == "~wse:welcome"
        ws.shutdown()
        replay, quest2 = _hi(sp.url, "alice")
        assert quest2["nonce"] != quest["nonce"] and quest2["salt"] == quest["salt"]
        replay.send_text(json.dumps(["~wse:challenge", captured, None]))
        assert replay.recv_until_close(10 * UNIT) == ("close", 1000, WSE_REASON.NOT_AUTHORIZED)
        replay.shutdown()

        # an unknown user gets the same kind of challenge, stable per name
        ws1, q1 = _hi(sp.url, "mallory")
        ws2, q2 = _hi(sp.url, "mallory")
        assert q1["salt"] == q2["salt"] and len(q1["salt"]) == len(quest["salt"])
        assert q1["iterations"] == quest["iterations"]
        ws1.shutdown()
        ws2.shutdown()


def test_cra_login_stores_no_password():
    sys.path.insert(0, os.path.join(EXAMPLES, "cra_login"))
    try:
        import app as cra  # noqa: F401 - the example module
    finally:
        sys.path.pop(0)
        sys.modules.pop("app", None)
    record = cra.USERS["alice"]
    assert set(record) == {"salt", "iterations", "key"}
    assert "correct horse" not in json.dumps(cra.USERS)
    assert cra.hash_password("x", bytes.fromhex(record["salt"]))["key"] != record["key"]
    quest = {"salt": record["salt"], "iterations": record["iterations"], "nonce": "00" * 32}
    assert _solve("correct horse battery staple", quest) == cra.answer(record["key"], quest["nonce"])


# -- cluster ---------------------------------------------------------------------------

def test_cluster_example():
    with serve_process("examples/cluster/app.py:server", workers=3) as sp:
        rc, out, err = run_script("examples/cluster/client.py", sp.url)
        assert rc == 0, err
        lines = out.splitlines()
        placed = re.fullmatch(r"alice is on worker (\d+), bob on worker (\d+)", lines[0])
        assert placed, lines[0]
        alice_pid, bob_pid = int(placed.group(1)), int(placed.group(2))
        assert alice_pid != bob_pid
        assert lines[1] == "online: ['alice', 'bob']"
        assert lines[3] == (f"bob got: 'hello from the other worker' from alice"
                            f" (sent by worker {alice_pid})")


def test_examples_are_all_tested():
    names = sorted(d for d in os.listdir(EXAMPLES) if os.path.isdir(os.path.join(EXAMPLES, d))
                   and not d.startswith((".", "_")))
    assert names == ["chat", "cluster", "cra_login", "echo", "flask_app"]
    source = open(__file__).read()
    for name in names:
        assert f"def test_{name}_example" in source


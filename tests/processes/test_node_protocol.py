"""The JavaScript side's view of the protocol, checked by a real JS WebSocket stack.

tests/node/flows.mjs drives two real ``wse-sync serve`` processes
(tests/apps/node_app.py: ``server``, and ``cra_server`` with challenge auth)
with Node's ``ws`` package, partly through the shipped JS client (the
``wse_sync/static/wse.js`` of the wse_sync imported here, on ``ws`` through its
``WebSocket`` option), and prints one JSON line per flow with what it saw.
Each test below asserts one flow's exact expectations (protocol.md).

Needs ``node`` and ``npm`` on PATH; runs ``npm ci`` in tests/node when the ``ws``
package is missing.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import wse_sync
from helpers import ROOT, UNIT, serve_process

pytestmark = [pytest.mark.node, pytest.mark.timeout(int(120 * UNIT))]

NODE_DIR = os.path.join(ROOT, "tests", "node")
APP = "tests/apps/node_app.py"
# the shipped client, from the package under test (an installed wheel under tox)
CLIENT_JS = os.path.join(os.path.dirname(os.path.abspath(wse_sync.__file__)), "static", "wse.js")

STAMP = re.compile(r"^[A-Za-z0-9]{10}$")
CONN_ID = re.compile(r"^[A-Za-z0-9]{15}$")

PROTOCOL_ERR = {"code": 1000, "reason": "wse.protocol-error",
                "reason_hex": b"wse.protocol-error".hex()}
NOT_AUTHORIZED = [[1000, "wse.not-authorized"]]


def wire(type_, payload=None, stamp=None):
    """The exact text JSON.stringify([type, payload, stamp]) gives."""
    return json.dumps([type_, payload, stamp], separators=(",", ":"), ensure_ascii=False)


def _why_skip():
    """Skip only without Node; the `ws` package is installed here when missing."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node/npm are not on PATH"
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "ws")):
        out = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, "npm ci in tests/node failed:\n" + out.stdout + out.stderr
    return None


@pytest.fixture(scope="module")
def flows():
    reason = _why_skip()
    if reason:
        print(f"test_node_protocol skipped: {reason}", file=sys.stderr)
        pytest.skip(reason)
    assert os.path.isfile(CLIENT_JS), f"the shipped client is missing: {CLIENT_JS}"
    env = dict(os.environ, WSE_FLOW_TIMEOUT_MS=str(int(10000 * UNIT)), WSE_CLIENT_JS=CLIENT_JS)
    with serve_process(f"{APP}:server") as plain, serve_process(f"{APP}:cra_server") as cra:
        run = subprocess.run(["node", "flows.mjs", plain.url, cra.url], cwd=NODE_DIR, env=env,
                             capture_output=True, text=True, timeout=60 * UNIT)
        server_logs = plain.stderr + "\n" + cra.stderr
    results = {}
    for line in run.stdout.split("\n"):  # not splitlines(): a payload holds U+2028
        if line.startswith("{"):
            out = json.loads(line)
            results[out["flow"]] = out
    return results, run, server_logs


def flow(flows, name):
    results, run, logs = flows
    assert name in results, (f"flow {name!r} printed nothing (node exit {run.returncode})\n"
                             f"node stderr:\n{run.stderr}\nserver logs:\n{logs[-4000:]}")
    out = results[name]
    assert "flow_error" not in out, f"flow {name!r} failed in node:\n{out['flow_error']}"
    return out


def after_welcome(frames):
    """The frames of a traced WseClient that follow the hi and the welcome."""
    assert frames[0][0] == "out" and frames[0][1].startswith('["~wse:hi",'), frames
    assert frames[1][0] == "in" and frames[1][1].startswith('["~wse:welcome",'), frames
    return frames[2:]


def call_and_answer(out):
    """(rp, payload, stamp) of the client's call and the text of the server's answer."""
    rest = after_welcome(out["frames"])
    assert [d for d, _ in rest] == ["out", "in"], rest
    rp, payload, stamp = json.loads(rest[0][1])
    assert STAMP.match(stamp), stamp
    return rp, payload, stamp, rest[1][1]


# -- handshake ------------------------------------------------------------------
def test_subprotocol(flows):
    out = flow(flows, "subprotocol")
    assert out["opened"] is True and out["error"] is None
    assert out["header"] == "wse-default-json"
    assert out["protocol"] == "wse-default-json"
    assert out["close"]["code"] == 1000
    assert out["frames"] == []


def test_subprotocol_among_others(flows):
    out = flow(flows, "subprotocol_among_others")
    assert out["opened"] is True and out["error"] is None
    assert out["header"] == "wse-default-json"
    assert out["protocol"] == "wse-default-json"


def test_wrong_subprotocol(flows):
    # the server selects no subprotocol it was not asked for: ws aborts the handshake
    out = flow(flows, "wrong_subprotocol")
    assert out["opened"] is False
    assert out["header"] is None
    assert out["error"] == "Server sent no subprotocol"


def test_no_subprotocol(flows):
    out = flow(flows, "no_subprotocol")
    assert out["opened"] is True
    assert out["header"] is None and out["protocol"] == ""
    assert out["frames"] == []
    assert out["close"] == PROTOCOL_ERR


# -- authentication -----------------------------------------------------------------
def test_welcome(flows):
    out = flow(flows, "welcome")
    identity = out["identity"]
    assert out["welcomed"] is True and out["error"] is None
    welcome = out["welcome"]
    assert welcome["hello"] == identity and CONN_ID.match(welcome["conn_id"])
    assert out["frames"] == [
        ["out", wire("~wse:hi", {"identity": identity, "meta": {}})],
        ["in", wire("~wse:welcome", {"hello": identity, "conn_id": welcome["conn_id"]})],
    ]
    assert out["statuses"] == ["CONNECTING", "READY", "OFFLINE"]
    assert out["closes"] == [[1000, "wse.by-client"]]  # the server echoes the reason


def test_welcome_null(flows):
    out = flow(flows, "welcome_null")
    assert out["welcomed"] is True and out["welcome"] is None
    assert out["frames"][1] == ["in", '["~wse:welcome",null,null]']


def test_meta(flows):
    out = flow(flows, "meta")
    who = out["whoami"]
    assert who["meta"] == out["sent_meta"]
    assert who["identity"] == who["cid"] == out["welcome"]["hello"]
    assert who["conn_id"] == out["welcome"]["conn_id"]
    assert out["hi"] == ["out", wire("~wse:hi", {"identity": who["identity"],
                                                 "meta": out["sent_meta"]})]


def test_meta_default(flows):
    out = flow(flows, "meta_default")
    assert out["hi"] == ["out", '["~wse:hi",{"identity":"","meta":{}},null]']
    assert out["whoami"]["identity"] == "" and out["whoami"]["meta"] == {}
    assert out["welcome"]["hello"] == ""


def test_identity_object(flows):
    out = flow(flows, "identity_object")
    sent = out["sent_identity"]
    assert out["welcome"] == {"identity": sent}
    assert out["whoami"]["identity"] == sent
    assert out["whoami"]["cid"] == sent["user"]


@pytest.mark.parametrize("name", ["refused", "accept_falsy", "identify_raises"])
def test_not_authorized(flows, name):
    out = flow(flows, name)
    assert out["welcomed"] is False
    assert out["error"] == {"rejected_with": "wse.not-authorized"}
    assert out["closes"] == NOT_AUTHORIZED
    assert [d for d, _ in out["frames"]] == ["out"]  # the hi, and nothing came back


def test_refused_with_re(flows):
    # the port settles a refused connect() with re on too (upstream hangs there: 1000
    # is not retried, and its promise was left pending)
    out = flow(flows, "refused_with_re")
    assert out["welcomed"] is False
    assert out["error"] == {"rejected_with": "wse.not-authorized"}
    assert out["closes"] == NOT_AUTHORIZED
    assert out["statuses"] == ["CONNECTING", "OFFLINE"]
    assert [d for d, _ in out["frames"]] == ["out"]


def test_cra_pass(flows):
    out = flow(flows, "cra_pass")
    quest = {"a": 2, "b": 3}
    welcome = {"cra": "ok", "challenge": {"quest": quest, "response": 5}}
    assert out["quests"] == [quest]
    assert out["welcome"] == welcome
    assert out["frames"] == [
        ["out", wire("~wse:hi", {"identity": out["identity"], "meta": {}})],
        ["in", '["~wse:challenge",{"a":2,"b":3},null]'],
        ["out", '["~wse:challenge",5,null]'],
        ["in", wire("~wse:welcome", welcome)],
    ]


def test_cra_fail(flows):
    out = flow(flows, "cra_fail")
    assert out["welcomed"] is False
    assert out["quests"] == [{"a": 2, "b": 3}]
    assert out["frames"][1:] == [["in", '["~wse:challenge",{"a":2,"b":3},null]'],
                                 ["out", '["~wse:challenge",6,null]']]
    assert out["closes"] == NOT_AUTHORIZED


def test_cra_refused(flows):
    out = flow(flows, "cra_refused")
    assert out["welcomed"] is False and out["quests"] == []
    assert [d for d, _ in out["frames"]] == ["out"]
    assert out["closes"] == NOT_AUTHORIZED
    # the generator refused: identify was never called for it
    assert any(i.startswith("probe-") for i in out["identified"])
    assert "cra-refuse" not in out["identified"]


def test_cra_other_message_when_challenged(flows):
    # once challenged, only ~wse:challenge is accepted (the reference closes)
    out = flow(flows, "cra_other_message_when_challenged")
    assert out["frames"] == ['["~wse:challenge",{"a":2,"b":3},null]']
    assert out["close"] == PROTOCOL_ERR


@pytest.mark.parametrize("name", ["msg_before_hi", "challenge_before_hi", "rpc_before_hi",
                                  "non_json_before_hi"])
def test_before_hi(flows, name):
    out = flow(flows, name)
    assert out["opened"] is True
    assert out["frames"] == []
    assert out["close"] == PROTOCOL_ERR


def test_clients_concurrency(flows):
    out = flow(flows, "clients_concurrency")
    assert out["older_closes"] == [[1000, "wse.clients-concurrency"]]
    assert out["newer_whoami"]["conn_id"] == out["second"]["conn_id"]
    assert out["first"]["conn_id"] != out["second"]["conn_id"]


# -- client -> server RPC -------------------------------------------------------------
def test_rpc_ok(flows):
    out = flow(flows, "rpc_ok")
    rp, payload, stamp, answer = call_and_answer(out)
    assert rp == "echo" and payload == {"a": 1, "s": "x/é", "list": [1, None]}
    assert answer == wire("~wse:response", payload, stamp)
    assert out["result"] == payload and out["error"] is None


def test_rpc_null_result(flows):
    out = flow(flows, "rpc_null_result")
    _, _, stamp, answer = call_and_answer(out)
    assert answer == f'["~wse:response",null,"{stamp}"]'
    assert out["result"] is None and out["error"] is None


def test_rpc_not_registered(flows):
    out = flow(flows, "rpc_not_registered")
    _, _, stamp, answer = call_and_answer(out)
    assert answer == f'["~wse:response-err",{{"code":"wse.server.rp.not-registered"}},"{stamp}"]'
    # the JS WseError defaults its details to {}
    assert out["error"] == {"code": "wse.server.rp.not-registered", "details": {}}


def test_rpc_wse_error(flows):
    out = flow(flows, "rpc_wse_error")
    _, _, stamp, answer = call_and_answer(out)
    error = {"code": "app.custom", "details": {"field": 1, "rpc": "fail_wse", "payload": {"x": 1}}}
    assert answer == wire("~wse:response-err", error, stamp)
    assert out["error"] == error


def test_rpc_wse_error_own_rpc(flows):
    out = flow(flows, "rpc_wse_error_own_rpc")
    _, _, stamp, answer = call_and_answer(out)
    error = {"code": "app.custom", "details": {"rpc": "mine", "payload": "p"}}
    assert answer == wire("~wse:response-err", error, stamp)
    assert out["error"] == error


def test_rpc_exception(flows):
    out = flow(flows, "rpc_exception")
    _, _, stamp, answer = call_and_answer(out)
    type_, error, answer_stamp = json.loads(answer)
    assert type_ == "~wse:response-err" and answer_stamp == stamp
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == "wse.server.rp.failed"
    assert error["message"] == "boom"
    details = error["details"]
    assert set(details) == {"origin", "rpc", "payload"}
    assert details["rpc"] == "fail_plain" and details["payload"] == {"y": 2}
    origin = details["origin"]
    assert set(origin) == {"name", "message", "stack"}
    assert origin["name"] == "ValueError" and origin["message"] == "boom"
    assert isinstance(origin["stack"], str) and "ValueError: boom" in origin["stack"]
    # the JS caller rejects with a WseError carrying that code and those details
    assert out["error"] == {"code": "wse.server.rp.failed", "details": details}


# -- server -> client RPC ---------------------------------------------------------------
def test_server_calls_client(flows):
    out = flow(flows, "server_calls_client")
    answers = {a["rp"]: a for a in out["answers"]}
    assert [a["rp"] for a in out["answers"]] == [
        "js_add", "js_async", "js_missing", "js_throw", "js_throw_obj", "js_throw_wse"]
    assert answers["js_add"] == {"rp": "js_add", "ok": 3}
    assert answers["js_async"] == {"rp": "js_async", "ok": {"later": "p"}}
    assert answers["js_missing"] == {"rp": "js_missing", "error": {
        "code": "wse.server.rp.not-registered", "details": None}}
    thrown = answers["js_throw"]["error"]
    assert thrown["code"] == "wse.server.rp.failed"
    # as the wse 4.12.3 client: the call's rpc and payload beside origin (or
    # beside the handler's own fields)
    assert set(thrown["details"]) == {"origin", "rpc", "payload"}
    assert (thrown["details"]["rpc"], thrown["details"]["payload"]) == ("js_throw", None)
    assert thrown["details"]["origin"]["name"] == "Error"
    assert thrown["details"]["origin"]["message"] == "js boom"
    assert thrown["details"]["origin"]["stack"].startswith("Error: js boom")
    assert answers["js_throw_obj"]["error"] == {
        "code": "wse.server.rp.failed",
        "details": {"field": 1, "rpc": "js_throw_obj", "payload": None}}
    assert answers["js_throw_wse"]["error"] == {
        "code": "js.custom", "details": {"k": 1, "rpc": "js_throw_wse", "payload": None}}
    # the server's call frames: [rp, payload, 10-char stamp]; answered with the same stamp
    frames = after_welcome(out["frames"])
    calls = [(i, json.loads(data)) for i, (d, data) in enumerate(frames)
             if d == "in" and data.startswith('["js_')]
    assert [c[0] for _, c in calls] == [a["rp"] for a in out["answers"]]
    sent = {"js_add": {"a": 1, "b": 2}, "js_async": "p", "js_missing": 1}
    for i, (rp, payload, stamp) in calls:
        assert STAMP.match(stamp), stamp
        assert frames[i][1] == wire(rp, payload, stamp)
        if rp in sent:
            assert payload == sent[rp]
        direction, reply = frames[i + 1]
        assert direction == "out" and json.loads(reply)[2] == stamp
    assert len({c[2] for _, c in calls}) == len(calls)


# -- channel messages ---------------------------------------------------------------------
def test_send_null(flows):
    out = flow(flows, "send_null")
    assert after_welcome(out["frames"]) == [
        ["out", '["poke",null,null]'],
        ["in", '["x",null,null]'],
        ["in", '["x",null,null]'],
    ]
    assert out["got"] == [None, None]


def test_channel_echo_exact(flows):
    out = flow(flows, "channel_echo_exact")
    assert out["received"][1] == out["expected"]
    assert out["same_bytes"] is True


def test_ignored_event(flows):
    out = flow(flows, "ignored_event")
    assert out["ignored"] == [["nobody_listens", {"z": 1}]]
    assert out["frames"] == []


def test_binary_json(flows):
    out = flow(flows, "binary_json")
    assert out["frames"] == ['["x",null,null]', '["x",null,null]']


def test_unmatched_response(flows):
    out = flow(flows, "unmatched_response")
    assert out["frames"] == ['["x",null,null]', '["x",null,null]']
    assert out["close"]["code"] == 1000


@pytest.mark.parametrize("name,error", [
    ("non_json", "wse.server.msg-processing-error"),
    ("not_an_array", "wse.server.msg-processing-error"),
    ("binary_garbage", "wse.server.msg-processing-error"),
    ("empty_type", "wse.server.protocol-violation"),
    ("numeric_stamp", "wse.server.protocol-violation"),
    ("numeric_type", "wse.server.protocol-violation"),
])
def test_bad_message_after_welcome(flows, name, error):
    out = flow(flows, name)
    assert out["frames"] == []
    assert out["close"] == PROTOCOL_ERR
    assert out["errors"] == [error]


def test_too_big(flows):
    out = flow(flows, "too_big")
    assert out["frames"] == []
    assert out["close"]["code"] == 1009


# -- closing ----------------------------------------------------------------------------
def test_drop_default(flows):
    out = flow(flows, "drop_default")
    assert out["close"] == {"code": 1000, "reason": "wse.by-server",
                            "reason_hex": b"wse.by-server".hex()}
    assert out["disconnected"] == [1000, "wse.by-server"]


def test_drop_custom_reason(flows):
    out = flow(flows, "drop_custom_reason")
    assert out["close"]["code"] == 1000
    assert out["close"]["reason_hex"] == "custom reason ✓".encode().hex()
    assert out["disconnected"] == [1000, "custom reason ✓"]


def test_drop_long_reason(flows):
    # 200 bytes of reason: cut to at most 123 bytes, never inside a character
    out = flow(flows, "drop_long_reason")
    assert out["close"]["code"] == 1000
    assert out["close"]["reason_hex"] == ("é" * 61).encode().hex()
    assert out["disconnected"][0] == 1000


def test_drop_client(flows):
    out = flow(flows, "drop_client")
    assert out["close"] == {"code": 1000, "reason": "", "reason_hex": ""}
    assert out["disconnected"] == [1000, ""]


def test_client_close_code(flows):
    out = flow(flows, "client_close_code")
    # the server's close frame echoes the client's code and reason, as ws does
    assert out["close"]["code"] == 4321 and out["close"]["reason"] == "bye-bye"
    assert out["disconnected"] == [4321, "bye-bye"]


def test_client_close_default(flows):
    out = flow(flows, "client_close_default")
    assert out["closes"] == [[1000, "wse.by-client"]]  # the closed event: the echo
    assert out["disconnected"] == [1000, "wse.by-client"]


def test_jump(flows):
    out = flow(flows, "jump")
    assert out["disconnected"] == [4000, "jump"]
    assert out["closes"][0] == [4000, "jump"]
    assert out["url"] == out["target"]
    assert out["second"]["conn_id"] != out["first"]["conn_id"]
    assert out["whoami"]["conn_id"] == out["second"]["conn_id"]
    assert out["statuses"] == ["CONNECTING", "READY", "OFFLINE", "RE_CONNECTING", "READY",
                               "OFFLINE"]


def test_reconnect_1012(flows):
    out = flow(flows, "reconnect_1012")
    assert out["closes"][0] == [1012, ""]
    assert len(out["welcomes"]) == 2
    assert out["welcomes"][0]["conn_id"] != out["welcomes"][1]["conn_id"]
    assert out["whoami"]["conn_id"] == out["welcomes"][1]["conn_id"]
    assert out["statuses"][:5] == ["CONNECTING", "READY", "OFFLINE", "RE_CONNECTING", "READY"]


# -- every flow of flows.mjs is checked above ----------------------------------------------
PARAMETRIZED = {"not_authorized": ["refused", "accept_falsy", "identify_raises"],
                "before_hi": ["msg_before_hi", "challenge_before_hi", "rpc_before_hi",
                              "non_json_before_hi"],
                "bad_message_after_welcome": ["non_json", "not_an_array", "binary_garbage",
                                              "empty_type", "numeric_stamp", "numeric_type"]}


def test_every_flow_is_checked(flows):
    checked = set()
    for name in list(globals()):
        if name.startswith("test_") and name != "test_every_flow_is_checked":
            short = name[len("test_"):]
            checked.update(PARAMETRIZED.get(short, [short]))
    results, run, _ = flows
    assert run.returncode == 0, run.stderr
    assert set(results) == checked

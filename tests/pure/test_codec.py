"""Pure tests of the codec, the error normalisation and the public names."""
import pytest

import wse_sync
from wse_sync import WSE_ERROR, WSE_REASON, WSE_STATUS, WseError, WseJSON
from wse_sync.core.errors import rpc_error_payload
from wse_sync.core.protocol import check_protocol


def test_public_names():
    assert set(wse_sync.__all__) >= {
        "WseServer", "WseConnection", "WseIdentity", "WseError", "WseJSON",
        "WSE_REASON", "WSE_ERROR", "WSE_STATUS", "WseClient"}
    for name in wse_sync.__all__:
        assert getattr(wse_sync, name) is not None


def test_pack_is_json_stringify():
    p = WseJSON()
    assert p.pack("x") == '["x",null,null]'
    assert p.pack("x", {"a": [1, 2.5, None, True]}, "abc") == '["x",{"a":[1,2.5,null,true]},"abc"]'
    # no ASCII escaping and no escaped slashes, like JSON.stringify
    assert p.pack("é/ü", "ü/€") == '["é/ü","ü/€",null]'


@pytest.mark.parametrize("data,expected", [
    ('["a"]', ("a", None, None)),
    ('["a",1]', ("a", 1, None)),
    ('["a",1,"s"]', ("a", 1, "s")),
    ('["a",1,"s","extra"]', ("a", 1, "s")),
    (b'["a",{"k":"\xc3\xa9"},null]', ("a", {"k": "é"}, None)),
])
def test_unpack(data, expected):
    assert WseJSON().unpack(data) == expected


@pytest.mark.parametrize("data", ["not json", "{}", "[]", '"str"', "12", b"\xff\xfe"])
def test_unpack_rejects(data):
    with pytest.raises(ValueError):
        WseJSON().unpack(data)


def test_internal_types():
    assert dict(WseJSON.internal_types) == {
        "hi": "~wse:hi", "challenge": "~wse:challenge", "welcome": "~wse:welcome",
        "call": "~wse:call", "response": "~wse:response", "response_error": "~wse:response-err"}


def test_check_protocol():
    class Bad:
        name = "x"
        internal_types = {"hi": "h"}

        def pack(self, *a):
            pass

        def unpack(self, d):
            pass

    with pytest.raises(TypeError):
        check_protocol(Bad())
    assert check_protocol(WseJSON()).name == "wse-default-json"


def test_constants():
    assert WSE_REASON.CLIENTS_CONCURRENCY == "wse.clients-concurrency"
    assert WSE_REASON.NO_REASON == ""
    assert WSE_ERROR.RP_NOT_REGISTERED == "wse.server.rp.not-registered"
    assert WSE_ERROR.MESSAGE_PROCESSING_ERROR == "wse.server.msg-processing-error"
    assert set(WSE_STATUS) == {"IDLE", "CONNECTING", "RE_CONNECTING", "READY", "OFFLINE"}


def test_wse_error():
    e = WseError("x.y", {"a": 1})
    assert e.code == "x.y" and e.details == {"a": 1}
    assert e.to_json() == {"code": "x.y", "details": {"a": 1}}
    assert isinstance(e, Exception)


def test_rpc_error_from_wse_error_adds_rpc_and_payload():
    out = rpc_error_payload(WseError("my.code", {"field": 1}), "add", [1, 2])
    assert out == {"code": "my.code", "details": {"field": 1, "rpc": "add", "payload": [1, 2]}}
    # present keys are kept
    out = rpc_error_payload(WseError("c", {"rpc": "other"}), "add", 3)
    assert out["details"] == {"rpc": "other", "payload": 3}
    assert rpc_error_payload(WseError("c"), "r", None) == {
        "code": "c", "details": {"rpc": "r", "payload": None}}


def test_rpc_error_from_plain_exception():
    try:
        raise KeyError("nope")
    except KeyError as exc:
        out = rpc_error_payload(exc, "get", {"k": 1})
        full = rpc_error_payload(exc, "get", {"k": 1}, traceback_in_stack=True)
    assert out["code"] == WSE_ERROR.RP_EXECUTION_FAILED
    assert out["message"] == "'nope'"
    origin = out["details"]["origin"]
    assert origin["name"] == "KeyError" and origin["message"] == "'nope'"
    # no traceback unless asked: it names the server's files
    assert origin["stack"] == "KeyError: 'nope'"
    assert out["details"]["rpc"] == "get" and out["details"]["payload"] == {"k": 1}
    stack = full["details"]["origin"]["stack"]
    assert stack.startswith("Traceback") and "test_codec.py" in stack and "KeyError" in stack
    assert set(full["details"]["origin"]) == set(origin)

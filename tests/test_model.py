"""The catalog fold and the wire values: good records fold, bad ones are refused by name."""

import json

import pytest

from federation.errors import InputError
from federation.model import (
    Catalog,
    ClusterRecord,
    Endpoint,
    Export,
    ImportRecord,
    ServiceKey,
)


def _put(obj) -> bytes:
    return json.dumps(obj.to_json()).encode()


EAST = ClusterRecord("east-1", "us-east", "a", "east-1.isthmus.local", "127.0.0.1:15101")
ECHO = Export("east-1", "default", "echo", 8080, "tcp", (Endpoint("127.0.0.1", 9001),), ("west-1",))


def test_snapshot_fold_and_json_round_trip():
    items = [
        (EAST.key, _put(EAST)),
        ("catalog/live/east-1", b"{}"),
        (ECHO.key, _put(ECHO)),
        (ImportRecord("east-1", "default", "echo").key, _put(ImportRecord("east-1", "default", "echo"))),
    ]
    cat = Catalog.from_items(items, 7)
    assert cat.revision == 7 and cat.clusters["east-1"] == EAST and cat.live == {"east-1"}
    assert cat.exports_of(ServiceKey("default", "echo")) == [ECHO]
    again = Catalog.from_json(json.loads(json.dumps(cat.to_json())))
    assert again.to_json() == cat.to_json()


def test_lease_gone_hides_exports_and_delete_removes():
    cat = Catalog.from_items([(EAST.key, _put(EAST)), ("catalog/live/east-1", b"{}"), (ECHO.key, _put(ECHO))], 3)
    cat = cat.apply("catalog/live/east-1", None, 4)
    assert cat.exports_of(ECHO.service) == [] and cat.revision == 4
    cat = cat.apply(ECHO.key, None, 5)
    assert ECHO.key not in cat.exports


@pytest.mark.parametrize(
    "key, value, phrase",
    [
        (ECHO.key, b"{not json", "not valid JSON"),
        (ECHO.key, json.dumps({**ECHO.to_json(), "port": 0}).encode(), "port: 0 is not in 1..65535"),
        (ECHO.key, json.dumps({**ECHO.to_json(), "cluster": "west-1"}).encode(), "the export inside names"),
        (EAST.key, json.dumps({**EAST.to_json(), "gateway_address": "nowhere"}).encode(), "gateway_address"),
        (ECHO.key, json.dumps({**ECHO.to_json(), "protocol": "grpc"}).encode(),
         "protocol: 'grpc' is not supported .use tcp or http."),
        ("catalog/exports/east-1/default/echo",
         json.dumps({**ECHO.to_json(), "endpoints": [{"address": "1.2.3.4:5", "healthy": "yes", "weight": 1}]}).encode(),
         "endpoints[0].healthy"),
    ],
)
def test_malformed_records_are_refused_naming_the_field(key, value, phrase):
    with pytest.raises(InputError, match=phrase.replace("[", r"\[").replace("]", r"\]")):
        Catalog().apply(key, value, 1)


def test_apply_all_skips_a_malformed_record_and_keeps_the_rest():
    errors = []
    cat = Catalog().apply_all(
        [(EAST.key, _put(EAST), 1), (ECHO.key, b"[]", 2), ("catalog/live/east-1", b"{}", 3)],
        on_error=errors.append,
    )
    assert cat.revision == 3 and "east-1" in cat.live and cat.exports == {}
    assert len(errors) == 1 and ECHO.key in str(errors[0])


def test_an_http_export_round_trips():
    web = Export("east-1", "default", "web", 80, "http", (Endpoint("127.0.0.1", 9002),))
    assert Export.from_json(json.loads(json.dumps(web.to_json()))) == web

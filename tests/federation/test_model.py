"""The catalog fold and the wire values: good records fold, bad ones are refused by name."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.errors import InputError
from federation.model import (
    Catalog,
    ClusterRecord,
    Endpoint,
    Export,
    ImportRecord,
    ServiceKey,
)
from federation.units import HOSTPORT_PATTERN


def _put(obj) -> bytes:
    return json.dumps(obj.to_json()).encode()


EAST = ClusterRecord("east-1", "us-east", "a", "east-1.isthmus.local", "127.0.0.1:15101")
ECHO = Export("east-1", "default", "echo", 8080, "tcp", (Endpoint("127.0.0.1", 9001),), ("west-1",))


def test_snapshot_fold_and_json_round_trip():
    items = [
        (EAST.key, _put(EAST)),
        ("catalog/live/east-1", b"{}"),
        (ECHO.key, _put(ECHO)),
        (
            ImportRecord("east-1", "default", "echo").key,
            _put(ImportRecord("east-1", "default", "echo")),
        ),
    ]
    cat = Catalog.from_items(items, 7)
    assert cat.revision == 7 and cat.clusters["east-1"] == EAST and cat.live == {"east-1"}
    assert cat.exports_of(ServiceKey("default", "echo")) == [ECHO]
    again = Catalog.from_json(json.loads(json.dumps(cat.to_json())))
    assert again.to_json() == cat.to_json()


def test_lease_gone_hides_exports_and_delete_removes():
    cat = Catalog.from_items(
        [(EAST.key, _put(EAST)), ("catalog/live/east-1", b"{}"), (ECHO.key, _put(ECHO))], 3
    )
    cat = cat.apply("catalog/live/east-1", None, 4)
    assert cat.exports_of(ECHO.service) == [] and cat.revision == 4
    cat = cat.apply(ECHO.key, None, 5)
    assert ECHO.key not in cat.exports


@pytest.mark.parametrize(
    "key, value, phrase",
    [
        (ECHO.key, b"{not json", "not valid JSON"),
        (ECHO.key, json.dumps({**ECHO.to_json(), "port": 0}).encode(),
         "port: 0 is not in 1..65535"),
        (ECHO.key, json.dumps({**ECHO.to_json(), "cluster": "west-1"}).encode(),
         "the export inside names"),
        (EAST.key, json.dumps({**EAST.to_json(), "gateway_address": "nowhere"}).encode(),
         "gateway_address"),
        (ECHO.key, json.dumps({**ECHO.to_json(), "protocol": "grpc"}).encode(),
         "protocol: 'grpc' is not supported .use tcp or http."),
        ("catalog/exports/east-1/default/echo",
         json.dumps({
             **ECHO.to_json(),
             "endpoints": [{"address": "1.2.3.4:5", "healthy": "yes", "weight": 1}],
         }).encode(),
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


# ---- numbers and names are ASCII (federation/units.py) ---------------------------------------

# Each of these passes str.isdigit() or int()/float() or regex \d, and must not pass here.
NOT_ASCII_NUMBERS = ("¹", "²", "٣", "٣٣", "١٩٠٠١", "𝟗", "+1", "-1", " 1", "1 ", "1_0", "1e3",
                     "nan", "inf", "0x10", "", "1\n")


@pytest.mark.parametrize("text", NOT_ASCII_NUMBERS)
def test_parse_int_and_decimal_take_ascii_digits_only(text):
    from federation.units import parse_decimal, parse_int

    with pytest.raises(InputError, match=r"^lease: .* \(ASCII digits 0-9\)$"):
        parse_int(text, "lease")
    with pytest.raises(InputError, match=r"^rate: "):
        parse_decimal(text, "rate")


def test_parse_int_bounds_and_good_values():
    from federation.units import parse_decimal, parse_int

    assert parse_int("0", "n") == 0 and parse_int("0080", "n") == 80
    assert parse_int(str(2**63 - 1), "n") == 2**63 - 1
    with pytest.raises(InputError, match=r"^n: 0 is not in 1\.\.5$"):
        parse_int("0", "n", 1, 5)
    with pytest.raises(InputError, match=r"^n: '9999999999999999999999999999999999999999'\.\.\."):
        parse_int("9" * 100, "n")  # long input is cut, and int() never sees it
    assert parse_decimal("99.5", "x") == 99.5 and parse_decimal("3", "x") == 3.0


@pytest.mark.parametrize("port", ["²", "٣٣", "+80", " 80", "8_0", "80\n"])
def test_addresses_take_ascii_ports_only(port):
    from federation.units import parse_hostport

    with pytest.raises(InputError, match="ASCII digits"):
        parse_hostport(f"127.0.0.1:{port}")
    with pytest.raises(InputError, match=r"endpoint\.address: .*ASCII digits"):
        Endpoint.from_json({"address": f"127.0.0.1:{port}", "healthy": True, "weight": 1})


@pytest.mark.parametrize("text", ["٣s", "²s", "1e3s", "-1s", "+1s", "1_0s", "5\u2003s"])
def test_durations_take_ascii_digits_only(text):
    from federation.units import parse_duration

    with pytest.raises(InputError, match="is not a duration"):
        parse_duration(text)


def test_abort_on_takes_ascii_digits_only():
    from federation.drills import parse_slo

    assert parse_slo("success<99%:5s").threshold == 0.99
    for text in ("success<٩٩%:5s", "p99>٥٠٠:3s", "success<99%:٥s"):
        with pytest.raises(InputError, match="abort_on"):
            parse_slo(text)


@pytest.mark.parametrize("name", ["east-1\n", "east-1\r", "ëast-1", "east\u20131", "ｅａｓｔ"])
def test_names_are_ascii_and_matched_whole(name):
    from federation.fields import check_name

    with pytest.raises(InputError, match="is not a valid name"):
        check_name(name, "cluster")
    with pytest.raises(InputError, match="cluster.name"):
        ClusterRecord.from_json({**EAST.to_json(), "name": name})


def test_drill_ids_are_matched_whole():
    from federation.drill_model import is_drill_id

    assert is_drill_id("d-20250101-000000-abcd")
    assert not is_drill_id("d-20250101-000000-abcd\n")
    assert not is_drill_id("d-٢٠٢٥0101-000000-abcd")


@settings(max_examples=300, deadline=None)
@given(st.from_regex(HOSTPORT_PATTERN, fullmatch=True))
def test_every_address_the_openapi_pattern_allows_is_taken(text):
    """The document's host:port pattern is a subset of what the server takes, so a client
    that follows the document is never refused for an address."""
    from federation.units import parse_hostport

    host, port = parse_hostport(text)
    assert 1 <= port <= 65535 and host

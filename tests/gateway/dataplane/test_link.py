"""The link codec: frames and control messages, incremental reading, and protocol errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.dataplane import link
from gateway.dataplane.link import (
    DATA,
    EOF,
    ERR,
    HEADER,
    MAX_CONTROL,
    MAX_FRAME,
    NAMES,
    OK,
    OPEN,
    PING,
    PONG,
    RST,
    WINDOW,
    FrameReader,
    control,
    frame,
    parse_control,
)
from gateway.errors import LinkProtocolError, OpenRefused

KINDS = sorted(NAMES)
CONTROL_KINDS = (OPEN, OK, ERR)


# ------------------------------------------------------------------------------ encoding


def test_frame_layout_is_type_stream_length_payload():
    data = frame(DATA, 7, b"hello")
    assert data == bytes([DATA]) + (7).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"hello"
    assert HEADER.size == 9
    assert frame(EOF, 3) == bytes([EOF, 0, 0, 0, 3, 0, 0, 0, 0])


@pytest.mark.parametrize("kind", KINDS)
def test_empty_frame_round_trip(kind):
    assert FrameReader().feed(frame(kind, 5)) == [(kind, 5, b"")]


@pytest.mark.parametrize(
    "kind, obj",
    [
        (OPEN, {"v": link.VERSION, "service": "shop/cart"}),
        (OK, {"cluster": "east-2", "endpoint": "local:10.0.0.1:8080"}),
        (ERR, {"code": "forbidden", "error": "cluster west-1 may not consume shop/cart"}),
        (OK, {"unicode": "Zürich ☃", "nested": {"a": [1, 2, None]}}),
    ],
)
def test_control_round_trip(kind, obj):
    frames = FrameReader().feed(control(kind, 11, obj))
    assert len(frames) == 1
    got_kind, sid, payload = frames[0]
    assert got_kind == kind and sid == 11
    assert parse_control(got_kind, payload) == obj


def test_control_is_compact_json():
    payload = control(OPEN, 1, {"v": 1, "service": "a/b"})[HEADER.size :]
    assert payload == b'{"v":1,"service":"a/b"}'


@given(st.dictionaries(st.text(max_size=10), st.integers() | st.text(max_size=20), max_size=8))
def test_control_round_trip_property(obj):
    ((kind, _, payload),) = FrameReader().feed(control(OK, 1, obj))
    assert kind == OK
    assert parse_control(kind, payload) == obj


# ------------------------------------------------------------------------------ incremental reading

frames_strategy = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(0, 2**32 - 1), st.binary(max_size=300)),
    min_size=0,
    max_size=12,
)


def _wire(frames):
    return b"".join(frame(k, s, p) for k, s, p in frames)


@given(frames_strategy)
def test_byte_by_byte_yields_the_same_frames(frames):
    wire = _wire(frames)
    reader = FrameReader()
    got = []
    for i in range(len(wire)):
        got += reader.feed(wire[i : i + 1])
    assert got == frames
    assert reader.pending == 0


@given(frames_strategy, st.data())
def test_random_splits_yield_the_same_frames(frames, data):
    wire = _wire(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20), label="cuts"))
    reader = FrameReader()
    got = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        got += reader.feed(wire[prev:cut])
        prev = cut
    assert got == frames
    assert reader.pending == 0


@given(frames_strategy)
def test_all_at_once_yields_the_same_frames(frames):
    assert FrameReader().feed(_wire(frames)) == frames


def test_partial_frame_is_kept_pending():
    reader = FrameReader()
    wire = frame(DATA, 1, b"abcdef")
    assert reader.feed(wire[:3]) == []
    assert reader.pending == 3
    assert reader.feed(wire[3:12]) == []
    assert reader.pending == 12
    assert reader.feed(wire[12:] + frame(PING, 0)[:1]) == [(DATA, 1, b"abcdef")]
    assert reader.pending == 1
    assert reader.feed(frame(PING, 0)[1:]) == [(PING, 0, b"")]
    assert reader.pending == 0


def test_frame_of_exactly_max_size_is_accepted():
    payload = b"x" * MAX_FRAME
    reader = FrameReader()
    assert reader.feed(frame(DATA, 1, payload)[:-1]) == []
    assert reader.feed(payload[-1:]) == [(DATA, 1, payload)]


# ------------------------------------------------------------------------------ protocol errors


def test_oversize_frame_is_refused_from_its_header():
    header = HEADER.pack(DATA, 1, MAX_FRAME + 1)
    with pytest.raises(LinkProtocolError) as e:
        FrameReader().feed(header)  # refused before the payload is buffered
    msg = str(e.value)
    assert "DATA" in msg
    assert str(MAX_FRAME + 1) in msg
    assert str(MAX_FRAME) in msg


def test_oversize_frame_after_good_frames_is_refused():
    reader = FrameReader()
    with pytest.raises(LinkProtocolError, match="OPEN frame of 4294967295 bytes"):
        reader.feed(frame(PING, 0) + HEADER.pack(OPEN, 1, 0xFFFFFFFF))


@pytest.mark.parametrize("kind", [0, 10, 42, 255])
def test_unknown_frame_type_is_refused(kind):
    with pytest.raises(LinkProtocolError, match=f"unknown frame type {kind}"):
        FrameReader().feed(bytes([kind]) + b"\0" * 8)


def test_unknown_type_is_refused_as_soon_as_its_header_arrives():
    reader = FrameReader()
    reader.feed(b"\x0a\0\0\0\0\0")
    with pytest.raises(LinkProtocolError, match="unknown frame type 10"):
        reader.feed(b"\0\0\x10")


@pytest.mark.parametrize(
    "payload, problem",
    [
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"service=a/b", "not JSON"),
        (b"\xff\xfe{}", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"open"', "not a JSON object"),
        (b"null", "not a JSON object"),
        (b"[" * 3000, "not JSON"),  # nesting deep enough to exhaust the decoder's recursion
    ],
    ids=["empty", "truncated", "form", "bad-utf8", "array", "string", "null", "deep-nesting"],
)
@pytest.mark.parametrize("kind", CONTROL_KINDS)
def test_non_json_control_is_refused(kind, payload, problem):
    with pytest.raises(LinkProtocolError) as e:
        parse_control(kind, payload)
    assert NAMES[kind] in str(e.value)
    assert problem in str(e.value)


def test_oversize_control_is_refused():
    payload = json.dumps({"service": "x" * MAX_CONTROL}).encode()
    with pytest.raises(LinkProtocolError) as e:
        parse_control(OPEN, payload)
    assert f"OPEN frame of {len(payload)} bytes (max {MAX_CONTROL})" == str(e.value)


@given(st.binary(max_size=200))
def test_parse_control_raises_only_link_errors(payload):
    try:
        obj = parse_control(OPEN, payload)
    except LinkProtocolError as e:
        assert "OPEN frame" in str(e)
    else:
        assert isinstance(obj, dict)


@given(st.binary(max_size=64))
def test_frame_reader_raises_only_link_errors_on_garbage(data):
    reader = FrameReader()
    try:
        for kind, _, payload in reader.feed(data):
            assert kind in NAMES
            assert len(payload) <= MAX_FRAME
    except LinkProtocolError as e:
        assert "frame" in str(e)


def test_names_cover_every_type():
    assert {OPEN, OK, ERR, DATA, EOF, PING, PONG, RST, WINDOW} == set(NAMES)
    assert len(set(NAMES.values())) == len(NAMES)


def test_data_payloads_are_views_of_the_chunk_and_control_payloads_bytes():
    """Bulk: DATA payloads are not copied out of the chunk they came in; a frame split across
    chunks is joined once; control payloads (JSON, PING tokens used as keys) are bytes."""
    big = bytes(range(256)) * 1024
    wire = frame(DATA, 1, big) + control(OK, 1, {"endpoint": "e"}) + frame(DATA, 3, b"tail-frame")
    reader = FrameReader()
    cut = len(wire) - 4
    got = reader.feed(wire[:cut])
    assert [(k, s) for k, s, _ in got] == [(DATA, 1), (OK, 1)]
    assert isinstance(got[0][2], memoryview) and got[0][2].readonly and got[0][2] == big
    assert type(got[1][2]) is bytes and parse_control(OK, got[1][2]) == {"endpoint": "e"}
    assert reader.pending == len(frame(DATA, 3, b"tail-frame")) - 4
    ((kind, sid, payload),) = reader.feed(wire[cut:])
    assert (kind, sid, bytes(payload)) == (DATA, 3, b"tail-frame")
    assert reader.pending == 0


# ------------------------------------------------------------------------------ OPEN


@pytest.mark.parametrize(
    "sid, last, problem",
    [
        (2**31 + 1, 0, "stream id 2147483649 (max 2147483647"),
        (2**32 - 1, 7, "stream id 4294967295 (max 2147483647"),
        (4, 1, "stream id 4 after 1"),
        (3, 3, "stream id 3 after 3"),
        (1, 5, "stream id 1 after 5"),
    ],
    ids=["above-max", "max-u32", "even", "reused", "falling"],
)
def test_bad_open_stream_ids_are_protocol_errors_naming_the_id(sid, last, problem):
    with pytest.raises(LinkProtocolError) as e:
        link.check_open_id(sid, last)
    assert problem in str(e.value)


def test_open_stream_ids_up_to_the_maximum_are_accepted():
    link.check_open_id(1, 0)
    link.check_open_id(link.MAX_STREAM_ID, link.MAX_STREAM_ID - 2)


@pytest.mark.parametrize(
    "request_, shown",
    [
        ({"v": 999, "service": "a/b"}, "version '999' is not supported"),
        ({"v": 1, "service": "a/b"}, "version '1' is not supported"),
        ({"v": "2", "service": "a/b"}, "version '\"2\"' is not supported"),
        ({"v": 2.0, "service": "a/b"}, "version '2.0' is not supported"),
        ({"v": True, "service": "a/b"}, "version 'true' is not supported"),
        ({"v": None, "service": "a/b"}, "version 'null' is not supported"),
        ({"v": "x" * 500}, "version '\"xxxxxx"),
        ({"service": "a/b"}, 'has no version "v"'),
    ],
    ids=["999", "old", "string", "float", "bool", "null", "long", "missing"],
)
def test_open_of_another_version_is_refused_naming_what_was_sent(request_, shown):
    payload = control(OPEN, 7, request_)[HEADER.size :]
    with pytest.raises(OpenRefused) as e:
        link.parse_open(7, payload)
    assert e.value.code == "unsupported-version"
    assert "OPEN on stream 7" in str(e.value) and shown in str(e.value)
    assert f"this gateway speaks {link.VERSION}" in str(e.value)
    assert len(str(e.value)) < 200  # the peer's value is quoted, bounded


def test_open_of_our_version_is_parsed_and_malformed_ones_cut_the_link():
    req = {"v": link.VERSION, "service": "shop/cart"}
    assert link.parse_open(1, control(OPEN, 1, req)[HEADER.size :]) == req
    with pytest.raises(LinkProtocolError, match="OPEN frame is not a JSON object"):
        link.parse_open(1, b"[2]")

"""gateway/dataplane/http/auth/openapi.py against a petstore-like spec (tests/data/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.core.policies import OpenApiSettings
from gateway.dataplane.http.auth.openapi import OpenApiError, OpenApiValidator

SPEC = Path(__file__).resolve().parents[5] / "tests" / "data" / "petstore-openapi.yaml"
HEADERS = {"Content-Type": "application/json", "X-Request-Id": "abcdef12"}
PET = {"name": "rex", "tag": None, "owner": {"email": "ann@example.org"},
       "vaccinations": [{"kind": "rabies", "on": "2026-01-02"}], "labels": {"any": "thing"}}


def validator(**kw) -> OpenApiValidator:
    return OpenApiValidator.from_file(SPEC, OpenApiSettings(str(SPEC), **kw))


REJECT = validator()
DROP = validator(unknown_fields="drop")


def check(method, path, query="", headers=HEADERS, body=b"", v=REJECT):
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    return v.check(method, path, query, headers, body)


def problem(result) -> dict:
    assert not result.ok and result.problem_body is not None
    doc = json.loads(result.problem_body)
    assert {"type", "title", "status", "detail"} <= set(doc) and doc["status"] == result.status
    assert doc["type"].startswith("urn:isthmus:problem:")
    return doc


@pytest.mark.parametrize(
    "method, path, query, body",
    [
        ("GET", "/pets", "", b""),
        ("GET", "/pets", "limit=100&tag=a&tag=b", b""),
        ("GET", "/pets", "limit=1&unlisted=ok", b""),  # undeclared query parameters pass
        ("POST", "/pets", "", PET),
        ("POST", "/pets", "", {"name": "x"}),
        ("GET", "/pets/mine", "", b""),  # concrete path before /pets/{petId}
        ("GET", "/pets/7", "", b""),
        ("PUT", "/pets/7", "", {**PET, "id": 7}),  # allOf of NewPet and id
        ("DELETE", "/pets/7", "force=true", b""),
        ("PUT", "/pets/7/photo", "", b"\x89PNG"),
    ],
)
def test_good_requests_pass(method, path, query, body):
    headers = {**HEADERS, "Content-Type": "image/png"} if path.endswith("photo") else HEADERS
    got = check(method, path, query, headers, body)
    assert got.ok and got.status == 200 and got.new_body is None, got.problem_body


@pytest.mark.parametrize(
    "method, path, query, headers, body, status, errors",
    [
        ("GET", "/cats", "", HEADERS, b"", 404, None),
        ("GET", "/pets/7/x", "", HEADERS, b"", 404, None),
        ("PATCH", "/pets/7", "", HEADERS, b"", 405, None),
        ("GET", "/pets", "limit=0", HEADERS, b"", 400, [("query", "limit", "minimum")]),
        ("GET", "/pets", "limit=ten", HEADERS, b"", 400, [("query", "limit", "not an integer")]),
        ("GET", "/pets", "limit=1&limit=2", HEADERS, b"", 400, [("query", "limit", "once")]),
        ("GET", "/pets", "tag=" + "x" * 21, HEADERS, b"", 400, [("query", "tag", "long")]),
        ("GET", "/pets", "", {}, b"", 400, [("header", "x-request-id", "required")]),
        ("GET", "/pets", "", {"x-request-id": "NOPE"}, b"", 400,
         [("header", "x-request-id", "match")]),
        ("GET", "/pets/abc", "", HEADERS, b"", 400, [("path", "petId", "not an integer")]),
        ("GET", "/pets/0", "", HEADERS, b"", 400, [("path", "petId", "minimum")]),
        ("DELETE", "/pets/1", "force=yes", HEADERS, b"", 400, [("query", "force", "true or")]),
        ("POST", "/pets", "", HEADERS, b"", 400, None),  # the body is required
        ("GET", "/pets/1", "", HEADERS, b"{}", 400, None),  # takes no body
        ("POST", "/pets", "", {"Content-Type": "text/plain"}, b"rex", 415, None),
        ("POST", "/pets", "", {}, b"{}", 415, None),
        ("POST", "/pets", "", HEADERS, b"{name: rex}", 400, None),  # not JSON
        ("POST", "/pets", "", HEADERS, {"tag": "t"}, 400, [("#", '"name" is a required')]),
        ("POST", "/pets", "", HEADERS, {"name": ""}, 400, [("#/name", "shorter than 1")]),
        ("POST", "/pets", "", HEADERS, {"name": "r", "owner": {"email": "no"}}, 400,
         [("#/owner/email", "email")]),
        ("POST", "/pets", "", HEADERS, {"name": "r", "vaccinations": [{"kind": "flu"}]}, 400,
         [("#/vaccinations/0/kind", "is not one of")]),
        ("PUT", "/pets/1", "", HEADERS, {"name": "r", "id": "1"}, 400, [("#/id", "type")]),
        ("PUT", "/pets/1/photo", "", {"Content-Type": "text/plain"}, b"x", 415, None),
    ],
)
def test_bad_requests_name_the_field(method, path, query, headers, body, status, errors):
    got = check(method, path, query, headers, body)
    doc = problem(got)
    assert got.status == status, doc
    if errors is None:
        return
    listed = doc["errors"]
    assert len(listed) == len(errors), listed
    for err, want in zip(listed, errors, strict=True):
        if len(want) == 3:
            assert (err["in"], err["name"]) == want[:2] and want[2] in err["detail"], err
        else:
            assert err["pointer"] == want[0] and want[1] in err["detail"], err


def test_405_lists_the_allowed_methods():
    got = check("PATCH", "/pets/7")
    assert got.headers == (("allow", "GET, PUT, DELETE"),)


EXTRA = {**PET, "color": "brown", "owner": {"email": "a@b.co", "phone": "1"},
         "vaccinations": [{"kind": "rabies", "batch": "x"}], "labels": {"free": "form"}}


def test_unknown_fields_rejected():
    doc = problem(check("POST", "/pets", body=EXTRA))
    assert doc["status"] == 400 and doc["type"].endswith("unknown-fields")
    assert sorted(e["pointer"] for e in doc["errors"]) == [
        "#/color", "#/owner/phone", "#/vaccinations/0/batch"]  # labels is free-form


def test_unknown_fields_dropped_and_the_body_rewritten():
    got = check("POST", "/pets", body=EXTRA, v=DROP)
    assert got.ok and got.new_body is not None
    assert json.loads(got.new_body) == {**PET, "owner": {"email": "a@b.co"},
                                        "vaccinations": [{"kind": "rabies"}],
                                        "labels": {"free": "form"}}
    # through allOf too, and a body without unknown fields is left as it is
    put = check("PUT", "/pets/3", body={"name": "r", "id": 3, "zz": 1}, v=DROP)
    assert json.loads(put.new_body) == {"name": "r", "id": 3}
    assert check("PUT", "/pets/3", body={"name": "r", "id": 3}, v=DROP).new_body is None


def test_the_size_limit_is_checked_before_parsing():
    v = validator(max_body_bytes=16)
    got = check("POST", "/pets", body=b"{" * 17, v=v)  # not JSON, but too big first
    assert problem(got)["status"] == 413
    assert check("POST", "/pets", body={"name": "r"}, v=v).ok


def test_base_path():
    v = validator(base_path="/api")
    assert check("GET", "/api/pets/mine", v=v).ok
    assert problem(check("GET", "/pets/mine", v=v))["status"] == 404
    assert problem(check("GET", "/apix/pets/mine", v=v))["status"] == 404


def test_yaml_keys_like_on_stay_strings():
    """The spec's Vaccination has a property `on` (a boolean key in YAML 1.1)."""
    assert check("POST", "/pets", body={"name": "r", "vaccinations": [{"on": "2026-01-02"}]}).ok
    bad = problem(check("POST", "/pets", body={"name": "r", "vaccinations": [{"on": "x"}]}))
    assert bad["errors"][0]["pointer"] == "#/vaccinations/0/on"


def test_a_client_value_is_not_echoed_whole():
    got = check("GET", "/" + "a" * 5000)
    assert len(got.problem_body) < 400


SPEC_31 = {
    "openapi": "3.1.0",
    "info": {"title": "t", "version": "1"},
    "paths": {"/items/{id}": {"put": {
        "parameters": [{"name": "id", "in": "path", "required": True,
                        "schema": {"type": "string", "pattern": "^[a-z]+$"}}],
        "requestBody": {"content": {"application/merge-patch+json": {"schema": {
            "$ref": "#/components/schemas/Item"}}}},
        "responses": {"200": {"description": "ok"}}}}},
    "components": {"schemas": {"Item": {"type": "object", "properties": {
        "note": {"type": ["string", "null"]}, "count": {"type": "integer"}}}}},
}


def test_openapi_3_1_from_a_json_file(tmp_path):
    path = tmp_path / "items.json"
    path.write_text(json.dumps(SPEC_31))
    v = OpenApiValidator.from_file(path, OpenApiSettings(str(path)))
    h = {"content-type": "application/merge-patch+json"}
    assert v.check("PUT", "/items/abc", "", h, b'{"note": null, "count": 2}').ok
    bad = json.loads(v.check("PUT", "/items/abc", "", h, b'{"count": 2.5}').problem_body)
    assert bad["errors"][0]["pointer"] == "#/count"
    assert not v.check("PUT", "/items/ABC", "", h, b"{}").ok


def test_openapi_3_0_nullable_and_read_only(tmp_path):
    spec = {"openapi": "3.0.3", "paths": {"/t": {"post": {"requestBody": {"content": {
        "application/json": {"schema": {"type": "object", "required": ["id", "size"],
                                         "properties": {
                                             "id": {"type": "integer", "readOnly": True},
                                             "size": {"type": "string", "nullable": True,
                                                      "enum": ["s", "m"]}}}}}}}}}}
    path = tmp_path / "t.yaml"
    path.write_text(json.dumps(spec))
    v = OpenApiValidator.from_file(path, OpenApiSettings(str(path)))
    h = {"content-type": "application/json"}
    assert v.check("POST", "/t", "", h, b'{"size": null}').ok  # id is readOnly: not required
    assert v.check("POST", "/t", "", h, b'{"size": "m"}').ok
    assert not v.check("POST", "/t", "", h, b'{"size": "xl"}').ok
    assert not v.check("POST", "/t", "", h, b'{}').ok


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"openapi": "2.0", "paths": {"/a": {}}}, "not 3.0.x or 3.1.x"),
        ({"openapi": "3.0.0"}, "#/paths"),
        ({"openapi": "3.0.0", "paths": {"a": {}}}, "must start with '/'"),
        ({"openapi": "3.0.0", "paths": {"/a/{id}": {"get": {"responses": {}}}}},
         "path parameter 'id' is not declared"),
        ({"openapi": "3.0.0", "paths": {"/a": {"get": {"parameters": [
            {"$ref": "#/components/parameters/Nope"}]}}}}, "points at nothing"),
        ({"openapi": "3.0.0", "paths": {"/a": {"post": {"requestBody": {"content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Nope"}}}}}}}},
         "unusable schema"),
        ({"openapi": "3.0.0", "paths": {"/a": {"get": {"parameters": [
            {"$ref": "other.yaml#/p"}]}}}}, "only local $refs"),
    ],
)
def test_unusable_specs_are_refused_naming_file_and_part(tmp_path, spec, message):
    path = tmp_path / "api.yaml"
    path.write_text(json.dumps(spec))
    with pytest.raises(OpenApiError, match="api.yaml: ") as e:
        OpenApiValidator.from_file(path, OpenApiSettings(str(path)))
    assert message in str(e.value)


def test_a_missing_or_broken_file(tmp_path):
    with pytest.raises(OpenApiError, match="cannot read"):
        OpenApiValidator.from_file(tmp_path / "absent.yaml", OpenApiSettings("x"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("openapi: [unclosed\n")
    with pytest.raises(OpenApiError, match="not a YAML or JSON"):
        OpenApiValidator.from_file(bad, OpenApiSettings(str(bad)))

"""OpenAPI 3.0 / 3.1 request validation for a route's `openapi` policy.

Theory of operation
-------------------
`OpenApiValidator.from_file(path, settings)` reads the spec (YAML or JSON, at most
MAX_SPEC_BYTES; YAML 1.2 booleans) and compiles it once: every path template to a regular
expression, every operation's parameters and JSON request-body schema to a jsonschema-rs
validator (Rust; ~1 µs for a small body where the pure-Python jsonschema took ~150 µs — see
BENCHMARKS.md). OpenAPI 3.1 schemas are JSON Schema 2020-12 as they are; 3.0 schemas are
turned into JSON Schema draft 4 first (`nullable: true` adds "null" to `type` and `enum`; a
`readOnly` property is not required in a request). Each validator's root is the whole spec
with a `$ref` to the schema's JSON pointer, so `$ref`s resolve in the spec document. A spec it
cannot use is an `OpenApiError` naming the file and the JSON pointer of the part that is
wrong. Formats jsonschema-rs knows (email, date, date-time, uuid, ...) are checked.

`check(method, path, query_string, headers, body)` then answers, in this order (the first
failure is the answer; within one step every error is listed, at most MAX_ERRORS):

1. path: `base_path` stripped, then matched against the templates — concrete paths before
   templated ones (OpenAPI 3: "/pets/mine" wins over "/pets/{id}"), then fewer parameters
   first — none matching: 404; matched but no operation for the method: 405 (the allowed
   methods in `headers`, as an Allow header);
2. size: a body over `max_body_bytes` is 413, before any parsing;
3. parameters (path, query, header; operation-level ones replace path-level ones of the same
   name and place): required ones present, each value converted by its schema's type
   (integer, number, boolean, string; arrays as repeated query keys with `explode`, else
   comma-separated) and validated against the schema: 400;
4. body: required and missing: 400; a body where the operation declares none: 400; a media
   type the operation does not list (`type/*` and `*/*` ranges count): 415; for JSON media
   types (application/json, */*+json), not JSON: 400, not valid against the schema: 400;
   other media types are passed unchecked;
5. unknown fields: object members that no `properties` of the schema declare (looked up
   through `$ref`, `allOf`, `oneOf`, `anyOf`; an object schema without any `properties`, or
   with `additionalProperties`/`patternProperties`, is free-form and never checked) are, per
   `unknown_fields`, refused (`reject`: 400 naming each one) or removed (`drop`: the result's
   `new_body` is the body re-serialized without them, and the caller forwards that instead).

Failures carry an RFC 9457 `application/problem+json` body: `type`, `title`, `status`,
`detail`, and `errors`, each with a JSON pointer into the body (`#/pets/0/name`) or, for a
parameter, its `in` and `name`, and a `detail`. A value sent by the client is echoed back at
most MAX_ECHO characters long (schema messages: 200).

Only local `$ref`s (`#/components/...`) are followed: a spec must be one file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote

import jsonschema_rs
import yaml

from gateway.core.policies import OpenApiSettings

__all__ = ["OpenApiError", "OpenApiValidator", "ValidationResult", "PROBLEM_JSON"]

MAX_SPEC_BYTES = 4 * 1024 * 1024
MAX_ERRORS = 20
MAX_ECHO = 60
MAX_QUERY_FIELDS = 1000
PROBLEM_JSON = "application/problem+json"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_INT = re.compile(r"-?[0-9]{1,30}")
_PARAM = re.compile(r"\{([^{}/]+)\}")


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's booleans (true/false only): in YAML 1.1 a property named
    `on`, `off`, `yes`, `no` or `y` would silently become a boolean key of the spec."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"))


class OpenApiError(Exception):
    """The spec file cannot be used; the message names the file and the part."""


@dataclass(frozen=True, slots=True)
class ValidationResult:
    ok: bool
    status: int = 200
    problem_body: bytes | None = None  # application/problem+json, when not ok
    new_body: bytes | None = None  # the body without unknown fields (unknown_fields: drop)
    headers: tuple[tuple[str, str], ...] = ()  # Allow, for a 405


OK = ValidationResult(True)


@dataclass(frozen=True, slots=True)
class _Param:
    name: str
    where: str  # path | query | header
    required: bool
    kind: str | None  # the schema's type: integer, number, boolean, string, array, ...
    item_kind: str | None
    explode: bool
    validator: Any | None


@dataclass(frozen=True, slots=True)
class _Media:
    media_type: str  # application/json, application/*, */*
    json: bool
    validator: Any | None
    schema: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class _Operation:
    params: tuple[_Param, ...]
    body_required: bool
    media: tuple[_Media, ...] | None  # None: the operation takes no body


@dataclass(frozen=True, slots=True)
class _Path:
    template: str
    regex: re.Pattern[str]
    names: tuple[str, ...]
    operations: dict[str, _Operation] = field(default_factory=dict)


class OpenApiValidator:
    def __init__(self, spec: Mapping[str, Any], settings: OpenApiSettings, source: str):
        self.settings = settings
        self.source = source
        self._spec = spec
        version = str(spec.get("openapi", ""))
        if version.startswith("3.0"):
            self._cls: Any = jsonschema_rs.Draft4Validator
            self._root = _from_oas30(spec)
        elif version.startswith("3.1"):
            self._cls = jsonschema_rs.Draft202012Validator
            self._root = dict(spec)
        else:
            raise OpenApiError(f"{source}: openapi version {version!r} is not 3.0.x or 3.1.x")
        self._shapes: dict[int, tuple[dict[str, Any], bool, Any]] = {}
        self._root.pop("$schema", None)
        self._root.pop("$id", None)
        paths = spec.get("paths")
        if not isinstance(paths, Mapping) or not paths:
            raise OpenApiError(f"{source}: #/paths: expected a mapping of paths")
        compiled = [self._compile_path(t, item) for t, item in paths.items()]
        self._paths = sorted(compiled, key=lambda p: (len(p.names), -len(p.template)))

    @classmethod
    def from_file(cls, path: str | Path, settings: OpenApiSettings) -> OpenApiValidator:
        name = str(path)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_SPEC_BYTES + 1)
        except OSError as e:
            raise OpenApiError(f"{name}: cannot read the OpenAPI file ({e.strerror or e})") \
                from None
        if len(data) > MAX_SPEC_BYTES:
            raise OpenApiError(f"{name}: larger than {MAX_SPEC_BYTES} bytes")
        try:
            spec = yaml.load(data.decode("utf-8"), Loader=_Yaml12Loader)  # noqa: S506 (safe)
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            raise OpenApiError(f"{name}: not a YAML or JSON document ({' '.join(str(e).split())})"
                               ) from None
        if not isinstance(spec, Mapping):
            raise OpenApiError(f"{name}: expected an OpenAPI document (a mapping)")
        return cls(spec, settings, name)

    # -- compiling ---------------------------------------------------------------------------

    def _compile_path(self, template: Any, item: Any) -> _Path:
        where = f"#/paths/{_escape(str(template))}"
        if not isinstance(template, str) or not template.startswith("/"):
            raise OpenApiError(f"{self.source}: {where}: a path must start with '/'")
        item, where = self._deref(item, where)
        names: list[str] = []
        pattern = ""
        pos = 0
        for m in _PARAM.finditer(template):
            pattern += re.escape(template[pos:m.start()]) + f"(?P<p{len(names)}>[^/]+)"
            names.append(m.group(1))
            pos = m.end()
        pattern += re.escape(template[pos:])
        shared = self._params(item.get("parameters", []), f"{where}/parameters")
        out = _Path(template, re.compile(pattern), tuple(names))
        for method in METHODS:
            if method in item:
                op, at = self._deref(item[method], f"{where}/{method}")
                own = self._params(op.get("parameters", []), f"{at}/parameters")
                merged = {**{(p.where, p.name): p for p in shared},
                          **{(p.where, p.name): p for p in own}}
                missing = [n for n in names if ("path", n) not in merged]
                if missing:
                    raise OpenApiError(f"{self.source}: {at}: path parameter "
                                       f"{missing[0]!r} is not declared")
                body = self._body(op.get("requestBody"), f"{at}/requestBody")
                out.operations[method.upper()] = _Operation(
                    tuple(merged.values()), body[0], body[1])
        return out

    def _params(self, raw: Any, where: str) -> list[_Param]:
        if not isinstance(raw, list):
            raise OpenApiError(f"{self.source}: {where}: expected a list")
        out = []
        for i, item in enumerate(raw):
            p, at = self._deref(item, f"{where}/{i}")
            name, place = p.get("name"), p.get("in")
            if not isinstance(name, str) or place not in ("path", "query", "header", "cookie"):
                raise OpenApiError(f"{self.source}: {at}: needs a name and in: "
                                   "path, query, header or cookie")
            if place == "cookie":
                continue  # not validated (documented in docs/policies.md)
            if place == "header" and name.lower() in ("accept", "content-type", "authorization"):
                continue  # OpenAPI 3: these are ignored as header parameters
            schema = p.get("schema")
            kind, item_kind = self._kinds(schema)
            style = p.get("style", "form" if place == "query" else "simple")
            explode = p.get("explode", style == "form")
            out.append(_Param(name.lower() if place == "header" else name, place,
                              bool(p.get("required", place == "path")), kind, item_kind,
                              bool(explode), self._validator(schema, f"{at}/schema")))
        return out

    def _body(self, raw: Any, where: str) -> tuple[bool, tuple[_Media, ...] | None]:
        if raw is None:
            return False, None
        body, where = self._deref(raw, where)
        content = body.get("content")
        if not isinstance(content, Mapping) or not content:
            raise OpenApiError(f"{self.source}: {where}/content: expected media types")
        media = []
        for media_type, m in content.items():
            mt = str(media_type).lower()
            schema = m.get("schema") if isinstance(m, Mapping) else None
            json_like = _is_json(mt) or mt in ("*/*", "application/*")
            validator = self._validator(schema, f"{where}/content/{_escape(mt)}/schema") \
                if json_like else None
            media.append(_Media(mt, json_like, validator, schema if json_like else None))
        return bool(body.get("required", False)), tuple(media)

    def _validator(self, schema: Any, where: str) -> Any | None:
        if schema is None:
            return None
        if not isinstance(schema, Mapping | bool):
            raise OpenApiError(f"{self.source}: {where}: a schema must be a mapping")
        # the root is the spec itself, pointing at this schema: its local $refs resolve there
        root = {**self._root, "$ref": quote(where, safe="#/~")}
        try:
            v = self._cls(root, validate_formats=True)
            v.is_valid(None)
        except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, ValueError) as e:
            first = str(e).split("\n", 1)[0]
            raise OpenApiError(f"{self.source}: {where}: unusable schema ({first})") from None
        return v

    def _deref(self, node: Any, where: str, depth: int = 0) -> tuple[Mapping[str, Any], str]:
        """The node a local $ref chain ends at, and its JSON pointer in the spec."""
        if not isinstance(node, Mapping):
            raise OpenApiError(f"{self.source}: {where}: expected a mapping")
        ref = node.get("$ref")
        if ref is None:
            return node, where
        if depth > 32 or not isinstance(ref, str) or not ref.startswith("#/"):
            raise OpenApiError(f"{self.source}: {where}: only local $refs (#/...) are followed")
        target = _pointer(self._spec, ref)
        if target is None:
            raise OpenApiError(f"{self.source}: {where}: $ref {ref!r} points at nothing")
        return self._deref(target, ref, depth + 1)

    def _kinds(self, schema: Any) -> tuple[str | None, str | None]:
        try:
            s = self._deref(schema, "")[0] if isinstance(schema, Mapping) else {}
        except OpenApiError:
            return None, None
        kind = _type(s)
        item_kind = None
        if kind == "array" and isinstance(s.get("items"), Mapping):
            try:
                item_kind = _type(self._deref(s["items"], "")[0])
            except OpenApiError:
                item_kind = None
        return kind, item_kind

    # -- checking ----------------------------------------------------------------------------

    def check(self, method: str, path: str, query_string: str, headers: Mapping[str, str],
              body: bytes) -> ValidationResult:
        base = self.settings.base_path
        if base:
            if path != base and not path.startswith(base + "/"):
                return _problem(404, "unknown-path", "No such path",
                                f"the path is not under {base}")
            path = path[len(base):] or "/"
        found = None
        for p in self._paths:
            m = p.regex.fullmatch(path)
            if m is not None:
                found = (p, m)
                break
        if found is None:
            return _problem(404, "unknown-path", "No such path",
                            f"no path of the API matches {_echo(path)}")
        template, match = found
        op = template.operations.get(method.upper())
        if op is None:
            allowed = ", ".join(template.operations)
            return _problem(405, "method-not-allowed", "Method not allowed",
                            f"{template.template} allows {allowed}", headers=(("allow", allowed),))
        if len(body) > self.settings.max_body_bytes:
            return _problem(413, "body-too-large", "Request body too large",
                            f"{len(body)} bytes, at most {self.settings.max_body_bytes}")
        path_values = {n: unquote(match.group(f"p{i}")) for i, n in enumerate(template.names)}
        errors = self._check_params(op, path_values, query_string, headers)
        if errors:
            return _problem(400, "invalid-parameters", "Invalid request parameters",
                            f"{len(errors)} parameter problem(s)", errors)
        return self._check_body(op, headers, body)

    def _check_params(self, op: _Operation, path_values: dict[str, str], query_string: str,
                      headers: Mapping[str, str]) -> list[dict[str, Any]]:
        try:
            query = parse_qs(query_string, keep_blank_values=True,
                             max_num_fields=MAX_QUERY_FIELDS) if query_string else {}
        except ValueError:
            return [{"in": "query", "name": "", "detail": f"more than {MAX_QUERY_FIELDS} fields"}]
        lower = {k.lower(): v for k, v in headers.items()} if op.params else {}
        errors: list[dict[str, Any]] = []
        for p in op.params:
            raw: list[str] | None
            if p.where == "path":
                raw = [path_values[p.name]] if p.name in path_values else None
            elif p.where == "query":
                raw = query.get(p.name)
            else:
                raw = [lower[p.name]] if p.name in lower else None
            if raw is None:
                if p.required:
                    errors.append({"in": p.where, "name": p.name, "detail": "is required"})
                continue
            try:
                value = _convert(p, raw)
            except ValueError as e:
                errors.append({"in": p.where, "name": p.name, "detail": str(e)})
                continue
            if p.validator is not None:
                for err in _errors(p.validator, value):
                    errors.append({"in": p.where, "name": p.name, "detail": _short(err.message)})
            if len(errors) >= MAX_ERRORS:
                break
        return errors[:MAX_ERRORS]

    def _check_body(self, op: _Operation, headers: Mapping[str, str], body: bytes
                    ) -> ValidationResult:
        if op.media is None:
            if body:
                return _problem(400, "unexpected-body", "Unexpected request body",
                                "this operation takes no request body")
            return OK
        if not body:
            if op.body_required:
                return _problem(400, "missing-body", "Missing request body",
                                "this operation requires a request body")
            return OK
        ctype = _header(headers, "content-type").split(";", 1)[0].strip().lower()
        media = _media_for(op.media, ctype)
        if media is None:
            listed = ", ".join(m.media_type for m in op.media)
            return _problem(415, "unsupported-media-type", "Unsupported media type",
                            f"content type {_echo(ctype or '(none)')} is not one of {listed}")
        if not media.json or not _is_json(ctype):
            return OK  # not JSON: passed unchecked
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return _problem(400, "invalid-json", "Request body is not JSON", _short(str(e)))
        if media.validator is not None:
            errors = [{"pointer": _json_pointer(err.instance_path), "detail": _short(err.message)}
                      for _, err in zip(range(MAX_ERRORS), _errors(media.validator, doc),
                                        strict=False)]
            if errors:
                return _problem(400, "invalid-body", "Invalid request body",
                                f"{len(errors)} problem(s) in the body", errors)
        if media.schema is None:
            return OK
        unknown = list(self._unknown(media.schema, doc, ()))
        if not unknown:
            return OK
        if self.settings.unknown_fields == "reject":
            errors = [{"pointer": _json_pointer(p), "detail": "unknown field"}
                      for p in unknown[:MAX_ERRORS]]
            return _problem(400, "unknown-fields", "Unknown fields in the request body",
                            f"{len(unknown)} field(s) the API does not declare", errors)
        for pointer in unknown:
            _remove(doc, pointer)
        return ValidationResult(True, new_body=json.dumps(doc, separators=(",", ":"),
                                                          ensure_ascii=False).encode())

    def _unknown(self, schema: Any, value: Any, at: tuple[Any, ...], depth: int = 0
                 ) -> Iterator[tuple[Any, ...]]:
        """Pointers (as key tuples) of object members no schema declares; see the docstring."""
        if depth > 64:
            return
        props, free, items = self._shape(schema)
        if isinstance(value, dict) and not free and props:
            for key, member in value.items():
                if key not in props:
                    yield (*at, key)
                else:
                    yield from self._unknown(props[key], member, (*at, key), depth + 1)
        elif isinstance(value, dict):
            for key, member in value.items():
                if key in props:
                    yield from self._unknown(props[key], member, (*at, key), depth + 1)
        elif isinstance(value, list) and items is not None:
            for i, member in enumerate(value):
                yield from self._unknown(items, member, (*at, i), depth + 1)

    def _shape(self, schema: Any, depth: int = 0) -> tuple[dict[str, Any], bool, Any]:
        """(declared properties, free-form?, items schema) of a schema, through $ref and the
        combinators; computed once per schema (the spec is never changed after loading)."""
        key = id(schema)
        found = self._shapes.get(key)
        if found is None:
            found = self._shapes[key] = self._shape_of(schema, depth)
        return found

    def _shape_of(self, schema: Any, depth: int) -> tuple[dict[str, Any], bool, Any]:
        if not isinstance(schema, Mapping) or depth > 32:
            return {}, True, None
        try:
            s = self._deref(schema, "")[0]
        except OpenApiError:
            return {}, True, None
        props: dict[str, Any] = dict(s.get("properties") or {})
        free = "additionalProperties" in s and s["additionalProperties"] is not False \
            or "patternProperties" in s
        items = s.get("items") if isinstance(s.get("items"), Mapping) else None
        for combo in ("allOf", "oneOf", "anyOf"):
            for sub in s.get(combo) or ():
                p, f, i = self._shape(sub, depth + 1)
                for k, v in p.items():
                    props.setdefault(k, v)
                free = free or f and not p
                items = items if items is not None else i
        return props, free, items


# -- helpers -------------------------------------------------------------------------------


def _problem(status: int, kind: str, title: str, detail: str,
             errors: list[dict[str, Any]] | None = None,
             headers: tuple[tuple[str, str], ...] = ()) -> ValidationResult:
    doc: dict[str, Any] = {"type": f"urn:isthmus:problem:{kind}", "title": title,
                           "status": status, "detail": detail}
    if errors:
        doc["errors"] = errors
    return ValidationResult(False, status, json.dumps(doc, separators=(",", ":")).encode(),
                            headers=headers)


def _errors(validator: Any, value: Any) -> Iterator[Any]:
    """The errors of `value`, in order of where they are (a cheap is_valid first)."""
    if validator.is_valid(value):
        return iter(())
    found = [e for _, e in zip(range(MAX_ERRORS), validator.iter_errors(value), strict=False)]
    return iter(sorted(found, key=lambda e: [str(p) for p in e.instance_path]))


def _from_oas30(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an OpenAPI 3.0 document whose schemas are JSON Schema draft 4: `nullable`
    and `readOnly` (see the module docstring) are rewritten; the rest is the same."""

    def walk(node: Any, depth: int = 0) -> Any:
        if depth > 200:
            raise OpenApiError("the spec nests deeper than 200 levels")
        if isinstance(node, list):
            return [walk(x, depth + 1) for x in node]
        if not isinstance(node, Mapping):
            return node
        out = {k: walk(v, depth + 1) for k, v in node.items()}
        if out.get("nullable") is True:
            del out["nullable"]
            t = out.get("type")
            if isinstance(t, str):
                out["type"] = [t, "null"]
            if isinstance(out.get("enum"), list) and None not in out["enum"]:
                out["enum"] = [*out["enum"], None]
        props = out.get("properties")
        if isinstance(out.get("required"), list) and isinstance(props, Mapping):
            read_only = {k for k, v in props.items()
                         if isinstance(v, Mapping) and v.get("readOnly") is True}
            if read_only:
                out["required"] = [r for r in out["required"] if r not in read_only]
                if not out["required"]:
                    del out["required"]  # draft 4: required must not be empty
        return out

    return walk(spec)


def _short(text: str) -> str:
    return text if len(text) <= 200 else text[:200] + "..."


def _echo(value: str) -> str:
    return repr(value if len(value) <= MAX_ECHO else value[:MAX_ECHO] + "...")


def _json_pointer(parts: Any) -> str:
    return "#" + "".join("/" + _escape(str(p)) for p in parts)


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _pointer(doc: Any, ref: str) -> Any:
    node = doc
    for raw in ref[2:].split("/") if ref != "#/" else []:
        token = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return None
    return node


def _remove(doc: Any, path: tuple[Any, ...]) -> None:
    node = doc
    for key in path[:-1]:
        node = node[key]
    node.pop(path[-1], None)


def _type(schema: Mapping[str, Any]) -> str | None:
    t = schema.get("type")
    if isinstance(t, list):  # 3.1: ["integer", "null"]
        t = next((x for x in t if x != "null"), None)
    return t if isinstance(t, str) else None


def _convert(p: _Param, raw: list[str]) -> Any:
    if p.kind == "array":
        values = raw if p.explode and p.where == "query" else \
            [v for r in raw for v in r.split(",")]
        return [_scalar(p.item_kind, v) for v in values]
    if len(raw) > 1:
        raise ValueError("is given more than once")
    return _scalar(p.kind, raw[0])


def _scalar(kind: str | None, text: str) -> Any:
    if kind == "integer":
        if not _INT.fullmatch(text):
            raise ValueError(f"{_echo(text)} is not an integer")
        return int(text)
    if kind == "number":
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{_echo(text)} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{_echo(text)} is not a finite number")
        return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() \
            else value
    if kind == "boolean":
        if text not in ("true", "false"):
            raise ValueError(f"{_echo(text)} is not true or false")
        return text == "true"
    return text


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or media_type.endswith("+json")


def _media_for(media: tuple[_Media, ...], ctype: str) -> _Media | None:
    if not ctype:
        return None
    major = ctype.split("/", 1)[0]
    for wanted in (ctype, f"{major}/*", "*/*"):
        for m in media:
            if m.media_type == wanted:
                return m
    return None


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is None:
        for k, v in headers.items():
            if k.lower() == name:
                return v
        return ""
    return value

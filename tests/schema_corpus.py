"""JSON schemas as real clients send them: pydantic models (``$defs``/``$ref``, ``anyOf`` with
null for optional fields), OpenAI function definitions, JSON Schema Store excerpts, data
records with formats and patterns. ``CORPUS``: (name, schema) pairs; ``UNENFORCEABLE``: the
keyword a schema uses that llguidance cannot enforce (the request must be refused, naming
it), for the schemas that have one."""

from __future__ import annotations

_STR = {"type": "string"}
_INT = {"type": "integer"}
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}


def _obj(props: dict, required: list[str] | None = None, extra: bool = False, **more) -> dict:
    schema = {"type": "object", "properties": props, "required": list(props) if required is None else required}
    if not extra:
        schema["additionalProperties"] = False
    return schema | more


def _optional(schema: dict) -> dict:
    """pydantic's ``Optional[X] = None``."""
    return {"anyOf": [schema, {"type": "null"}], "default": None}


CORPUS: list[tuple[str, dict]] = [
    # -- OpenAI-style function parameters ------------------------------------------------------
    ("get_weather", _obj({"location": {"type": "string", "description": "City and country, e.g. Paris, France"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, ["location"])),
    ("search_web", _obj({"query": {"type": "string", "maxLength": 60}, "num_results": {"type": "integer", "minimum": 1, "maximum": 10}}, ["query"])),
    ("send_email", _obj({"to": {"type": "string", "format": "email", "maxLength": 40}, "subject": {"type": "string", "maxLength": 40}, "body": {"type": "string", "maxLength": 120}}, ["to", "subject"])),
    ("create_event", _obj({"title": {"type": "string", "maxLength": 40}, "start": {"type": "string", "format": "date-time", "maxLength": 30}, "duration_minutes": {"type": "integer", "minimum": 5, "maximum": 480}, "attendees": {"type": "array", "items": {"type": "string", "format": "email", "maxLength": 40}, "maxItems": 3}}, ["title", "start"])),
    ("run_sql", _obj({"query": {"type": "string", "maxLength": 100}, "database": {"enum": ["analytics", "billing", "users"]}, "limit": {"type": "integer", "maximum": 1000}}, ["query", "database"])),
    ("set_thermostat", _obj({"room": {"type": "string", "maxLength": 20}, "temperature": {"type": "number", "minimum": 10, "maximum": 30}, "mode": {"enum": ["heat", "cool", "auto", "off"]}})),
    ("translate", _obj({"text": {"type": "string", "maxLength": 80}, "source": {"type": "string", "pattern": "^[a-z]{2}$"}, "target": {"type": "string", "pattern": "^[a-z]{2}$"}})),
    ("book_flight", _obj({"origin": {"type": "string", "pattern": "^[A-Z]{3}$"}, "destination": {"type": "string", "pattern": "^[A-Z]{3}$"}, "date": {"type": "string", "format": "date", "maxLength": 10}, "passengers": {"type": "integer", "minimum": 1, "maximum": 9}, "cabin": {"enum": ["economy", "premium", "business", "first"]}}, ["origin", "destination", "date"])),
    ("resize_image", _obj({"url": {"type": "string", "format": "uri", "maxLength": 60}, "width": {"type": "integer", "minimum": 1, "maximum": 4096}, "height": {"type": "integer", "minimum": 1, "maximum": 4096}, "keep_aspect": _BOOL}, ["url", "width"])),
    ("calculator", _obj({"expression": {"type": "string", "pattern": "^[0-9+*/() .-]{1,40}$"}})),
    ("lookup_order", _obj({"order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"}})),
    ("schedule_reminder", _obj({"message": {"type": "string", "maxLength": 60}, "at": {"type": "string", "format": "time", "maxLength": 14}, "repeat": {"enum": ["never", "daily", "weekly"]}}, ["message", "at"])),
    # -- pydantic models -----------------------------------------------------------------------
    (
        "pydantic_user",
        {
            "$defs": {"Address": _obj({"street": {"type": "string", "maxLength": 40, "title": "Street"}, "city": {"type": "string", "maxLength": 30, "title": "City"}, "postcode": {"type": "string", "pattern": "^[0-9]{5}$", "title": "Postcode"}}, title="Address")},
            "properties": {"id": {"title": "Id", "type": "integer"}, "name": {"title": "Name", "type": "string", "maxLength": 30}, "email": {"title": "Email", "type": "string", "format": "email", "maxLength": 40}, "address": {"$ref": "#/$defs/Address"}, "nickname": _optional({"type": "string", "maxLength": 20})},
            "required": ["id", "name", "email", "address"],
            "title": "User",
            "type": "object",
        },
    ),
    (
        "pydantic_order",
        {
            "$defs": {
                "Item": {"properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "quantity": {"type": "integer", "minimum": 1, "maximum": 99}, "price": {"type": "number", "minimum": 0, "maximum": 10000, "multipleOf": 0.01}}, "required": ["sku", "quantity", "price"], "type": "object", "title": "Item"},
                "Status": {"enum": ["pending", "paid", "shipped", "cancelled"], "title": "Status", "type": "string"},
            },
            "properties": {"order_id": _INT, "items": {"items": {"$ref": "#/$defs/Item"}, "type": "array", "minItems": 1, "maxItems": 3}, "status": {"$ref": "#/$defs/Status"}, "note": _optional({"type": "string", "maxLength": 40})},
            "required": ["order_id", "items", "status"],
            "type": "object",
            "title": "Order",
        },
    ),
    (
        "pydantic_discriminated_union",
        {
            "$defs": {
                "Cat": {"properties": {"pet_type": {"const": "cat"}, "meows": {"type": "integer", "minimum": 0, "maximum": 100}}, "required": ["pet_type", "meows"], "type": "object"},
                "Dog": {"properties": {"pet_type": {"const": "dog"}, "barks": {"type": "number", "minimum": 0, "maximum": 100}}, "required": ["pet_type", "barks"], "type": "object"},
            },
            "properties": {"pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}], "discriminator": {"propertyName": "pet_type"}}, "owner": {"type": "string", "maxLength": 20}},
            "required": ["pet", "owner"],
            "type": "object",
        },
    ),
    (
        "pydantic_company",
        {
            "$defs": {
                "Address": {"properties": {"city": {"type": "string", "maxLength": 25}, "country": {"type": "string", "pattern": "^[A-Z]{2}$"}}, "required": ["city", "country"], "type": "object"},
                "Employee": {"properties": {"name": {"type": "string", "maxLength": 25}, "role": {"enum": ["engineer", "manager", "sales"]}, "home": {"$ref": "#/$defs/Address"}}, "required": ["name", "role"], "type": "object"},
            },
            "properties": {"company": {"type": "string", "maxLength": 30}, "headquarters": {"$ref": "#/$defs/Address"}, "employees": {"items": {"$ref": "#/$defs/Employee"}, "type": "array", "maxItems": 3}},
            "required": ["company", "headquarters", "employees"],
            "type": "object",
        },
    ),
    ("pydantic_optional_fields", _obj({"title": {"type": "string", "maxLength": 30}, "year": _optional({"type": "integer", "minimum": 1900, "maximum": 2030}), "rating": _optional({"type": "number", "minimum": 0, "maximum": 10}), "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3, "default": []}}, ["title"])),
    ("pydantic_literal_and_bool", _obj({"answer": {"enum": ["yes", "no", "maybe"]}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}, "needs_followup": _BOOL})),
    ("pydantic_dict_field", _obj({"name": {"type": "string", "maxLength": 20}, "scores": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 100}, "maxProperties": 3}}, ["name", "scores"])),
    ("pydantic_tuple", _obj({"point": {"type": "array", "prefixItems": [_NUM, _NUM], "minItems": 2, "maxItems": 2}, "label": {"type": "string", "maxLength": 20}})),
    ("pydantic_uuid_datetime", _obj({"id": {"type": "string", "format": "uuid"}, "created_at": {"type": "string", "format": "date-time", "maxLength": 30}, "active": _BOOL})),
    (
        "instructor_extraction",
        {
            "$defs": {"Entity": {"properties": {"name": {"type": "string", "maxLength": 30}, "kind": {"enum": ["person", "place", "organisation"]}}, "required": ["name", "kind"], "type": "object"}},
            "properties": {"entities": {"items": {"$ref": "#/$defs/Entity"}, "type": "array", "maxItems": 4}, "summary": {"type": "string", "maxLength": 80}},
            "required": ["entities", "summary"],
            "type": "object",
        },
    ),
    (
        "langchain_classification",
        _obj({"sentiment": {"enum": ["positive", "neutral", "negative"], "description": "The sentiment of the text"}, "aggressiveness": {"type": "integer", "minimum": 1, "maximum": 5}, "language": {"enum": ["spanish", "english", "french", "german", "italian"]}}),
    ),
    # -- records ----------------------------------------------------------------------------------
    ("person", _obj({"first_name": {"type": "string", "maxLength": 20}, "last_name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    ("product", _obj({"name": {"type": "string", "maxLength": 40}, "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 100000, "multipleOf": 0.01}, "currency": {"type": "string", "pattern": "^[A-Z]{3}$"}, "in_stock": _BOOL, "tags": {"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 4}})),
    ("movie", _obj({"title": {"type": "string", "maxLength": 40}, "year": {"type": "integer", "minimum": 1888, "maximum": 2030}, "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "action", "horror", "documentary"]}, "minItems": 1, "maxItems": 3}, "director": {"type": "string", "maxLength": 30}})),
    ("book", _obj({"isbn": {"type": "string", "pattern": "^97[89][0-9]{10}$"}, "title": {"type": "string", "maxLength": 50}, "authors": {"type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 1, "maxItems": 3}, "pages": {"type": "integer", "minimum": 1, "maximum": 5000}})),
    ("recipe", _obj({"name": {"type": "string", "maxLength": 40}, "servings": {"type": "integer", "minimum": 1, "maximum": 12}, "ingredients": {"type": "array", "items": _obj({"item": {"type": "string", "maxLength": 20}, "grams": {"type": "number", "minimum": 0, "maximum": 5000}}), "minItems": 1, "maxItems": 4}, "vegetarian": _BOOL})),
    ("address", _obj({"street": {"type": "string", "maxLength": 40}, "city": {"type": "string", "maxLength": 30}, "country_code": {"type": "string", "pattern": "^[A-Z]{2}$"}, "postal_code": {"type": "string", "maxLength": 10}}, ["street", "city", "country_code"])),
    ("contact_card", _obj({"name": {"type": "string", "maxLength": 30}, "phone": {"type": "string", "pattern": "^\\+[0-9]{7,14}$"}, "email": {"type": "string", "format": "email", "maxLength": 40}, "website": {"type": "string", "format": "uri", "maxLength": 60}}, ["name"])),
    ("invoice", _obj({"number": {"type": "string", "pattern": "^INV-[0-9]{4}$"}, "date": {"type": "string", "format": "date", "maxLength": 10}, "lines": {"type": "array", "items": _obj({"description": {"type": "string", "maxLength": 30}, "amount": {"type": "number", "minimum": 0, "maximum": 100000, "multipleOf": 0.01}}), "minItems": 1, "maxItems": 3}, "paid": _BOOL})),
    ("log_entry", _obj({"timestamp": {"type": "string", "format": "date-time", "maxLength": 30}, "level": {"enum": ["DEBUG", "INFO", "WARNING", "ERROR"]}, "message": {"type": "string", "maxLength": 80}, "service": {"type": "string", "pattern": "^[a-z][a-z0-9-]{1,20}$"}})),
    ("sensor_reading", _obj({"sensor_id": {"type": "string", "pattern": "^S[0-9]{3}$"}, "celsius": {"type": "number", "minimum": -50, "maximum": 60}, "humidity": {"type": "number", "minimum": 0, "maximum": 100}, "ok": _BOOL})),
    ("geo_point", _obj({"type": {"const": "Point"}, "coordinates": {"type": "array", "prefixItems": [{"type": "number", "minimum": -180, "maximum": 180}, {"type": "number", "minimum": -90, "maximum": 90}], "minItems": 2, "maxItems": 2}})),
    ("color", _obj({"name": {"type": "string", "maxLength": 20}, "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}, "rgb": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}, "minItems": 3, "maxItems": 3}})),
    ("ip_rule", _obj({"source": {"type": "string", "format": "ipv4"}, "port": {"type": "integer", "minimum": 1, "maximum": 65535}, "action": {"enum": ["allow", "deny"]}})),
    ("version_info", _obj({"package": {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,30}$"}, "version": {"type": "string", "pattern": "^[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}$"}, "yanked": _BOOL})),
    ("quiz_question", _obj({"question": {"type": "string", "maxLength": 80}, "choices": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 2, "maxItems": 4}, "answer_index": {"type": "integer", "minimum": 0, "maximum": 3}})),
    ("todo_list", _obj({"todos": {"type": "array", "items": _obj({"task": {"type": "string", "maxLength": 30}, "done": _BOOL, "priority": {"enum": ["low", "medium", "high"]}}), "maxItems": 4}})),
    ("key_value_config", {"type": "object", "additionalProperties": {"type": ["string", "integer", "boolean"]}, "maxProperties": 4}),
    ("array_of_numbers", {"type": "array", "items": {"type": "number", "minimum": -1000, "maximum": 1000}, "minItems": 1, "maxItems": 6}),
    ("enum_only", {"enum": ["red", "green", "blue", 42, True, None]}),
    ("multiple_types", _obj({"value": {"type": ["string", "number", "null"]}, "unit": {"type": "string", "maxLength": 10}})),
    ("string_lengths", _obj({"code": {"type": "string", "minLength": 4, "maxLength": 8, "pattern": "^[A-Z0-9]+$"}, "comment": {"type": "string", "maxLength": 50}})),
    ("multiple_of", _obj({"quantity": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100}, "step": {"type": "number", "multipleOf": 0.5, "minimum": 0, "maximum": 10}})),
    ("all_of_merge", {"allOf": [_obj({"id": _INT}, extra=True), _obj({"label": {"type": "string", "maxLength": 20}}, extra=True)], "properties": {"id": {}, "label": {}}, "additionalProperties": False}),
    ("pattern_properties", {"type": "object", "patternProperties": {"^x-[a-z]+$": {"type": "string", "maxLength": 20}}, "additionalProperties": False, "maxProperties": 3}),
    # -- JSON Schema Store excerpts ----------------------------------------------------------------
    ("package_json", _obj({"name": {"type": "string", "pattern": "^[a-z0-9-]{1,30}$"}, "version": {"type": "string", "pattern": "^[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}$"}, "private": _BOOL, "scripts": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 30}, "maxProperties": 3}, "license": {"enum": ["MIT", "Apache-2.0", "BSD-3-Clause", "ISC"]}}, ["name", "version"])),
    ("github_issue", _obj({"title": {"type": "string", "maxLength": 60}, "labels": {"type": "array", "items": {"enum": ["bug", "enhancement", "question", "documentation"]}, "maxItems": 3}, "assignees": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z0-9-]{1,20}$"}, "maxItems": 2}, "state": {"enum": ["open", "closed"]}}, ["title", "state"])),
    ("docker_service", _obj({"image": {"type": "string", "pattern": "^[a-z0-9./-]+(:[a-z0-9.-]+)?$", "maxLength": 40}, "ports": {"type": "array", "items": {"type": "string", "pattern": "^[0-9]{2,5}:[0-9]{2,5}$"}, "maxItems": 2}, "restart": {"enum": ["no", "always", "on-failure", "unless-stopped"]}, "environment": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 20}, "maxProperties": 2}}, ["image"])),
    ("openapi_info", _obj({"title": {"type": "string", "maxLength": 30}, "version": {"type": "string", "maxLength": 10}, "contact": _obj({"name": {"type": "string", "maxLength": 20}, "email": {"type": "string", "format": "email", "maxLength": 40}}, ["name"]), "license": _obj({"name": {"type": "string", "maxLength": 20}, "url": {"type": "string", "format": "uri", "maxLength": 60}}, ["name"])}, ["title", "version"])),
    ("github_workflow_step", _obj({"name": {"type": "string", "maxLength": 30}, "uses": {"type": "string", "pattern": "^[a-z0-9-]{1,20}/[a-z0-9-]{1,20}@v[0-9]{1,2}$"}, "with": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}, "maxProperties": 2}}, ["name"])),
    # -- keywords llguidance does not enforce: refused, naming the keyword ---------------------------
    ("not_keyword", _obj({"username": {"type": "string", "maxLength": 20, "not": {"enum": ["admin", "root"]}}})),
    ("if_then_else", {"type": "object", "properties": {"country": {"enum": ["US", "CA"]}, "postal_code": {"type": "string"}}, "if": {"properties": {"country": {"const": "US"}}}, "then": {"properties": {"postal_code": {"pattern": "^[0-9]{5}$"}}}}),
    ("unique_items", _obj({"tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "uniqueItems": True, "maxItems": 3}})),
    ("contains", {"type": "array", "items": _INT, "contains": {"const": 7}, "maxItems": 4}),
    ("dependent_required", {"type": "object", "properties": {"card": _STR, "billing_address": _STR}, "dependentRequired": {"card": ["billing_address"]}}),
]

UNENFORCEABLE = {"not_keyword": "not", "if_then_else": "if", "unique_items": "uniqueItems", "contains": "contains", "dependent_required": "dependentRequired"}

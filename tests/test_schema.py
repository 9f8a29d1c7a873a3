from openapi_spec_validator import validate


def test_it_serves_a_valid_openapi_3_schema_that_names_each_permission(client):
    response = client.get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    schema = response.json()
    validate(schema)
    assert schema["openapi"].startswith("3.")
    assert schema["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
    operations = [
        (path, method, operation)
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if method in {"get", "post", "put", "patch", "delete"}
    ]
    assert len(operations) >= 15
    for path, method, operation in operations:
        assert "x-required-permission" in operation, (method, path)
        assert "**Permission:**" in operation.get("description", ""), (method, path)
    domains_create = schema["paths"]["/api/v1/domains/"]["post"]
    assert domains_create["x-required-permission"] == "domains:manage"


def test_it_serves_the_api_docs_page(client):
    response = client.get("/api/v1/docs/")
    assert response.status_code == 200
    assert b"swagger" in response.content.lower()


def _schema(client):
    return client.get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()


def _operations(schema):
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if method in {"get", "post", "put", "patch", "delete"}:
                yield path, method, operation


def test_it_names_fields_as_the_api_answers_them(client):
    schemas = _schema(client)["components"]["schemas"]
    for name in ("MessageSummary", "MessageDetail"):
        assert "from" in schemas[name]["properties"]
        assert "from_" not in schemas[name]["properties"]


def test_it_describes_the_audit_json_export_as_a_list_of_entries(client):
    export = _schema(client)["paths"]["/api/v1/audit/export/"]["get"]["responses"]["200"]["content"]
    json_body = export["application/json"]["schema"]
    assert json_body["type"] == "array"
    assert json_body["items"] == {"$ref": "#/components/schemas/AuditEntry"}
    assert export["text/csv"]["schema"]["type"] == "string"


def test_it_describes_the_waiting_endpoints(client):
    paths = _schema(client)["paths"]
    wait = paths["/api/v1/messages/wait/"]["get"]
    assert {p["name"] for p in wait["parameters"]} >= {"mailbox", "after", "q", "timeout"}
    assert wait["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/MessageDetail")
    assert wait["x-required-permission"] == "messages:read"
    code = paths["/api/v1/mailboxes/{id}/codes/latest/"]["get"]
    assert code["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/CodeLatest")
    assert {"404", "408"} <= set(code["responses"])


def test_it_declares_the_error_answers_of_every_operation(client):
    schema = _schema(client)
    error = schema["components"]["schemas"]["Error"]
    assert error["properties"]["error"]["required"] == ["code", "message"]
    for path, method, operation in _operations(schema):
        responses = operation["responses"]
        expected = {"503"}
        if operation.get("security"):
            expected |= {"401", "403"}
        if "{" in path:
            expected.add("404")
        if method in {"post", "put", "patch"} or any(p["in"] == "query" for p in operation.get("parameters", [])):
            expected.add("400")
        assert expected <= set(responses), (method, path, sorted(responses))
        for code, response in responses.items():
            if int(code) >= 400:
                body = response["content"]["application/json"]["schema"]
                assert body == {"$ref": "#/components/schemas/Error"}, (method, path, code)
    assert "429" in schema["paths"]["/api/v1/temp-inboxes/"]["post"]["responses"]
    assert "404" in schema["paths"]["/api/v1/sso/"]["get"]["responses"]
    assert "400" in schema["paths"]["/api/v1/domains/{id}/"]["delete"]["responses"]


def test_it_states_the_constraints_the_server_enforces_on_request_bodies(client):
    schemas = _schema(client)["components"]["schemas"]
    requests = {name: body for name, body in schemas.items() if name.endswith("Request")}
    assert requests
    for name, body in requests.items():
        assert body.get("additionalProperties") is False, name
    assert schemas["ApiKeyCreateRequest"]["properties"]["permissions"]["minItems"] == 1
    assert schemas["SsoConfigureRequest"]["properties"]["email_domains"]["minItems"] == 1
    mailbox = schemas["MailboxCreateRequest"]["oneOf"]
    assert [branch["required"] for branch in mailbox] == [["address"], ["domain"]]
    assert schemas["ReplayRequest"]["anyOf"] == [{"required": ["after"]}, {"required": ["since"]}]
    assert "retention_days" in schemas["PatchedTenantUpdateRequest"]["properties"]


def test_it_documents_cursor_and_after_the_same_way_on_every_list(client):
    from mailplatform.pagination import CURSOR_DESCRIPTION

    cursors = [
        (path, parameter)
        for path, _, operation in _operations(_schema(client))
        for parameter in operation.get("parameters", [])
        if parameter["name"] == "cursor"
    ]
    assert len(cursors) >= 8
    for path, parameter in cursors:
        assert parameter["description"] == CURSOR_DESCRIPTION, path
    afters = [
        (path, parameter["description"])
        for path, _, operation in _operations(_schema(client))
        for parameter in operation.get("parameters", [])
        if parameter["name"] == "after"
    ]
    assert len(afters) >= 4
    for path, description in afters:
        assert description.startswith("Only ") and " after this point: " in description, (path, description)

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

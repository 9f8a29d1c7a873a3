def test_it_lists_the_tenants_mailboxes_for_its_key(world):
    response = world.client(world.owner_key).get("/api/v1/mailboxes/")
    assert response.status_code == 200, response.content
    addresses = {row["address"] for row in response.json()["results"]}
    assert addresses == {"inbox@acme.example.test", "sibling@acme.example.test"}

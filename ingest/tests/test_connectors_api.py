"""The connectors API (``/api/v1/connectors/``): CRUD, secrets encrypted and never shown,
the SSRF rules on the host, ``test`` against a real Dovecot, resync, reconnect, OAuth start."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pytest

from audit.models import AuditEntry, Event
from ingest.models import Connector, ConnectorFolder
from tenants import crypto

pytestmark = pytest.mark.django_db


def _create(world, **overrides):
    body = {
        "mailbox": str(world.mailbox.pk),
        "host": "127.0.0.1",
        "port": 1143,
        "tls_mode": "none",
        "username": "alice",
        "password": "correct horse battery",
        **overrides,
    }
    return world.client(world.owner_key).post("/api/v1/connectors/", body, format="json")


def test_it_creates_a_connector_with_its_password_encrypted_and_never_shown(world):
    response = _create(world, name="Old account")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["state"] == "connecting"
    assert body["folders"] == ["INBOX"]
    assert body["has_password"] is True
    assert body["mailbox_address"] == world.mailbox.address
    connector = Connector.objects.get(pk=body["id"])
    assert "correct horse" not in connector.password_encrypted
    assert crypto.decrypt(connector.password_encrypted) == "correct horse battery"
    client = world.client(world.owner_key)
    for answer in (client.get("/api/v1/connectors/"), client.get(f"/api/v1/connectors/{body['id']}/"), response):
        assert "correct horse" not in answer.content.decode()
        assert connector.password_encrypted not in answer.content.decode()
    entry = AuditEntry.objects.get(action="connector.create")
    assert "correct horse" not in json.dumps(entry.after)
    assert entry.after is not None
    assert entry.after["host"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"host": "not a host!"}, "host"),
        ({"host": "does-not-exist.invalid"}, "host"),
        ({"port": 70000}, "port"),
        ({"tls_mode": "ssl3"}, "tls_mode"),
        ({"password": ""}, "password"),
        ({"folders": ["a\r\nb"]}, "folders"),
        ({"mailbox": "00000000-0000-0000-0000-000000000000"}, "mailbox"),
        ({"auth_type": "xoauth2"}, "oauth_token_url"),
        ({"secret_sauce": 1}, "secret_sauce"),
    ],
)
def test_it_answers_400_to_invalid_connectors(world, payload, field):
    response = _create(world, **payload)
    assert response.status_code == 400, response.content
    assert field in json.dumps(response.json()["error"].get("details", {})), response.content


def test_it_refuses_private_addresses_and_plaintext_without_insecure_mode(world, settings):
    settings.CONNECTOR_ALLOW_INSECURE = False
    response = _create(world, tls_mode="implicit", port=993)
    assert response.status_code == 400
    assert "non-public address" in response.content.decode()
    response = _create(world, host="8.8.8.8", tls_mode="none", port=143)
    assert response.status_code == 400
    assert "tls_mode" in response.json()["error"]["details"]


def test_it_refuses_a_mailbox_of_another_tenant(world):
    response = _create(world, mailbox=str(world.outsider_mailbox.pk))
    assert response.status_code == 400
    assert not Connector.objects.exists()


def test_it_updates_deactivates_and_deletes_a_connector(world):
    connector_id = _create(world).json()["id"]
    client = world.client(world.owner_key)
    response = client.patch(
        f"/api/v1/connectors/{connector_id}/", {"folders": ["INBOX", "Work"], "password": "new one"}, format="json"
    )
    assert response.status_code == 200, response.content
    connector = Connector.objects.get(pk=connector_id)
    assert connector.folders == ["INBOX", "Work"]
    assert connector.generation == 2
    assert crypto.decrypt(connector.password_encrypted) == "new one"
    response = client.patch(f"/api/v1/connectors/{connector_id}/", {"active": False}, format="json")
    assert response.json()["state"] == "disabled"
    response = client.patch(f"/api/v1/connectors/{connector_id}/", {"active": True}, format="json")
    assert response.json()["state"] == "connecting"
    assert client.delete(f"/api/v1/connectors/{connector_id}/").status_code == 204
    assert not Connector.objects.filter(pk=connector_id).exists()
    assert AuditEntry.objects.filter(action__startswith="connector.").count() == 5
    assert "new one" not in json.dumps(list(AuditEntry.objects.values_list("before", "after")))


def test_it_hides_connectors_from_a_key_scoped_to_another_mailbox(world):
    connector_id = _create(world, mailbox=str(world.sibling.pk)).json()["id"]
    scoped = world.client(world.key(["connectors:manage"], mailboxes=[world.mailbox], name="scoped"))
    assert scoped.get(f"/api/v1/connectors/{connector_id}/").status_code == 404
    assert connector_id not in scoped.get("/api/v1/connectors/").content.decode()
    response = scoped.post(
        "/api/v1/connectors/",
        {"mailbox": str(world.sibling.pk), "host": "127.0.0.1", "port": 1, "tls_mode": "none", "username": "u",
         "password": "p"},
        format="json",
    )  # fmt: skip
    assert response.status_code == 400


def test_it_resyncs_by_forgetting_the_cursors_with_an_event(world):
    connector_id = _create(world).json()["id"]
    ConnectorFolder.objects.create(connector_id=connector_id, name="INBOX", uid_validity=7, last_uid=40)
    response = world.client(world.owner_key).post(f"/api/v1/connectors/{connector_id}/resync/")
    assert response.status_code == 202, response.content
    assert not ConnectorFolder.objects.filter(connector_id=connector_id).exists()
    event = Event.objects.get(type="connector.resynced")
    assert event.data["connector"] == connector_id
    assert Connector.objects.get(pk=connector_id).generation == 2


def test_it_reconnects_after_auth_failed(world):
    connector_id = _create(world).json()["id"]
    Connector.objects.filter(pk=connector_id).update(state="auth_failed")
    response = world.client(world.owner_key).post(f"/api/v1/connectors/{connector_id}/reconnect/")
    assert response.status_code == 202
    assert response.json()["state"] == "connecting"


def test_it_tests_a_connector_against_dovecot_saying_what_failed(world, imap_account, dovecot):
    client = world.client(world.owner_key)
    good = _create(world, port=dovecot.port, username=imap_account.username, password=imap_account.password)
    result = client.post(f"/api/v1/connectors/{good.json()['id']}/test/").json()
    assert result["ok"] is True, result
    assert result["stage"] == "done"
    assert "INBOX" in result["folders"]
    assert "IDLE" in result["capabilities"]
    bad = _create(world, port=dovecot.port, username=imap_account.username, password="wrong")
    result = client.post(f"/api/v1/connectors/{bad.json()['id']}/test/").json()
    assert result["ok"] is False
    assert (result["stage"], result["error_kind"]) == ("login", "auth_failed")
    assert "wrong" not in json.dumps(result)
    from mailplatform.testing import free_port

    closed = _create(world, port=free_port(), username="x", password="y")
    result = client.post(f"/api/v1/connectors/{closed.json()['id']}/test/").json()
    assert (result["ok"], result["stage"], result["error_kind"]) == (False, "connect", "connect")


def test_it_starts_an_oauth_authorization_with_pkce_and_finishes_it_on_the_callback(world, dovecot, imap_account):
    tokens = dovecot.tokens
    created = _create(
        world,
        auth_type="xoauth2",
        password="",
        port=dovecot.port,
        username=imap_account.username,
        oauth_client_id="client-1",
        oauth_client_secret="client-secret-value",
        oauth_authorize_url="https://accounts.example.test/authorize",
        oauth_token_url=f"{tokens.url}/token",
        oauth_scope="mail",
    )
    assert created.status_code == 201, created.content
    connector_id = created.json()["id"]
    assert created.json()["oauth_connected"] is False
    client = world.client(world.owner_key)
    response = client.post("/api/v1/connectors/oauth/initiate", {"connector": connector_id}, format="json")
    assert response.status_code == 200, response.content
    url = urlsplit(response.json()["authorize_url"])
    query = {key: values[0] for key, values in parse_qs(url.query).items()}
    assert query["code_challenge_method"] == "S256"
    assert query["redirect_uri"] == "http://testserver/connectors/oauth/callback/"
    assert query["client_id"] == "client-1"
    from django.test import Client

    page = Client().get(
        "/connectors/oauth/callback/", {"state": query["state"], "code": f"code-{imap_account.username}"}
    )
    assert page.status_code == 200, page.content
    assert b"Account connected" in page.content
    exchange = tokens.token_requests[-1]
    assert exchange["grant_type"] == "authorization_code"
    assert exchange["code_verifier"] and exchange["client_secret"] == "client-secret-value"
    connector = Connector.objects.get(pk=connector_id)
    assert connector.oauth_refresh_token_encrypted
    # The state is single-use.
    again = Client().get("/connectors/oauth/callback/", {"state": query["state"], "code": "code-x"})
    assert again.status_code == 400
    # And the stored token logs in (XOAUTH2 against Dovecot's oauth2 passdb).
    result = client.post(f"/api/v1/connectors/{connector_id}/test/").json()
    assert result["ok"] is True, result
    shown = client.get(f"/api/v1/connectors/{connector_id}/").content.decode()
    assert "client-secret-value" not in shown and "rt-" not in shown and "at-" not in shown

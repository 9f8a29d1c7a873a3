"""Which mailbox is a domain's catch-all is a domain-wide setting (domains:manage on the domain)."""

from mailboxes.models import Mailbox


def test_it_refuses_a_mailbox_scoped_key_making_its_mailbox_the_catch_all(world):
    secret = world.key(["mailboxes:manage", "domains:manage", "messages:read"], mailboxes=[world.mailbox])
    response = world.client(secret).patch(
        f"/api/v1/mailboxes/{world.mailbox.pk}/", {"is_catch_all": True}, format="json"
    )
    assert response.status_code == 403, response.content
    world.mailbox.refresh_from_db()
    assert not world.mailbox.is_catch_all
    renamed = world.client(secret).patch(f"/api/v1/mailboxes/{world.mailbox.pk}/", {"name": "Mine"}, format="json")
    assert renamed.status_code == 200  # the mailbox's own settings stay its key's


def test_it_needs_domains_manage_on_the_domain_to_set_or_clear_the_catch_all(world):
    without = world.key(["mailboxes:manage"], domains=[world.domain])
    response = world.client(without).patch(
        f"/api/v1/mailboxes/{world.sibling.pk}/", {"is_catch_all": True}, format="json"
    )
    assert response.status_code == 403
    created = world.client(without).post(
        "/api/v1/mailboxes/", {"domain": str(world.domain.pk), "local_part": "all", "is_catch_all": True}, format="json"
    )
    assert created.status_code == 403
    assert not Mailbox.objects.filter(domain=world.domain, is_catch_all=True).exists()

    manager = world.key(["mailboxes:manage", "domains:manage"], domains=[world.domain])
    response = world.client(manager).patch(
        f"/api/v1/mailboxes/{world.sibling.pk}/", {"is_catch_all": True}, format="json"
    )
    assert response.status_code == 200, response.content
    Mailbox.objects.filter(pk=world.sibling.pk).update(is_catch_all=True)
    cleared = world.client(without).patch(
        f"/api/v1/mailboxes/{world.sibling.pk}/", {"is_catch_all": False}, format="json"
    )
    assert cleared.status_code == 403

"""The ``authentication`` object of a message: SPF, DKIM, DMARC and ARC as we verified them.

Result words are those of RFC 8601 section 2.7 (and RFC 8617 for ARC). The stored verdict
(mailboxes/authentication.py) is shaped here; a message parsed before verification existed,
or while AUTH_VERIFY was off, answers null.
"""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from mailboxes.authentication import RESULTS
from mailboxes.models import Message

SPF_RESULTS = list(RESULTS["spf"])
DKIM_RESULTS = [result for result in RESULTS["dkim"] if result != "none"]  # "none" is no signature at all
DMARC_RESULTS = list(RESULTS["dmarc"])
ARC_RESULTS = list(RESULTS["arc"])
ALIGNMENT_MODES = ["r", "s"]


class SpfVerdictSerializer(serializers.Serializer[Any]):
    result = serializers.ChoiceField(choices=SPF_RESULTS, help_text="RFC 7208 section 2.6")
    domain = serializers.CharField(help_text="The identity checked: the MAIL FROM domain, or the HELO name")
    scope = serializers.ChoiceField(
        choices=["mailfrom", "helo"], help_text="helo for the null sender (RFC 7208 section 2.4)"
    )
    ip = serializers.CharField(help_text="The connecting IP the check was made for")
    reason = serializers.CharField(allow_blank=True)


class DkimVerdictSerializer(serializers.Serializer[Any]):
    result = serializers.ChoiceField(
        choices=DKIM_RESULTS,
        help_text="fail: the signature or body hash does not verify; permerror: no key, a bad key or a broken"
        " signature; temperror: the key could not be looked up; policy: good but refused (rsa-sha1, RFC 8301)",
    )
    domain = serializers.CharField(allow_blank=True, help_text="The signing domain (d=)")
    selector = serializers.CharField(allow_blank=True, help_text="The key's selector (s=)")
    algorithm = serializers.CharField(allow_blank=True, help_text="rsa-sha256 or ed25519-sha256 (a=)")
    aligned = serializers.BooleanField(help_text="Passes and is aligned with the From domain under DMARC")
    reason = serializers.CharField(allow_blank=True)


class DmarcAlignmentSerializer(serializers.Serializer[Any]):
    spf = serializers.BooleanField(help_text="SPF passed for a domain aligned with the From domain")
    dkim = serializers.BooleanField(help_text="A DKIM signature passed for a domain aligned with the From domain")
    spf_mode = serializers.ChoiceField(choices=ALIGNMENT_MODES, help_text="aspf: r relaxed, s strict")
    dkim_mode = serializers.ChoiceField(choices=ALIGNMENT_MODES, help_text="adkim: r relaxed, s strict")


class DmarcVerdictSerializer(serializers.Serializer[Any]):
    result = serializers.ChoiceField(
        choices=DMARC_RESULTS, help_text="none: the From domain publishes no DMARC record (RFC 7489 section 6.6)"
    )
    domain = serializers.CharField(allow_blank=True, help_text="The From domain")
    policy = serializers.ChoiceField(
        choices=["", "none", "quarantine", "reject"],
        allow_blank=True,
        help_text="The policy that applies to the From domain (p=, or sp= for a subdomain); empty without a record",
    )
    record_domain = serializers.CharField(allow_blank=True, help_text="Where the record was found")
    pct = serializers.IntegerField(min_value=0, max_value=100)
    alignment = DmarcAlignmentSerializer()
    reason = serializers.CharField(allow_blank=True)


class ArcVerdictSerializer(serializers.Serializer[Any]):
    result = serializers.ChoiceField(
        choices=ARC_RESULTS, help_text="The chain validation status (RFC 8617 section 4.4)"
    )
    instances = serializers.IntegerField(min_value=0, help_text="ARC sets on the message")
    sealers = serializers.ListField(
        child=serializers.CharField(allow_blank=True), help_text="The sealing domain of each instance, first hop first"
    )
    reason = serializers.CharField(allow_blank=True)


class AuthenticationSerializer(serializers.Serializer[Any]):
    authserv_id = serializers.CharField(help_text="Our authserv-id (SMTP_HOSTNAME)")
    header = serializers.CharField(help_text="Our Authentication-Results value (RFC 8601)")
    verified_at = serializers.DateTimeField()
    source = serializers.ChoiceField(choices=Message.Source.values)  # type: ignore[assignment]
    sender_ip_known = serializers.BooleanField(
        help_text="false for LMTP, API upload and IMAP pull: there is no connecting IP of the original sender,"
        " so SPF is not evaluated (spf is null)"
    )
    spf = SpfVerdictSerializer(allow_null=True)
    dkim = DkimVerdictSerializer(many=True, help_text="One verdict per DKIM-Signature, top to bottom")
    dmarc = DmarcVerdictSerializer()
    arc = ArcVerdictSerializer()


def authentication_of(message: Message) -> dict[str, Any] | None:
    """The stored verdict in the shape above (older verdicts lack nothing it needs)."""
    verdict = message.authentication
    if not verdict:
        return None
    return dict(AuthenticationSerializer(verdict).data)

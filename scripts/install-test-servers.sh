#!/usr/bin/env bash
# Debian's real servers and mail clients the tests talk to, each started by the test harness in the
# foreground with a throwaway configuration under the test folder, on free loopback ports:
#   Dovecot (IMAP pull connectors, and the reference for the IMAP benchmark), clamd (antivirus),
#   Postfix (the outbound smarthost), NSD (an authoritative DNS server), pgbouncer (transaction
#   pooling), and the clients fetchmail, getmail6 and mutt (IMAP and POP3 access), tmux to drive mutt.
# The packages' own services are never started: policy-rc.d refuses them while apt installs.
set -euo pipefail
PACKAGES=(dovecot-core dovecot-imapd dovecot-pop3d clamav-daemon clamav postfix nsd pgbouncer fetchmail getmail6 mutt tmux)
missing=()
for package in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi
POLICY=/usr/sbin/policy-rc.d
placed_policy=""
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n# mailplatform test servers: no service starts while apt installs them\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod +x "$POLICY"
    placed_policy="yes"
fi
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
if [ -n "$placed_policy" ]; then
    $SUDO rm -f "$POLICY"
fi

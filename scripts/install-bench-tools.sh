#!/bin/sh
# Installs the reference receivers for bench/smtp_ingest.py: Postfix's smtp-sink and
# smtp-source (Debian package "postfix"). Postfix itself is not started or configured.
set -eu
if command -v smtp-sink >/dev/null 2>&1 || [ -x /usr/sbin/smtp-sink ]; then
    echo "smtp-sink already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update
# postfix's maintainer scripts ask debconf questions; "No configuration" leaves it unconfigured.
echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends postfix
# The package may start the mail system; the benchmark needs only the two binaries.
$SUDO postfix stop >/dev/null 2>&1 || true

#!/usr/bin/env bash
# Install the gateway with its test tools into .venv, make sure the real peers the tests talk
# to are present (openssl, gpgsm, the PostgreSQL server binaries, Dovecot, Postfix), and run the
# test suite. The tests start their own throw-away PostgreSQL cluster (tests/pg.py), Dovecot
# (tests/dovecot.py) and Postfix (tests/postfix.py); the distribution's cluster is neither needed
# nor, when this script installs the package, created, a Dovecot service the package may start is
# stopped, and Postfix is installed unconfigured ("No configuration": no system instance).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v openssl >/dev/null || need+=(openssl)
command -v gpgsm >/dev/null || need+=(gpgsm)
have_initdb() { command -v initdb >/dev/null || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; }
have_initdb || need+=(postgresql)
command -v dovecot >/dev/null || [ -x /usr/sbin/dovecot ] || need+=(dovecot-imapd)
command -v postfix >/dev/null || [ -x /usr/sbin/postfix ] || need+=(postfix)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    if [[ " ${need[*]} " == *" postgresql "* ]] && [ ! -e /etc/postgresql-common/createcluster.d/no-main-cluster.conf ]; then
      # Debian would create and start a "main" cluster on install; the tests do not use it.
      mkdir -p /etc/postgresql-common/createcluster.d
      echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/no-main-cluster.conf
    fi
    if [[ " ${need[*]} " == *" postfix "* ]]; then
      # Debian would ask how to configure the system's mail server; the tests do not use it.
      echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    if [[ " ${need[*]} " == *" dovecot-imapd "* ]]; then
      # The tests run their own server; the system one (if the package started it) is not used.
      service dovecot stop >/dev/null 2>&1 || true
      update-rc.d dovecot disable >/dev/null 2>&1 || true
    fi
    if [[ " ${need[*]} " == *" postfix "* ]]; then
      # Unconfigured, the package starts no instance; stop one in case it did.
      postfix stop >/dev/null 2>&1 || true
    fi
  else
    echo "note: ${need[*]} not installed; tests that need them will be skipped" >&2
  fi
fi
scripts/env.sh test
exec .venv/bin/python -m pytest "$@"

#!/bin/sh
# Entry point of the eclipse-mosquitto:2 container in deploy/compose.yaml.
#
# broker/conf/mosquitto.conf is used unchanged: it reads the accounts from /etc/mosquitto/mistnet/
# and keeps its data in /var/lib/mosquitto/. Compose mounts the `mistnet broker init-auth` files as
# secrets (/run/secrets/*, bind mounts that keep the host's owner and mode 0600), which the
# `mosquitto` user the broker drops to could not read, so this copies them into place for that user
# and then runs the image's own entry point with the command ("$@").
#
# The paths can be changed through the environment (the tests run this script outside a container).
set -eu

secrets=${MISTNET_SECRETS_DIR:-/run/secrets}
conf_dir=${MISTNET_BROKER_CONF_DIR:-/etc/mosquitto/mistnet}
data_dir=${MISTNET_BROKER_DATA_DIR:-/var/lib/mosquitto}

for name in mosquitto_passwd mosquitto_acl; do
    if [ ! -r "$secrets/$name" ]; then
        echo "start-mosquitto: $secrets/$name is missing: run 'mistnet broker init-auth' first (docs/deploy.md)" >&2
        exit 1
    fi
done

umask 077
mkdir -p "$conf_dir" "$data_dir"
cp "$secrets/mosquitto_passwd" "$conf_dir/passwd"
cp "$secrets/mosquitto_acl" "$conf_dir/acl"
if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
    chown mosquitto:mosquitto "$conf_dir" "$conf_dir/passwd" "$conf_dir/acl" "$data_dir"
fi

exec "$@"

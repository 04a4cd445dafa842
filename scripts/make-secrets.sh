#!/bin/sh
# Make the secrets of the compose and Kubernetes recipes (docs/deploy.md, "Secrets"): each a
# random 256-bit value in hex, in a file of its own. An existing file is never overwritten (to
# rotate one, stop every daemon, delete it, run this again, start them).
#
#   scripts/make-secrets.sh [DIR]        (`make secrets`)  docker-compose.yml's files, in DIR
#                                        (default: secrets/ beside docker-compose.yml)
#   scripts/make-secrets.sh --k8s [DIR]  (`make k8s-secrets`)  the files configs/k8s's
#                                        secretGenerator reads (default: configs/k8s/secrets/)
#
# Compose bind-mounts a secret file into the container with its host owner and mode, and the
# daemon refuses one that others may read. So, for compose, the files are made mode 600 and
# then given to a group the container's user is in, mode 640: cluster_secret and api_token
# to group 10001 (the peerlearn image's user), grafana_admin_password to group 0 (the Grafana
# image's user, 472, is in group root). You, their owner, keep reading them (the token for
# POST /stop, the password to log in). Giving a file to a group you are not in needs root:
# this runs `sudo chgrp` when it must. With rootless Docker the container's ids are mapped:
# set PEERLEARN_GID and GRAFANA_GID to the host ids they map to.
#
# For Kubernetes the files stay yours, mode 600: kustomize reads them, and in the pod the
# Secret volume's defaultMode and fsGroup decide (configs/k8s/statefulset.yaml).
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
k8s=no
if [ "${1:-}" = "--k8s" ]; then
    k8s=yes
    shift
fi
case $#:${1:-} in
    0:* | 1:[!-]*) ;;
    *)
        echo "usage: $0 [--k8s] [DIR]" >&2
        exit 2
        ;;
esac
if [ "$k8s" = yes ]; then
    dir=${1:-$here/configs/k8s/secrets}
    names="cluster_secret api_token"
else
    dir=${1:-$here/secrets}
    names="cluster_secret api_token grafana_admin_password"
fi
daemon_gid=${PEERLEARN_GID:-10001}
grafana_gid=${GRAFANA_GID:-0}

random() {  # 32 random bytes (256 bits) in hex
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import secrets; print(secrets.token_hex(32))'
    elif command -v openssl >/dev/null 2>&1; then
        openssl rand -hex 32
    else
        echo "$0: needs python3 or openssl for random bytes" >&2
        return 1
    fi
}

give() {  # give FILE to group GID, mode 640
    if ! chgrp "$2" "$1" 2>/dev/null; then
        if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then
            echo "sudo chgrp $2 $1   (a group you are not in: needs root)"
            sudo chgrp "$2" "$1"
        else
            echo "$0: cannot give $1 to group $2 (one you are not in): run this again as" \
                "root (it keeps the files made), or see PEERLEARN_GID above" >&2
            return 1
        fi
    fi
    chmod 640 "$1"
}

umask 077
mkdir -p "$dir"
for name in $names; do
    file=$dir/$name
    if [ -e "$file" ] || [ -L "$file" ]; then
        echo "kept $file (exists)"
    else
        value=$(random)
        # noclobber: the file is created exclusively, never written over
        (set -C && printf '%s\n' "$value" >"$file")
        echo "made $file"
    fi
    if [ "$k8s" = no ]; then
        case $name in
            grafana_admin_password) give "$file" "$grafana_gid" ;;
            *) give "$file" "$daemon_gid" ;;
        esac
    fi
done

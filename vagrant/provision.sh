#!/usr/bin/env bash
# Provision a Debian 12 machine as an obd development host (root, idempotent).
# The steps are the project's own scripts, shared with CI and the QEMU harness:
#   1. scripts/install-deps   Debian packages and .venv (skipped with --no-deps)
#   2. scripts/obd-setup      modules, configfs, udev rules, systemd units, /usr/local/bin/obd
#   3. a sample registry on localhost:5000 (Debian's docker-registry, no auth) holding the
#      upstream hello-world overlaybd image from shared/spec/vectors as hello-world:obd
# Usage: vagrant/provision.sh [REPO_DIR] [--no-deps]
#   Environment: OBD_SHARED (default REPO_DIR/../shared), OBD_REGISTRY_DIR (registry
#   storage, default /var/lib/obd-sample-registry; without systemd the registry runs
#   in the background, its pid in OBD_REGISTRY_DIR.pid).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
deps=1
for a in "$@"; do
  case "$a" in
    --no-deps) deps=0 ;;
    -*) echo "provision: unknown option $a" >&2; exit 2 ;;
    *) repo=$(cd "$a" && pwd) ;;
  esac
done
cd "$repo"
say() { echo "provision: $*"; }

# linux-image-amd64 carries target_core_user, tcm_loop and overlay as modules
[ -d "/lib/modules/$(uname -r)" ] || say "warning: no /lib/modules/$(uname -r); install linux-image-amd64 and reboot"

[ $deps = 1 ] && scripts/install-deps
scripts/obd-setup

registry=localhost:5000
storage=${OBD_REGISTRY_DIR:-/var/lib/obd-sample-registry}
cfg=/etc/obd/sample-registry.yml
registry_up() { curl -fsS -o /dev/null "http://$registry/v2/"; }
# Debian's default registry config asks for htpasswd auth: the sample one runs without
mkdir -p /etc/obd "$storage"
printf 'version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\nhttp:\n  addr: %s\n' \
  "$storage" "$registry" > "$cfg"
if registry_up; then
  say "registry already answers on $registry"
elif [ -d /run/systemd/system ]; then
  chown docker-registry "$storage"
  mkdir -p /etc/systemd/system/docker-registry.service.d
  printf '[Service]\nExecStart=\nExecStart=/usr/bin/docker-registry serve %s\n' "$cfg" \
    > /etc/systemd/system/docker-registry.service.d/obd-sample.conf
  systemctl daemon-reload
  systemctl enable docker-registry.service
  systemctl restart docker-registry.service
else  # no systemd (containers, the QEMU harness): run it in the background
  setsid docker-registry serve "$cfg" >"$storage.log" 2>&1 < /dev/null &
  echo $! > "$storage.pid"
fi
for _ in $(seq 100); do registry_up && break; sleep 0.2; done
registry_up || { echo "provision: the registry does not answer on $registry" >&2; exit 1; }

vectors=${OBD_SHARED:-$repo/../shared}/spec/vectors/aci-hello-world
if [ -f "$vectors/index.json" ]; then
  layout=$(mktemp -d)
  trap 'rm -rf "$layout"' EXIT
  mkdir -p "$layout/blobs/sha256"
  for f in "$vectors"/sha256_*; do cp "$f" "$layout/blobs/sha256/${f##*/sha256_}"; done
  cp "$vectors/index.json" "$layout/index.json"
  echo '{"imageLayoutVersion": "1.0.0"}' > "$layout/oci-layout"
  # --preserve-digests: skopeo would otherwise gzip the layers and drop what makes them overlaybd
  skopeo copy -q --preserve-digests --dest-tls-verify=false "oci:$layout:amd64-converted" "docker://$registry/hello-world:obd"
  say "sample image: $registry/hello-world:obd (obd mount --plain-http $registry/hello-world:obd DIR)"
else
  say "no spec vectors at $vectors: the sample registry stays empty"
fi
say "ready"

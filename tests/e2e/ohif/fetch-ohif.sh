#!/usr/bin/env bash
# Fetch OHIF's prebuilt static site (npm @ohif/app, pinned version and integrity) into a cache
# outside the repository, for the OHIF end-to-end test. Nothing of OHIF is committed.
#
#   tests/e2e/ohif/fetch-ohif.sh        prints the dist folder (fetches once; later runs reuse it)
#
# Cache: ${NODULEAI_OHIF_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/noduleai}/ohif-app-<version>/dist.
# `npm pack` checks the tarball against the registry; the sha512 below is checked again here.
set -euo pipefail

VERSION=3.13.2
INTEGRITY="sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
CACHE="${NODULEAI_OHIF_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/noduleai}"
TARGET="$CACHE/ohif-app-$VERSION"

if [ ! -f "$TARGET/dist/index.html" ] || [ ! -f "$TARGET/.complete" ]; then
  mkdir -p "$CACHE"
  work="$(mktemp -d "$CACHE/.fetch.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack "@ohif/app@$VERSION" --silent --no-audit --no-fund >/dev/null)
  tarball="$work/ohif-app-$VERSION.tgz"
  actual="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
  if [ "$actual" != "$INTEGRITY" ]; then
    echo "@ohif/app@$VERSION: integrity $actual, expected $INTEGRITY" >&2
    exit 1
  fi
  tar -xzf "$tarball" -C "$work" package/dist package/package.json
  rm -rf "$TARGET"
  mkdir -p "$TARGET"
  mv "$work/package/dist" "$work/package/package.json" "$TARGET/"
  touch "$TARGET/.complete"
fi
echo "$TARGET/dist"

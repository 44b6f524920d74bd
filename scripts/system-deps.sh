#!/usr/bin/env bash
# Install the Debian/Ubuntu packages the service and its tests need, when missing.
# DCMTK (modality and SCU/SCP peer), Orthanc with DICOMweb (the PACS), dicom3tools (dciodvfy).
set -euo pipefail

packages=(python3-venv dcmtk orthanc orthanc-dicomweb dicom3tools openssl chromium)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# kubectl 1.22 or later (with kustomize) renders deploy/k8s in tests/integration/test_k8s_manifests.py.
# Debian's kubernetes-client (1.20) is too old to render it, so it is not installed from here; the
# machines this project runs on carry one (the Cloud SDK's), elsewhere install upstream's package.
command -v kubectl >/dev/null \
  || echo "note: kubectl (1.22 or later) not found: the Kubernetes manifest test needs it" >&2
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing: ${missing[*]}"
$sudo apt-get update -qq
# Orthanc's package would start a system service; the tests run their own Orthanc processes.
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"

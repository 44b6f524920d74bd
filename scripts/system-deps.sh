#!/usr/bin/env bash
# Install the Debian/Ubuntu packages the service and its tests need, when missing.
# DCMTK (modality and SCU/SCP peer), Orthanc with DICOMweb (the PACS), dicom3tools (dciodvfy).
set -euo pipefail

packages=(python3-venv dcmtk orthanc orthanc-dicomweb dicom3tools openssl chromium)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing: ${missing[*]}"
$sudo apt-get update -qq
# Orthanc's package would start a system service; the tests run their own Orthanc processes.
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"

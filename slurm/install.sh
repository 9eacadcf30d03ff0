#!/usr/bin/env bash
# Install Debian's Slurm (slurmctld, slurmd, clients) and munge, if missing. Needs root.
set -euo pipefail

missing=0
for bin in sbatch slurmctld slurmd munged mungekey; do
  command -v "$bin" >/dev/null 2>&1 || missing=1
done
if [[ $missing == 0 ]]; then
  exit 0
fi
if [[ $(id -u) != 0 ]]; then
  echo "install.sh: Slurm is not installed and installing it needs root" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# Debian's postinst tries to start the services; without systemd/sysv that is refused, harmlessly.
apt-get install -y -q --no-install-recommends slurmd slurmctld slurm-client munge

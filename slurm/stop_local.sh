#!/usr/bin/env bash
# Stop the SLURM started by slurm/start_local.sh and remove everything it created: jobs, daemons,
# their cgroups, the /etc/hosts line and $MEGATRAIN_SLURM_DIR. Safe to run when nothing is running.
set -euo pipefail

dir=${MEGATRAIN_SLURM_DIR:-/tmp/megatrain-slurm}
hosts_tag="# megatrain-slurm $dir"
export SLURM_CONF=$dir/etc/slurm.conf

pid_of() { [[ -s $1 ]] && cat "$1"; }

# Ends our daemons by the pids they recorded: TERM to all at once (each takes 1-2 s), KILL after 10 s.
stop_pids() {
  local pid alive
  kill -TERM "$@" 2>/dev/null || true
  for _ in $(seq 40); do
    alive=0
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    (( alive )) || return 0
    sleep 0.25
  done
  kill -KILL "$@" 2>/dev/null || true
}

ctld=$(pid_of "$dir/run/slurmctld.pid" || true)
if [[ -n $ctld ]] && kill -0 "$ctld" 2>/dev/null; then
  # Cancel jobs while the controller is up, so slurmd kills their processes through their cgroups.
  mapfile -t jobs < <(squeue -h -o %A 2>/dev/null || true)
  if (( ${#jobs[@]} )); then
    scancel "${jobs[@]}" 2>/dev/null || true
    for _ in $(seq 60); do
      [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break
      sleep 0.5
    done
  fi
fi

daemons=()
for pidfile in "$dir"/run/slurmd-*.pid "$dir/run/slurmctld.pid" "$dir/munge/munged.pid"; do
  pid=$(pid_of "$pidfile" || true)
  if [[ -n $pid ]]; then daemons+=("$pid"); fi
done
if (( ${#daemons[@]} )); then stop_pids "${daemons[@]}"; fi

# Job steps outlive slurmd; any left (a job that ignored SIGTERM) are found in our nodes' cgroups.
nodes=()
if [[ -f $SLURM_CONF ]]; then
  mapfile -t nodes < <(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' "$SLURM_CONF")
fi
for n in "${nodes[@]}"; do
  for cg in /sys/fs/cgroup/*/"slurm_$n"; do
    [[ -d $cg ]] || continue
    while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done < <(find "$cg" -name tasks -exec cat {} + 2>/dev/null)
    # Deepest first: a cgroup directory can only be removed once it has no children.
    find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
done

if grep -qF "$hosts_tag" /etc/hosts 2>/dev/null; then
  # Rewrite in place: /etc/hosts may be a bind mount, which `sed -i` (rename) cannot replace.
  kept=$(grep -vF "$hosts_tag" /etc/hosts || true)
  if [[ -f $dir/run/hosts-no-final-newline ]]; then
    printf '%s' "$kept" >/etc/hosts
  else
    printf '%s\n' "$kept" >/etc/hosts
  fi
fi

rm -rf "$dir"
echo "SLURM stopped; $dir removed"

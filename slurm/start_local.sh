#!/usr/bin/env bash
# Start a real single-host SLURM for tests and demos: munged, slurmctld and one slurmd per emulated
# node (n1, n2 on 127.0.0.1). Everything lives in $MEGATRAIN_SLURM_DIR (default /tmp/megatrain-slurm)
# except two /etc/hosts lines; slurm/stop_local.sh removes all of it. Idempotent.
# Afterwards: export SLURM_CONF=$MEGATRAIN_SLURM_DIR/etc/slurm.conf  (printed on the last line).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dir=${MEGATRAIN_SLURM_DIR:-/tmp/megatrain-slurm}
read -ra nodes <<<"${MEGATRAIN_SLURM_NODES:-n1 n2}"
cpus=${MEGATRAIN_SLURM_CPUS:-4}           # per emulated node; they all share this host's cores
port=${MEGATRAIN_SLURM_PORT:-16817}       # slurmctld; slurmd of node i listens on port+1+i
hosts_tag="# megatrain-slurm $dir"
conf=$dir/etc/slurm.conf
export SLURM_CONF=$conf

if [[ $(id -u) != 0 ]]; then
  echo "start_local.sh: needs root (slurmd runs jobs as their users)" >&2
  exit 1
fi

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

all_up() {
  alive "$dir/munge/munged.pid" && alive "$dir/run/slurmctld.pid" || return 1
  for n in "${nodes[@]}"; do alive "$dir/run/slurmd-$n.pid" || return 1; done
}

if [[ -f $conf ]] && all_up; then
  echo "SLURM already running in $dir"
  echo "export SLURM_CONF=$conf"
  exit 0
fi
# A partial or stale instance: clear it before starting fresh.
[[ -d $dir ]] && "$here/stop_local.sh"

"$here/install.sh"

mkdir -p "$dir"/{etc,run,log,ctld,spool,munge}
chmod 755 "$dir"

# Munge: our own key, socket and daemon, so a system munged (if any) is left alone.
chown munge:munge "$dir/munge"
# munged insists the socket directory is traversable by everyone (job users' clients use it).
chmod 711 "$dir/munge"
runuser -u munge -- mungekey --create --keyfile="$dir/munge/munge.key" --force
runuser -u munge -- munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
  --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"

# Emulated node names must resolve: gloo and torchrun's c10d rendezvous connect to them by name.
if ! grep -qF "$hosts_tag" /etc/hosts; then
  # Remember a missing final newline so stop_local.sh restores the file byte for byte.
  if [[ -s /etc/hosts && -n $(tail -c1 /etc/hosts) ]]; then
    touch "$dir/run/hosts-no-final-newline"
    echo >>/etc/hosts
  fi
  echo "127.0.0.1 ${nodes[*]} $hosts_tag" >>/etc/hosts
fi

host=$(hostname -s)
mem_mb=$(($(awk '/^MemTotal/ {print $2}' /proc/meminfo) / 1024))  # lets jobs ask for --mem
{
  cat <<CONF
ClusterName=megatrain
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5 (the minimum) and sched_interval=1: a requeued job restarts ~7 s later, not ~2 min.
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=5
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmdParameters=config_overrides
# cgroup proctrack: when a job ends or is requeued every process it started (torchrun workers too) dies.
ProctrackType=proctrack/cgroup
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobRequeue=1
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
KillWait=10
InactiveLimit=0
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
CONF
  i=0
  for n in "${nodes[@]}"; do
    i=$((i + 1))
    echo "NodeName=$n NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + i)) CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=$(IFS=,; echo "${nodes[*]}") Default=YES MaxTime=INFINITE State=UP"
} >"$conf"
cat >"$dir/etc/cgroup.conf" <<CONF
CgroupAutomount=yes
CgroupMountpoint=/sys/fs/cgroup
CONF

slurmctld -f "$conf"
for n in "${nodes[@]}"; do
  slurmd -f "$conf" -N "$n"
done

# Nodes report in within a second or two; wait until every one is idle.
for _ in $(seq 60); do
  if [[ $(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l) == "${#nodes[@]}" ]]; then
    echo "SLURM up in $dir: nodes ${nodes[*]}"
    echo "export SLURM_CONF=$conf"
    exit 0
  fi
  sleep 0.5
done
echo "start_local.sh: nodes did not become idle; logs in $dir/log" >&2
sinfo -N -l >&2 || true
tail -n 20 "$dir"/log/*.log >&2 || true
exit 1

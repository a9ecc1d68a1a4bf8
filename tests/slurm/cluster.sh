#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the Slurm tests (`make test-slurm`):
#   tests/slurm/cluster.sh start   installs slurm-wlm + munge if missing (root, apt-get), starts munged (if no
#                                  munge is running), slurmctld and slurmd with a config under $PUZZLE_SLURM_DIR
#   tests/slurm/cluster.sh stop    stops only the daemons `start` started (their pids are recorded)
# Client commands (sbatch, squeue, ...) need SLURM_CONF=$PUZZLE_SLURM_DIR/slurm.conf, which `start` prints.
set -euo pipefail
DIR=${PUZZLE_SLURM_DIR:-/tmp/puzzle-slurm}
CONF=$DIR/slurm.conf

fail() { echo "tests/slurm/cluster.sh: $*" >&2; exit 1; }

start() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
      || fail "slurm-wlm and munge are not installed, and installing them needs root and apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null \
      || fail "apt-get install slurm-wlm munge failed"
  fi
  [ "$(id -u)" = 0 ] || fail "the test cluster runs its daemons as root (SlurmUser=root); run as root"
  mkdir -p "$DIR"/spool/ctld "$DIR"/spool/d "$DIR"/log "$DIR"/run
  : > "$DIR/started"
  if ! (munge -n | unmunge) >/dev/null 2>&1; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    [ -f /etc/munge/munge.key ] || mungekey --create >/dev/null 2>&1 || fail "could not create /etc/munge/munge.key"
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- munged --force || fail "munged did not start (see /var/log/munge/munged.log)"
    cat /run/munge/munged.pid >> "$DIR/started"
    for _ in $(seq 50); do (munge -n | unmunge) >/dev/null 2>&1 && break; sleep 0.1; done
    (munge -n | unmunge) >/dev/null 2>&1 || fail "munge does not answer (see /var/log/munge/munged.log)"
  fi
  host=$(hostname -s)
  memory=$(( $(awk '/MemAvailable/ {print int($2 / 1024)}' /proc/meminfo) * 8 / 10 ))
  cat > "$CONF" <<CONF
ClusterName=puzzle-test
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
KillWait=2
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$host CPUs=$(nproc) RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  slurmctld -f "$CONF" || fail "slurmctld did not start (see $DIR/log/slurmctld.log)"
  for _ in $(seq 50); do [ -s "$DIR/run/slurmctld.pid" ] && break; sleep 0.1; done
  cat "$DIR/run/slurmctld.pid" >> "$DIR/started"
  slurmd -f "$CONF" || fail "slurmd did not start (see $DIR/log/slurmd.log)"
  for _ in $(seq 50); do [ -s "$DIR/run/slurmd.pid" ] && break; sleep 0.1; done
  cat "$DIR/run/slurmd.pid" >> "$DIR/started"
  for _ in $(seq 60); do
    state=$(SLURM_CONF=$CONF sinfo -h -o %T 2>/dev/null || true)
    [ "$state" = idle ] && { echo "SLURM_CONF=$CONF"; return 0; }
    sleep 0.5
  done
  fail "the node did not become idle (sinfo: ${state:-no answer}); see $DIR/log/"
}

stop() {
  [ -f "$DIR/started" ] || return 0
  pids=$(cat "$DIR/started")
  for pid in $pids; do kill "$pid" 2>/dev/null || true; done
  for _ in $(seq 100); do  # slurmctld saves its state before it exits
    alive=""
    for pid in $pids; do [ -d "/proc/$pid" ] && ! grep -q zombie "/proc/$pid/status" 2>/dev/null && alive="$alive $pid"; done
    [ -z "$alive" ] && break
    sleep 0.1
  done
  for pid in $alive; do kill -9 "$pid" 2>/dev/null || true; done
  rm -f "$DIR/started"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) fail "usage: $0 start|stop" ;;
esac

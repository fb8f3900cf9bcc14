#!/usr/bin/env bash
# A single-node SLURM on this machine (controller + compute node "localhost"), to try examples/slurm/*.sbatch
# and for CI (tests/test_slurm.py). Needs root; installs Debian/Ubuntu's slurm-wlm and munge with apt-get
# when they are missing. Everything it writes lives in $NEMO_BARD_SLURM_DIR (default /tmp/nemo-bard-slurm):
# slurm.conf, gres.conf, a munge key and socket, state, logs, pid files. /etc is not touched.
#
#   scripts/slurm_local.sh start     # prints SLURM_CONF=<dir>/slurm.conf: export it for sbatch, squeue, ...
#   scripts/slurm_local.sh status
#   scripts/slurm_local.sh stop
#
# The node gets this machine's CPUs and memory, and NEMO_BARD_SLURM_GPUS (default 2) fake GPUs (gres "gpu",
# type "fake", device files under <dir>/dev): SLURM sets the GPU variables of a job that asks for them
# (--gpus-per-node=2, --gres=gpu:fake:1, ...), nothing more. KillWait is SLURM's default, 30 s: the grace a
# job gets between SIGTERM and SIGKILL at its time limit, on scancel and on requeue.
set -euo pipefail

DIR=${NEMO_BARD_SLURM_DIR:-/tmp/nemo-bard-slurm}
GPUS=${NEMO_BARD_SLURM_GPUS:-2}
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket

die() { echo "slurm_local: $*" >&2; exit 1; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return 0
  command -v apt-get >/dev/null || die "slurmctld/slurmd/munged are missing and there is no apt-get to install them"
  echo "slurm_local: installing slurm-wlm and munge with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2 || die "apt-get install slurm-wlm munge failed"
}

write_config() {
  local cpus mem_mb
  cpus=$(nproc)
  mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/dev" "$DIR/munge"
  local gres_node="" gres_types=""
  if [ "$GPUS" -gt 0 ]; then
    gres_types="GresTypes=gpu"
    gres_node="Gres=gpu:fake:${GPUS}"
    : > "$DIR/gres.conf"
    for ((i = 0; i < GPUS; i++)); do
      : > "$DIR/dev/fakegpu$i"
      echo "NodeName=localhost Name=gpu Type=fake File=$DIR/dev/fakegpu$i" >> "$DIR/gres.conf"
    done
  else
    : > "$DIR/gres.conf"
  fi
  cat > "$CONF" <<EOF
# written by scripts/slurm_local.sh
ClusterName=nemobard
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=${NEMO_BARD_SLURMCTLD_PORT:-6817}
SlurmdPort=${NEMO_BARD_SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
MinJobAge=600
KillWait=30
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
$gres_types
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb $gres_node State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

start() {
  [ "$(id -u)" = 0 ] || die "needs root (munged, slurmctld and slurmd run as root here)"
  install_packages
  if pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd.pid"; then
    echo "SLURM_CONF=$CONF"
    return 0
  fi
  stop >/dev/null 2>&1 || true
  write_config
  [ -s "$DIR/munge/munge.key" ] || { dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none;
                                    chmod 0400 "$DIR/munge/munge.key"; }
  chmod 0755 "$DIR/munge"
  munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munge/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" || die "munged did not start ($DIR/log/munged.log)"
  export SLURM_CONF=$CONF
  slurmctld -f "$CONF" || die "slurmctld did not start ($DIR/log/slurmctld.log)"
  slurmd -f "$CONF" -N localhost || die "slurmd did not start ($DIR/log/slurmd.log)"
  local end=$((SECONDS + 60))
  until sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; do
    [ $SECONDS -lt $end ] || die "node not idle after 60 s: $(sinfo -N 2>&1 | tail -n 1); see $DIR/log"
    sleep 1
  done
  echo "SLURM_CONF=$CONF"
}

stop() {
  local name pidf
  for name in slurmd slurmctld munge/munged; do
    pidf=$DIR/$name.pid
    if pid_alive "$pidf"; then
      kill "$(cat "$pidf")"
      for _ in $(seq 50); do pid_alive "$pidf" || break; sleep 0.2; done
      pid_alive "$pidf" && kill -9 "$(cat "$pidf")"
    fi
    rm -f "$pidf"
  done
  echo "slurm_local: stopped"
}

status() {
  pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd.pid" || { echo "slurm_local: not running"; return 1; }
  SLURM_CONF=$CONF sinfo -N
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac

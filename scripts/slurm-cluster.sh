#!/usr/bin/env bash
# A real single-node SLURM cluster (munged + slurmctld + slurmd) on this
# machine, without systemd, for the tests in tests/test_slurm.py and for trying
# slurm/*.sbatch by hand. Needs root (slurmd runs as root) and, the first time,
# apt (Debian/Ubuntu: slurmctld slurmd slurm-client munge, ~3 MB; libpmix2 for srun --mpi=pmix).
#
#   bash scripts/slurm-cluster.sh start    install if missing, start what is not running, wait for the node
#   bash scripts/slurm-cluster.sh stop     cancel this cluster's jobs, stop the daemons by their PID files
#   bash scripts/slurm-cluster.sh status   exit 0 if all three daemons run and the node is up
#   bash scripts/slurm-cluster.sh env      print the line to eval: export SLURM_CONF=...
#
# Then:  eval "$(bash scripts/slurm-cluster.sh env)"; sbatch slurm/train.sbatch ...
#
# Settings (environment):
#   DDPTRAIN_SLURM_BASE   everything lives here: config, state, logs, munge key (default /tmp/ddptrain-slurm)
#   DDPTRAIN_SLURM_CPUS   CPUs the node advertises, may exceed the real cores (default 4)
#   DDPTRAIN_SLURM_CRED_EXPIRE  seconds, at least 5; a requeued job starts again about this much later
#                         (SLURM's default is 120; default here 5)
#   DDPTRAIN_SLURM_PORT   slurmctld's port; slurmd uses the next one (default 6817)
# Start is idempotent. Stop ends only the processes named in this cluster's PID files.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin:/usr/bin"

BASE=${DDPTRAIN_SLURM_BASE:-/tmp/ddptrain-slurm}
NODE_CPUS=${DDPTRAIN_SLURM_CPUS:-4}
CRED_EXPIRE=${DDPTRAIN_SLURM_CRED_EXPIRE:-5}
PORT=${DDPTRAIN_SLURM_PORT:-6817}
NODE=$(hostname -s)
CONF=$BASE/etc/slurm.conf
M=$BASE/munge
CLUSTER=ddptrain
export SLURM_CONF=$CONF

log() { echo "[slurm-cluster] $*" >&2; }

# alive PIDFILE COMM: the pid in PIDFILE runs and is the program COMM
alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null || true; }

installed() {
  command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged
} >/dev/null 2>&1

install_packages() {
  command -v apt-get >/dev/null || { log "SLURM is not installed and there is no apt-get to install it"; exit 1; }
  log "installing slurmctld slurmd slurm-client munge (apt)"
  local policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then   # keep the packages' postinst from starting services
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null
  if [ "$policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
}

# srun --mpi=pmix (Open MPI 5 speaks only PMIx): Debian's SLURM plugin dlopens PMIx by the
# unversioned name the -dev package provides (pmix2/lib/libpmix.so), and libpmix-dev would bring
# autotools and half a dozen -dev packages with it; the library (libpmix2, 2 MB installed) and
# that one link are enough. Without them srun --mpi=pmix says "can not load PMIx library", and
# srun --mpi=pmi2 works as before. Done before slurmd starts: it loads its MPI plugins then.
ensure_pmix() {
  local plugins=/usr/lib/x86_64-linux-gnu/slurm-wlm lib=/usr/lib/x86_64-linux-gnu/pmix2/lib
  [ -e "$plugins/mpi_pmix.so" ] || return 0
  if [ ! -e "$lib/libpmix.so.2" ] && command -v apt-get >/dev/null; then
    # --no-remove: libpmix2 Breaks Debian's libopenmpi3, which stays; then only pmi2 works
    log "installing libpmix2 (apt), for srun --mpi=pmix"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --no-remove \
        libpmix2 >/dev/null 2>&1 || log "could not install libpmix2: srun --mpi=pmix will not work"
  fi
  if [ -e "$lib/libpmix.so.2" ] && [ ! -e "$lib/libpmix.so" ]; then
    ln -s libpmix.so.2 "$lib/libpmix.so"
  fi
}

write_conf() {
  cat > "$CONF.new" <<EOF
# Written by scripts/slurm-cluster.sh: a one-node test cluster.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$M/munge.socket.2,cred_expire=$CRED_EXPIRE
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# no cgroups here: track processes by their parent, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# srun gives MPICH (the PyPI wheel, or a system one) its ranks through PMI-2; Open MPI's need
# srun --mpi=pmix (slurm/train.sbatch asks for it when its python's mpi4py runs on Open MPI)
MpiDefault=pmi2
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=10
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$NODE_CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
  if cmp -s "$CONF.new" "$CONF"; then rm -f "$CONF.new"; return 1; fi
  mv "$CONF.new" "$CONF"
}

start() {
  trap 'rc=$?; log "FAILED (status $rc) at line $LINENO; logs in $BASE/log"; tail -n 5 "$BASE"/log/*.log "$M/munged.log" 2>/dev/null >&2' ERR
  [ "$(id -u)" = 0 ] || { log "must run as root (slurmd runs as root)"; exit 1; }
  installed || install_packages
  ensure_pmix

  mkdir -p "$BASE"/{etc,state,spool,log,run} "$M"
  chown munge:munge "$M"
  chmod 0755 "$M"                 # munged needs o+x on its socket's folder

  if [ ! -s "$M/munge.key" ]; then
    runuser -u munge -- mungekey --create --keyfile="$M/munge.key"
  fi
  if ! alive "$M/munged.pid" munged; then
    rm -f "$M/munged.pid" "$M/munge.socket.2" "$M/munge.socket.2.lock"
    runuser -u munge -- munged --socket="$M/munge.socket.2" --key-file="$M/munge.key" \
        --log-file="$M/munged.log" --pid-file="$M/munged.pid" --seed-file="$M/munged.seed"
    log "munged started (pid $(cat "$M/munged.pid"))"
  fi
  for _ in $(seq 50); do munge -n -S "$M/munge.socket.2" >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n -S "$M/munge.socket.2" | unmunge -S "$M/munge.socket.2" >/dev/null

  local changed=0
  write_conf && changed=1
  echo "export SLURM_CONF=$CONF" > "$BASE/env.sh"

  # slurmctld refuses a state folder written for another ClusterName
  if [ -f "$BASE/state/clustername" ] && [ "$(cat "$BASE/state/clustername")" != "$CLUSTER" ]; then
    log "the state folder belongs to another cluster; emptying it"
    rm -rf "${BASE:?}/state/"*
  fi
  if ! alive "$BASE/run/slurmctld.pid" slurmctld; then
    rm -f "$BASE/run/slurmctld.pid"
    slurmctld -f "$CONF"            # daemonizes and writes its PID file
    log "slurmctld started"
  elif [ "$changed" = 1 ]; then
    scontrol reconfigure || true
  fi
  if ! alive "$BASE/run/slurmd.pid" slurmd; then
    rm -f "$BASE/run/slurmd.pid"
    slurmd -f "$CONF" -N "$NODE"
    log "slurmd started"
  fi

  local i st
  for i in $(seq 120); do
    st=$(node_state)
    case "$st" in
      idle|mixed|allocated) log "node $NODE is $st after $((i / 2)) s"; break ;;
      *drain*|down*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
  done
  case "$(node_state)" in
    idle|mixed|allocated) ;;
    *) log "node $NODE did not come up (state '$(node_state)'); see $BASE/log"; exit 1 ;;
  esac
  log "ready: export SLURM_CONF=$CONF"
}

# stop_pid PIDFILE COMM: SIGTERM, wait up to 15 s, then SIGKILL; only if the pid is COMM
stop_pid() {
  local file=$1 comm=$2 pid
  [ -s "$file" ] || return 0
  pid=$(cat "$file")
  if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$comm" ]; then
    rm -f "$file"; return 0
  fi
  kill -TERM "$pid"
  for _ in $(seq 150); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
  if [ -d "/proc/$pid" ]; then log "$comm (pid $pid) still running, SIGKILL"; kill -KILL "$pid"; fi
  rm -f "$file"
  log "$comm (pid $pid) stopped"
}

stop() {
  # cancel this cluster's jobs first, so that no job outlives slurmd
  if alive "$BASE/run/slurmctld.pid" slurmctld; then
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      log "cancelling jobs: $(echo $jobs)"
      scancel $jobs || true
      for _ in $(seq 60); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  stop_pid "$BASE/run/slurmd.pid" slurmd
  stop_pid "$BASE/run/slurmctld.pid" slurmctld
  stop_pid "$M/munged.pid" munged
}

status() {
  alive "$M/munged.pid" munged && alive "$BASE/run/slurmctld.pid" slurmctld \
    && alive "$BASE/run/slurmd.pid" slurmd || return 1
  case "$(node_state)" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac

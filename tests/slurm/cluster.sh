#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the SLURM integration test (make test-slurm).
#   cluster.sh start DIR   install slurm-wlm + munge if missing, write the config, start munged, slurmctld, slurmd
#   cluster.sh stop DIR    stop every daemon it started (by PID), restore /etc/slurm/slurm.conf, remove DIR
# Facts this relies on (Debian 12, Slurm 22.05, no systemd, no cgroups): the daemons are started by hand;
# proctrack/linuxproc + task/none; the job step strips SLURM_CONF, so slurm.conf must be at
# /etc/slurm/slurm.conf; without slurmdbd there is no accounting (the profile polls squeue instead).
set -euo pipefail
action=${1:?start|stop}
state=${2:?state directory}
conf=/etc/slurm/slurm.conf

start() {
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        apt-get install -y -q slurm-wlm munge >"$state.apt.log" 2>&1 || { cat "$state.apt.log"; exit 1; }
    fi
    mkdir -p "$state"/{spool,statesave,munge}
    host=$(hostname -s)
    memory=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
    cpus=$(nproc)
    if [ -e "$conf" ]; then cp -p "$conf" "$state/slurm.conf.orig"; fi
    mkdir -p /etc/slurm
    cat >"$conf" <<CONF
ClusterName=moecompresstest
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$state/statesave
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
MinJobAge=3600
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    # munge: our own key and socket, so an existing munge set-up is left alone
    dd if=/dev/urandom bs=1 count=1024 of="$state/munge/munge.key" 2>/dev/null
    chmod 400 "$state/munge/munge.key"
    mkdir -p /run/munge
    munged --force --key-file="$state/munge/munge.key" --socket=/run/munge/munge.socket.2 \
        --pid-file="$state/munged.pid" --log-file="$state/munged.log" --seed-file="$state/munge/seed"
    slurmctld -f "$conf"
    slurmd -f "$conf"
    for _ in $(seq 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed)'; then
            echo "one-node cluster up: $(sinfo -h -o '%P %D %T %c')"
            return 0
        fi
        sleep 1
    done
    echo "slurm did not come up" >&2
    tail -n 20 "$state"/*.log >&2 || true
    return 1
}

stop() {
    for daemon in slurmd slurmctld munged; do
        if [ -s "$state/$daemon.pid" ]; then
            pid=$(cat "$state/$daemon.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    if [ -e "$state/slurm.conf.orig" ]; then cp -p "$state/slurm.conf.orig" "$conf"; else rm -f "$conf"; fi
    rm -rf "$state" "$state.apt.log"
}

"$action"

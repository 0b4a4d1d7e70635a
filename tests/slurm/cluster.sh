#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the SLURM integration test (make test-slurm).
#   cluster.sh start DIR [--accounting]   install slurm-wlm + munge if missing, write the config, start munged,
#                                         slurmctld, slurmd; with --accounting also MariaDB + slurmdbd, so that
#                                         sacct works (the executor plugin's default job-status path)
#   cluster.sh stop DIR    stop every daemon it started (by PID), restore /etc/slurm/*.conf, remove DIR
# Facts this relies on (Debian 12, Slurm 22.05, no systemd, no cgroups): the daemons are started by hand;
# proctrack/linuxproc + task/none; the job step strips SLURM_CONF, so slurm.conf must be at
# /etc/slurm/slurm.conf; without slurmdbd there is no accounting (the profile polls squeue instead).
set -euo pipefail
action=${1:?start|stop}
state=${2:?state directory}
accounting=${3:-}
conf=/etc/slurm/slurm.conf
dbd_conf=/etc/slurm/slurmdbd.conf
db_port=3399  # MariaDB on loopback, away from a server the machine may already run

wait_for() {  # wait_for SECONDS COMMAND...: poll until COMMAND succeeds
    local seconds=$1
    shift
    for _ in $(seq "$seconds"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    return 1
}

start_accounting() {
    local host=$1
    if ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
        apt-get install -y -q slurmdbd mariadb-server >"$state.apt.log" 2>&1 || { cat "$state.apt.log"; exit 1; }
    fi
    mkdir -p "$state/mysql"
    mariadb-install-db --user=root --datadir="$state/mysql" --auth-root-authentication-method=normal \
        --skip-test-db >"$state/mariadb-install.log" 2>&1
    mariadbd --user=root --datadir="$state/mysql" --socket="$state/mysql.sock" --pid-file="$state/mariadbd.pid" \
        --bind-address=127.0.0.1 --port=$db_port --log-error="$state/mariadbd.log" </dev/null >/dev/null 2>&1 &
    wait_for 60 mariadb --socket="$state/mysql.sock" -e "SELECT 1" || { tail -n 20 "$state/mariadbd.log" >&2; return 1; }
    mariadb --socket="$state/mysql.sock" -e "CREATE DATABASE slurm_acct_db;
        CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'moecompresstest';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    if [ -e "$dbd_conf" ]; then cp -p "$dbd_conf" "$state/slurmdbd.conf.orig"; fi
    cat >"$dbd_conf" <<CONF
AuthType=auth/munge
DbdHost=$host
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=moecompresstest
StorageLoc=slurm_acct_db
PidFile=$state/slurmdbd.pid
LogFile=$state/slurmdbd.log
CONF
    chmod 600 "$dbd_conf"
    slurmdbd
    wait_for 60 sacctmgr -n list cluster || { tail -n 20 "$state/slurmdbd.log" >&2; return 1; }
    sacctmgr -i add cluster moecompresstest >/dev/null
}

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
$(if [ "$accounting" = --accounting ]; then echo "AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$host"; else echo "AccountingStorageType=accounting_storage/none"; fi)
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
    if [ "$accounting" = --accounting ]; then start_accounting "$host"; fi
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
    for daemon in slurmd slurmctld slurmdbd mariadbd munged; do
        if [ -s "$state/$daemon.pid" ]; then
            pid=$(cat "$state/$daemon.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    if [ -e "$state/slurm.conf.orig" ]; then cp -p "$state/slurm.conf.orig" "$conf"; else rm -f "$conf"; fi
    if [ -e "$state/slurmdbd.conf.orig" ]; then cp -p "$state/slurmdbd.conf.orig" "$dbd_conf"
    elif [ -e "$state/mariadbd.pid" ] || [ -e "$state/mysql" ]; then rm -f "$dbd_conf"; fi
    rm -rf "$state" "$state.apt.log"
}

"$action"

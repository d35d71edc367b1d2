#!/usr/bin/env bash
# local_slurm.sh -- bring up a real single-node SLURM cluster (with accounting) on Debian/Ubuntu.
#
# For tests/CI and for rehearsing mimsweep sweeps on a workstation. Run as root; needs no systemd.
#
#   bash cluster/local_slurm.sh up      # install if needed, configure, start daemons, wait until ready
#   bash cluster/local_slurm.sh status  # show daemons + sinfo; exit 0 only if everything is up
#   bash cluster/local_slurm.sh down    # stop the daemons this script started (by recorded PID)
#
# `up` is idempotent: when everything already runs it is a fast no-op; when some daemons died it
# restarts only those. State (job ids, queue) survives down/up; wipe the state dir to start over.
#
# Knobs (environment):
#   MIMSWEEP_SLURM_DIR        state root: logs, spool, controller state, pid files
#                             (default /var/lib/mimsweep-slurm)
#   MIMSWEEP_SLURM_PARTITION  name of the single (default) partition   (default debug)
#   MIMSWEEP_SLURM_MAX_ARRAY  MaxArraySize                             (default 1001)
#
# Files: /etc/slurm/slurm.conf and /etc/slurm/slurmdbd.conf (where Debian's slurm looks);
# logs in $MIMSWEEP_SLURM_DIR/log/; the accounting database (slurm_acct_db) lives in the system
# MariaDB datadir (/var/lib/mysql).
set -euo pipefail

STATE_DIR=${MIMSWEEP_SLURM_DIR:-/var/lib/mimsweep-slurm}
PARTITION=${MIMSWEEP_SLURM_PARTITION:-debug}
MAX_ARRAY=${MIMSWEEP_SLURM_MAX_ARRAY:-1001}

CLUSTER=mimsweep
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)
LOG_DIR=$STATE_DIR/log
RUN_DIR=$STATE_DIR/run
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
MARKER="# Managed by mimsweep cluster/local_slurm.sh"
MYSQL_SOCK=/run/mysqld/mysqld.sock
NODE=$(hostname -s)
# Daemons in start order; `down` walks it backwards.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

# Our own commands must talk to this cluster even if the caller points SLURM_CONF elsewhere.
export SLURM_CONF=$CONF

say() { printf '[local_slurm] %s\n' "$*"; }

# die MESSAGE [LOGFILE]: explain what failed and show where to look.
die() {
    printf '[local_slurm] ERROR: %s\n' "$1" >&2
    if [[ -n ${2:-} ]]; then
        printf '[local_slurm] Read the log: %s (last lines below)\n' "$2" >&2
        tail -n 20 "$2" 2>/dev/null | sed 's/^/    | /' >&2 || true
    fi
    exit 1
}

need_root() { [[ $EUID -eq 0 ]] || die "'$1' must run as root (it installs packages and starts daemons)"; }

pidfile() { echo "$RUN_DIR/$1.pid"; }

# running NAME: true if the PID recorded for NAME is a live (non-zombie) process of that name.
# Checking the name guards against PID reuse after a reboot with a persistent state dir; checking
# for zombies matters in containers whose PID 1 does not reap orphans.
running() {
    local pid comm state
    pid=$(cat "$(pidfile "$1")" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$1" ]] || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $state != Z ]]
}

# wait_for SECONDS WHAT LOG PIDNAME CMD...: poll CMD until it succeeds. Fails fast if daemon
# PIDNAME ("-" for none) has recorded a PID and died, instead of sitting out the timeout.
wait_for() {
    local secs=$1 what=$2 log=$3 name=$4
    shift 4
    local deadline=$((SECONDS + secs)) out
    until out=$("$@" 2>&1); do
        if [[ $name != - && -s $(pidfile "$name") ]] && ! running "$name"; then
            die "$what: the daemon exited during startup" "$log"
        fi
        if ((SECONDS >= deadline)); then
            printf '[local_slurm] readiness check "%s" said: %s\n' "$*" "${out:-<nothing>}" >&2
            die "$what: not ready after ${secs}s" "$log"
        fi
        sleep 0.2
    done
}

install_packages() {
    local pkg missing=()
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    ((${#missing[@]} == 0)) && return 0
    say "installing ${missing[*]} (apt-get, ~30 s)"
    export DEBIAN_FRONTEND=noninteractive
    local log=$LOG_DIR/apt.log
    # Try without `apt-get update` first: it is slow and the lists are usually fresh enough.
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
        say "install failed; running apt-get update and retrying"
        apt-get update >>"$log" 2>&1 || die "apt-get update failed" "$log"
        apt-get install -y --no-install-recommends "${missing[@]}" >>"$log" 2>&1 \
            || die "apt-get install ${missing[*]} failed" "$log"
    fi
}

prepare_dirs() {
    install -d -m 755 "$STATE_DIR" "$LOG_DIR" "$RUN_DIR" "$STATE_DIR/spool/slurmd" "$STATE_DIR/state"
}

# write_if_changed FILE MODE CONTENT: returns 0 if the file was (re)written, 1 if unchanged.
# Refuses to overwrite a config that this script did not write (a real cluster's, say).
write_if_changed() {
    local file=$1 mode=$2 content=$3
    if [[ -e $file ]] && ! grep -qxF "$MARKER" "$file"; then
        die "$file exists and was not written by this script; move it away to use a local cluster"
    fi
    if [[ -e $file ]] && [[ $(cat "$file") == "$content" ]]; then
        return 1
    fi
    install -d -m 755 "$(dirname "$file")"
    (umask 077 && printf '%s\n' "$content" >"$file.tmp")
    chmod "$mode" "$file.tmp"
    mv -f "$file.tmp" "$file"
    return 0
}

# Writes slurm.conf and slurmdbd.conf. A daemon whose config changed while it runs is stopped,
# so that the start_* functions bring it back with the new settings.
configure() {
    if ! [[ $MAX_ARRAY =~ ^[1-9][0-9]*$ ]]; then
        die "MIMSWEEP_SLURM_MAX_ARRAY must be a positive integer, got '$MAX_ARRAY'"
    fi
    if ! [[ $PARTITION =~ ^[A-Za-z0-9_.-]+$ ]]; then
        die "MIMSWEEP_SLURM_PARTITION must be a plain name, got '$PARTITION'"
    fi

    # The node line must match what slurmd detects, or slurmctld drains the node.
    local hw cpus boards sockets cores threads mem
    hw=$(slurmd -C 2>/dev/null | head -n 1) || die "'slurmd -C' failed (is slurmd installed?)"
    hw_field() { grep -oE "(^| )$1=[0-9]+" <<<"$hw" | cut -d= -f2; }
    cpus=$(hw_field CPUs) boards=$(hw_field Boards) sockets=$(hw_field SocketsPerBoard)
    cores=$(hw_field CoresPerSocket) threads=$(hw_field ThreadsPerCore) mem=$(hw_field RealMemory)
    [[ -n $cpus && -n $mem ]] || die "could not parse 'slurmd -C' output: $hw"
    # Leave headroom: the node drains if it ever reports less memory than configured.
    mem=$((mem * 95 / 100))
    local max_jobs=$((MAX_ARRAY * 2 > 10000 ? MAX_ARRAY * 2 : 10000))

    local slurm_conf
    slurm_conf="$MARKER
# Single-node cluster for tests/rehearsal. Regenerated by 'up'; edit the script, not this file.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
# No systemd/cgroups here: run everything as root with plain process tracking.
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Per-core + per-memory allocation; without DefMemPerCPU each job takes all memory and
# array tasks run one at a time.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
# Dependents of a failed job are cancelled instead of pending forever.
DependencyParameters=kill_invalid_depend
PreemptType=preempt/none
PreemptMode=OFF
MaxArraySize=$MAX_ARRAY
MaxJobCount=$max_jobs
ReturnToService=2
KillWait=5
# Keep finished jobs visible in squeue for a while.
MinJobAge=300
InactiveLimit=0
MailProg=/bin/true
# Listen on loopback only (SlurmctldHost's and NodeAddr's 127.0.0.1), never on every interface:
# a rehearsal cluster must not be reachable from the network. tests/test_launch_safety.py checks it.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
# sacct must work: submitit polls it, and waits forever on killed jobs without it.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus Boards=$boards SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP"

    # The DB password is generated once and kept, so reruns do not change slurmdbd.conf.
    local passfile=$STATE_DIR/dbpass
    if [[ ! -s $passfile ]]; then
        # (not `tr </dev/urandom | head`: tr's SIGPIPE would trip pipefail)
        (umask 077 && head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$passfile")
    fi
    local dbd_conf
    dbd_conf="$MARKER
DbdHost=localhost
DbdAddr=127.0.0.1
# Loopback only (see slurm.conf's CommunicationParameters).
CommunicationParameters=NoInAddrAny
SlurmUser=root
AuthType=auth/munge
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$(cat "$passfile")"

    if write_if_changed "$CONF" 644 "$slurm_conf"; then
        say "wrote $CONF"
        stop_daemon slurmd
        stop_daemon slurmctld
    fi
    # slurmdbd refuses a config readable by others or not owned by SlurmUser (root).
    if write_if_changed "$DBD_CONF" 600 "$dbd_conf"; then
        say "wrote $DBD_CONF"
        stop_daemon slurmdbd
    fi
}

# munge_works: a credential round-trip through whatever munged owns the socket.
munge_works() { munge -n </dev/null | unmunge >/dev/null; }

start_munge() {
    running munged && return 0
    if munge_works 2>/dev/null; then
        say "munged already running (not started by this script); using it"
        rm -f "$(pidfile munged)"
        return 0
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        # Debian's postinst normally creates it; recreate if someone deleted it.
        mungekey --create --keyfile=/etc/munge/munge.key >/dev/null
        chown munge:munge /etc/munge/munge.key
        chmod 600 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 755 /run/munge
    local log=$LOG_DIR/munged.log
    # munged runs as user munge, so it can only write where munge may; copy its PID file after.
    touch "$log" && chown munge:munge "$log" && chmod 640 "$log"
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged --log-file="$log" --pid-file=/run/munge/munged.pid 9>&- \
        || die "munged failed to start" "$log"
    wait_for 10 "munged" "$log" - munge_works
    cp /run/munge/munged.pid "$(pidfile munged)"
}

mariadb_ping() { mariadb-admin --socket="$MYSQL_SOCK" ping; }

start_mariadb() {
    running mariadbd && return 0
    if mariadb_ping >/dev/null 2>&1; then
        say "MariaDB already running (not started by this script); using it"
        rm -f "$(pidfile mariadbd)"
        return 0
    fi
    local log=$LOG_DIR/mariadb.log
    install -d -o mysql -g mysql -m 755 /run/mysqld
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        # Debian's postinst normally initialises the datadir; do it if that was skipped.
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql \
            --auth-root-authentication-method=socket --skip-test-db >>"$log" 2>&1 \
            || die "mariadb-install-db failed" "$log"
    fi
    touch "$log" && chown mysql:mysql "$log"
    # Not mysqld_safe: running mariadbd directly leaves one PID to record and stop.
    # setsid detaches it from our session, so it outlives this script and the terminal.
    # --bind-address: loopback only, whatever /etc/mysql says (slurmdbd uses the socket anyway).
    setsid /usr/sbin/mariadbd --user=mysql --log-error="$log" --innodb-lock-wait-timeout=900 \
        --bind-address=127.0.0.1 \
        --innodb-buffer-pool-size=512M \
        </dev/null >>"$log" 2>&1 9>&- &
    echo $! >"$(pidfile mariadbd)"
    wait_for 60 "mariadb" "$log" mariadbd mariadb_ping
}

# Idempotent: safe to run against an existing database.
setup_database() {
    local pass
    pass=$(cat "$STATE_DIR/dbpass")
    mariadb --socket="$MYSQL_SOCK" -u root <<SQL >>"$LOG_DIR/mariadb.log" 2>&1 \
        || die "creating the slurm_acct_db database/user failed" "$LOG_DIR/mariadb.log"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
}

dbd_works() { sacctmgr -n -P show cluster format=cluster; }

start_slurmdbd() {
    running slurmdbd && return 0
    setup_database
    local log=$LOG_DIR/slurmdbd.log
    rm -f "$(pidfile slurmdbd)"
    /usr/sbin/slurmdbd 9>&- || die "slurmdbd failed to start" "$log"
    # First start creates the schema, which takes a few seconds.
    wait_for 60 "slurmdbd" "$log" slurmdbd dbd_works
}

# slurmctld needs its cluster registered in slurmdbd; root gets an association automatically.
register_accounting() {
    local log=$LOG_DIR/sacctmgr.log
    if ! sacctmgr -n -P show cluster format=cluster 2>>"$log" | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >>"$log" 2>&1 || die "sacctmgr add cluster failed" "$log"
    fi
    # A non-root user who ran us via sudo gets an association too, so their jobs are accounted.
    local user=${SUDO_USER:-}
    if [[ -n $user && $user != root ]] && id "$user" >/dev/null 2>&1; then
        if ! sacctmgr -n -P show assoc cluster="$CLUSTER" user="$user" format=user 2>>"$log" | grep -q .; then
            sacctmgr -i add account mimsweep Cluster="$CLUSTER" Description=mimsweep Organization=mimsweep \
                >>"$log" 2>&1 || true # already exists
            sacctmgr -i add user "$user" Account=mimsweep Cluster="$CLUSTER" >>"$log" 2>&1 \
                || die "sacctmgr add user $user failed" "$log"
        fi
    fi
}

ctld_works() { scontrol ping | grep -q 'is UP'; }

start_slurmctld() {
    running slurmctld && return 0
    local log=$LOG_DIR/slurmctld.log
    rm -f "$(pidfile slurmctld)"
    # No -c: keep saved state so job ids continue across down/up.
    /usr/sbin/slurmctld 9>&- || die "slurmctld failed to start" "$log"
    wait_for 30 "slurmctld" "$log" slurmctld ctld_works
}

start_slurmd() {
    running slurmd && return 0
    local log=$LOG_DIR/slurmd.log
    rm -f "$(pidfile slurmd)"
    /usr/sbin/slurmd 9>&- || die "slurmd failed to start" "$log"
    wait_for 10 "slurmd" "$log" slurmd test -s "$(pidfile slurmd)"
}

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n 1; }

# node_usable: idle, or busy with jobs (a rerun of `up` must not wait for jobs to finish).
# A trailing '*' means not responding, '~'/'#' power states; none of those count.
node_usable() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }

wait_ready() {
    local deadline=$((SECONDS + 60)) resumed=0 state
    until node_usable; do
        running slurmd || die "slurmd exited before the node came up" "$LOG_DIR/slurmd.log"
        running slurmctld || die "slurmctld exited before the node came up" "$LOG_DIR/slurmctld.log"
        state=$(node_state)
        # ReturnToService=2 brings back DOWN nodes, but not drained ones (e.g. after a config
        # change); resume once, then report the reason if it does not stick.
        if ((!resumed)) && [[ $state =~ drain|down ]]; then
            scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
            resumed=1
        fi
        if ((SECONDS >= deadline)); then
            die "node $NODE not usable after 60s (state '$state', reason: $(sinfo -h -N -n "$NODE" -o %E))" \
                "$LOG_DIR/slurmctld.log"
        fi
        sleep 0.2
    done
    sacct -n -X -S now-1minutes -o JobID >/dev/null 2>&1 \
        || die "sacct does not work (accounting via slurmdbd)" "$LOG_DIR/slurmdbd.log"
}

# stop_daemon NAME: SIGTERM the recorded PID, wait for exit (slurmctld saves state, MariaDB
# flushes), SIGKILL as a last resort. Daemons we did not start have no PID file and are left alone.
stop_daemon() {
    local name=$1 pid
    if ! running "$name"; then
        rm -f "$(pidfile "$name")"
        return 0
    fi
    pid=$(cat "$(pidfile "$name")")
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 60))
    while running "$name"; do
        if ((SECONDS >= deadline)); then
            say "$name (pid $pid) ignored SIGTERM for 60s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.2
    done
    rm -f "$(pidfile "$name")"
    say "stopped $name (pid $pid)"
}

summary() {
    say "cluster '$CLUSTER' is up: node $NODE, partition $PARTITION, MaxArraySize=$MAX_ARRAY"
    say "config $CONF, logs $LOG_DIR/"
    sinfo
}

cmd_up() {
    need_root up
    prepare_dirs
    exec 9>"$STATE_DIR/lock"
    # Serialise concurrent `up`/`down` (parallel CI jobs). Daemons get fd 9 closed (9>&-) so they
    # do not hold the lock forever.
    flock 9
    install_packages
    configure
    start_munge
    start_mariadb
    start_slurmdbd
    register_accounting
    start_slurmctld
    start_slurmd
    wait_ready
    summary
}

cmd_down() {
    need_root down
    [[ -d $RUN_DIR ]] || { say "nothing to stop (no $RUN_DIR)"; return 0; }
    exec 9>"$STATE_DIR/lock"
    flock 9
    local i
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        stop_daemon "${DAEMONS[i]}"
    done
    # slurmstepd (running jobs) outlive slurmd by design; say so rather than kill user work.
    if pgrep -x slurmstepd >/dev/null 2>&1; then
        say "note: running jobs outlive 'down' (slurmstepd pids: $(pgrep -x slurmstepd | tr '\n' ' '));" \
            "they reattach on 'up'. scancel them first if they should go."
    fi
}

cmd_status() {
    local name rc=0
    for name in "${DAEMONS[@]}"; do
        if running "$name"; then
            printf '%-10s running (pid %s)\n' "$name" "$(cat "$(pidfile "$name")")"
        elif [[ $name == munged ]] && munge_works 2>/dev/null; then
            printf '%-10s running (not started by this script)\n' "$name"
        elif [[ $name == mariadbd ]] && mariadb_ping >/dev/null 2>&1; then
            printf '%-10s running (not started by this script)\n' "$name"
        else
            printf '%-10s not running\n' "$name"
            rc=1
        fi
    done
    if command -v sinfo >/dev/null 2>&1; then
        sinfo 2>&1 || rc=1
        node_usable || rc=1
    fi
    return $rc
}

case ${1:-} in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
*)
    echo "usage: $0 up|down|status   (see the header of $0 for details)" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Stop what tests/slurm/start-cluster.sh STATE_DIR started, whatever state it
# is in, and remove the slurm.conf and gres.conf it wrote.
#
#   tests/slurm/stop-cluster.sh STATE_DIR
set -uo pipefail
state="$1"
conf=/etc/slurm
marker="# tilefusion test cluster"

ours() { [ -e "$conf/$1" ] && head -n1 "$conf/$1" | grep -q "^$marker"; }
# cancel what is left only on our cluster, never on a real one
if ours slurm.conf; then
    timeout 10 scancel --user="$(id -un)" 2>/dev/null
fi
stop() {  # stop the daemon whose pid file is $1: TERM, then KILL after 10 s
    local pidfile="$1" pid
    [ -s "$pidfile" ] || return 0
    pid="$(cat "$pidfile")"
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 40); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.25
    done
    kill -KILL "$pid" 2>/dev/null
    return 0
}
stop "$state/slurmd.pid"
stop "$state/slurmctld.pid"
stop "$state/munged.pid"
for file in slurm.conf gres.conf; do
    if ours "$file"; then
        rm -f "$conf/$file"
    fi
done
exit 0

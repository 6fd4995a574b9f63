#!/usr/bin/env bash
# Start a one-node SLURM cluster on localhost with one fake GPU, for tests.
#
#   tests/slurm/start-cluster.sh STATE_DIR
#
# Needs root and Debian's slurm-wlm and munge. Daemons keep their state,
# logs and pid files in STATE_DIR; slurm.conf and gres.conf go to /etc/slurm
# (the plugin's job step drops SLURM_CONF). Refuses to touch an slurm.conf it
# did not write. Stop everything with tests/slurm/stop-cluster.sh STATE_DIR.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state="$(mkdir -p "$1" && cd "$1" && pwd)"
conf=/etc/slurm
marker="# tilefusion test cluster"

for tool in munge unmunge munged slurmctld slurmd sinfo scontrol; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 3; }
done
[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 3; }
for file in slurm.conf gres.conf; do
    if [ -e "$conf/$file" ] && ! head -n1 "$conf/$file" | grep -q "^$marker"; then
        echo "$conf/$file exists and is not ours" >&2
        exit 3
    fi
done

host="$(hostname -s)"
mkdir -p "$state/ctld" "$state/d" "$conf"
ln -sfn /dev/null "$state/fakegpu0"
render() {
    sed -e "s|@HOST@|$host|g" -e "s|@STATE@|$state|g" \
        -e "s|@CTLD_PORT@|${TILEFUSION_SLURMCTLD_PORT:-6817}|g" \
        -e "s|@D_PORT@|${TILEFUSION_SLURMD_PORT:-6818}|g" "$here/$1.in" >"$conf/$1"
}
render slurm.conf
render gres.conf

# munge: reuse a running munged, else start one (and stop it afterwards)
if ! (munge -n | unmunge) >/dev/null 2>&1; then
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    args=(--pid-file=/run/munge/munged.pid --log-file=/var/log/munge/munged.log)
    runuser -u munge -- munged "${args[@]}" 2>/dev/null || munged --force "${args[@]}"
    cp /run/munge/munged.pid "$state/munged.pid"
fi

slurmctld
slurmd

# ready when the node is idle (bounded)
for _ in $(seq 120); do
    if sinfo -h -N -o '%t' 2>/dev/null | grep -qx idle; then
        sinfo -N -o '%N %P %c %m %G %t'
        exit 0
    fi
    sleep 0.5
done
echo "the node did not become idle in 60 s" >&2
sinfo -N -o '%N %P %c %m %G %t %E' >&2 || true
tail -n 20 "$state/slurmctld.log" "$state/slurmd.log" >&2 || true
exit 1

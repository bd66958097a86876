#!/usr/bin/env bash
# A real Slurm on one machine, for tests: `slurm_up.sh up DIR` / `slurm_up.sh down DIR` (root; Debian's slurmctld,
# slurmd, slurm-client and munge).
#
# Three nodes, node1..node3, each a slurmd (`slurmd -N NAME`, Slurm's multiple-slurmd support) on a port of its own
# in a network namespace of its own with its own address (10.78.0.1..3) on a bridge; slurmctld runs in a fourth
# namespace (10.78.0.100), and so must every client command (srun, sbatch, scancel, sinfo): `DIR/run CMD...` runs one
# there with SLURM_CONF set. The bridge lives in a namespace of its own too, so that nothing connects these hosts to
# the machine's network, and the machine's firewall rules do not apply. munged is private to DIR (its own key and
# socket). Everything lives in DIR; `down` kills every daemon and every process left in the namespaces, and removes
# the namespaces.
set -euo pipefail
cmd=${1:?usage: slurm_up.sh up|down DIR}
dir=$(realpath -m "${2:?usage: slurm_up.sh up|down DIR}")
tag=$(printf %s "$dir" | md5sum | cut -c1-6)     # namespace names: one set per DIR
ns_sw=psl${tag}sw ns_ctl=psl${tag}ctl
nodes=(node1 node2 node3)
net=10.78.0
# into a namespace without `ip netns exec`, which mounts a sysfs of its own and so hides /sys/fs/cgroup from slurmd
inns() { nsenter --net="/run/netns/$1" "${@:2}"; }

down() {
    for ns in "$ns_ctl" "${nodes[@]/#/psl${tag}}" "$ns_sw"; do
        if ip netns list | grep -qw "$ns"; then
            for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null || true; done
            ip netns del "$ns" 2>/dev/null || true
        fi
    done
    if [ -f "$dir/munged.pid" ]; then
        pid=$(cat "$dir/munged.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done  # it writes its seed file
    fi
    rm -rf "$dir"
}

if [ "$cmd" = down ]; then down; exit 0; fi
[ "$cmd" = up ] || { echo "usage: slurm_up.sh up|down DIR" >&2; exit 2; }
for tool in slurmctld slurmd srun munged ip nsenter; do
    command -v "$tool" >/dev/null || { echo "slurm_up.sh: $tool is not installed" >&2; exit 3; }
done
down   # a previous run's leftovers, if any
mkdir -p "$dir"/{state,log,spool}
chmod 700 "$dir"

# the network: a bridge in its own namespace; ctl and each node with a veth pair to it
ip netns add "$ns_sw"
ip -n "$ns_sw" link add br0 type bridge
ip -n "$ns_sw" link set br0 up
hosts=(ctl "${nodes[@]}") addrs=("$net.100" "$net.1" "$net.2" "$net.3")
for i in "${!hosts[@]}"; do
    ns=psl${tag}${hosts[$i]}
    ip netns add "$ns"
    ip link add "port$i" netns "$ns_sw" type veth peer name eth0 netns "$ns"
    ip -n "$ns_sw" link set "port$i" master br0 up
    ip -n "$ns" addr add "${addrs[$i]}/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
done

# munge: a key and a daemon of our own; every Slurm daemon and command uses its socket (AuthInfo)
dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge.key"
munged --force --key-file="$dir/munge.key" --socket="$dir/munge.socket" --pid-file="$dir/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munged.seed"

cpus=$(nproc)
# proctrack/pgid: scancel signals each task's process group (a psrv launcher and its children); proctrack/linuxproc
# delivered no SIGTERM at all here, and proctrack/cgroup needs a cgroup hierarchy that containers often lack
cat > "$dir/slurm.conf" <<EOF
ClusterName=psrvtest
SlurmctldHost=$(hostname -s)($net.100)
SlurmctldPort=16817
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=30
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=node1 NodeAddr=$net.1 Port=17001 CPUs=$cpus State=UNKNOWN
NodeName=node2 NodeAddr=$net.2 Port=17002 CPUs=$cpus State=UNKNOWN
NodeName=node3 NodeAddr=$net.3 Port=17003 CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=node[1-3] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
cat > "$dir/run" <<EOF
#!/bin/sh
# a command on the cluster's control host (srun, sbatch, scancel, sinfo ...)
SLURM_CONF=$dir/slurm.conf exec nsenter --net=/run/netns/$ns_ctl "\$@"
EOF
chmod +x "$dir/run"
for n in "${nodes[@]}"; do echo "$n psl${tag}$n"; done > "$dir/namespaces"   # for tests: which node is where
for n in "${nodes[@]}"; do mkdir -p "$dir/spool/$n"; done

inns "$ns_ctl" slurmctld -f "$dir/slurm.conf"
for n in "${nodes[@]}"; do
    inns "psl${tag}$n" slurmd -f "$dir/slurm.conf" -N "$n"
done
# up when every node is idle
for _ in $(seq 1 60); do
    if [ "$("$dir/run" sinfo -h -o '%D %t' -p test 2>/dev/null)" = "3 idle" ]; then echo "slurm up: $dir"; exit 0; fi
    sleep 0.5
done
echo "slurm_up.sh: the nodes did not become idle within 30 s:" >&2
"$dir/run" sinfo -N >&2 || true
tail -5 "$dir"/log/*.log >&2 || true
exit 1

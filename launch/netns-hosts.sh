#!/usr/bin/env bash
# Test "hosts" on one machine (needs root): network namespaces on a bridge, each with its own address
# and an sshd on port 2222 that accepts a throw-away key.  Lets a real multi-host horovodrun job (ssh,
# rendezvous, cross-host Gloo/MPI traffic) run without a second machine.
#
#   launch/netns-hosts.sh up [STATE_DIR]     create rhvd-ns1 (10.77.0.11), rhvd-ns2 (10.77.0.12), ...
#   launch/netns-hosts.sh down [STATE_DIR]   remove them and stop their sshd
#   launch/netns-hosts.sh rate RATE|none     set (or remove) the tc limit on every host's link
#   launch/netns-hosts.sh exec CMD...        run CMD inside rhvd-ns1 (start ranger-hvd from there)
#
# Then, e.g.:
#   launch/netns-hosts.sh exec .venv/bin/ranger-hvd launch configs/cnn-digits.yaml \
#     'cluster.hosts=[10.77.0.11:1,10.77.0.12:1]' cluster.ssh_port=2222 \
#     cluster.ssh_identity_file=/tmp/ranger-hvd-netns/id_ed25519 cluster.network_interfaces=rhvd0
#
# Details that matter (measured with Horovod 0.28.1): each namespace gets its own /etc/netns/NS/hosts
# mapping this machine's hostname to the namespace's address (Gloo's process-set contexts resolve the
# hostname, which /etc/hosts maps to 127.0.0.1 otherwise); horovodrun must start inside the first
# namespace and be told the interface (rhvd0), or it picks the machine's real interface.
# Environment: HOSTS=N (2..9, default 2); PREFIX (default rhvd: namespaces PREFIX-ns1.., bridge
# PREFIX-br0; at most 8 characters) and NET (default 10.77.0, host i at NET.1i) let several sets of
# hosts coexist; RATE=1gbit limits each link with tc (tbf) at creation.
set -euo pipefail

state=${2:-/tmp/ranger-hvd-netns}
prefix=${PREFIX:-rhvd}
net=${NET:-10.77.0}
count=${HOSTS:-2}
bridge=$prefix-br0

say() { printf '[netns] %s\n' "$*" >&2; }
die() { printf '[netns] error: %s\n' "$*" >&2; exit 2; }

[[ "$count" =~ ^[2-9]$ ]] || die "HOSTS=$count: give a number of hosts from 2 to 9"
[[ "$prefix" =~ ^[a-z][a-z0-9]{0,7}$ ]] || die "PREFIX=$prefix: 1 to 8 lower-case letters or digits"
[[ "$net" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "NET=$net: give the first three parts of an IPv4 address"

need_root() {
  [ "$(id -u)" = 0 ] || die "must run as root"
  command -v ip >/dev/null || die "ip (iproute2) not installed"
  [ -x /usr/sbin/sshd ] || die "/usr/sbin/sshd not installed (openssh-server)"
}

down() {
  # every host this prefix may have created, whatever HOSTS was at creation
  for i in $(seq 1 9); do
    ns=$prefix-ns$i
    if [ -f "$state/sshd-$ns.pid" ]; then
      kill "$(cat "$state/sshd-$ns.pid")" 2>/dev/null || true
      rm -f "$state/sshd-$ns.pid"
    fi
    if ip netns list 2>/dev/null | grep -qw "$ns"; then
      ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
      ip netns del "$ns" 2>/dev/null || true
    fi
    ip link del "$prefix-veth$i" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
  done
  ip link del "$bridge" 2>/dev/null || true
}

set_rate() {  # RATE or none, on every host's interface (egress, so each direction of a link)
  for i in $(seq 1 "$count"); do
    ns=$prefix-ns$i
    ip netns exec "$ns" tc qdisc del dev rhvd0 root 2>/dev/null || true
    if [ "$1" != none ]; then
      ip netns exec "$ns" tc qdisc add dev rhvd0 root tbf rate "$1" burst 1mb latency 50ms
    fi
  done
}

up() {
  down
  mkdir -p "$state" /run/sshd
  chmod 700 "$state"
  [ -f "$state/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$state/id_ed25519"
  [ -f "$state/hostkey" ] || ssh-keygen -q -t ed25519 -N '' -f "$state/hostkey"
  cp "$state/id_ed25519.pub" "$state/authorized_keys"
  chmod 600 "$state/authorized_keys"
  ip link add "$bridge" type bridge
  ip addr add "$net.1/24" dev "$bridge"
  ip link set "$bridge" up
  host=$(hostname)
  names=""
  for i in $(seq 1 "$count"); do names+="$net.1$i $prefix-h$i"$'\n'; done
  for i in $(seq 1 "$count"); do
    ns=$prefix-ns$i
    addr="$net.1$i"
    ip netns add "$ns"
    ip link add "$prefix-veth$i" type veth peer name "$prefix-vp$i"
    ip link set "$prefix-vp$i" netns "$ns"
    ip link set "$prefix-veth$i" master "$bridge" up
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip link set "$prefix-vp$i" name rhvd0
    ip netns exec "$ns" ip addr add "$addr/24" dev rhvd0
    ip netns exec "$ns" ip link set rhvd0 up
    mkdir -p "/etc/netns/$ns"
    printf '127.0.0.1 localhost\n%s %s\n%s' "$addr" "$host" "$names" > "/etc/netns/$ns/hosts"
    ip netns exec "$ns" /usr/sbin/sshd -f /dev/null -o Port=2222 -o ListenAddress="$addr" \
      -o HostKey="$state/hostkey" -o AuthorizedKeysFile="$state/authorized_keys" \
      -o PermitRootLogin=prohibit-password -o PasswordAuthentication=no -o StrictModes=no \
      -o UsePAM=no -o PidFile="$state/sshd-$ns.pid" -o AcceptEnv='*' -o PermitUserEnvironment=no
  done
  if [ -n "${RATE:-}" ]; then set_rate "$RATE"; fi
  # wait for every sshd to accept a login from the first host
  for i in $(seq 1 "$count"); do
    ok=""
    for _ in $(seq 50); do
      if ip netns exec "$prefix-ns1" ssh -o BatchMode=yes -o StrictHostKeyChecking=no \
           -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -p 2222 -i "$state/id_ed25519" "$net.1$i" true \
           2>/dev/null; then
        ok=1; break
      fi
      sleep 0.2
    done
    [ -n "$ok" ] || die "sshd of $prefix-ns$i ($net.1$i) does not accept the key"
  done
  say "up: $(for i in $(seq 1 "$count"); do printf '%s-ns%s=%s.1%s ' "$prefix" "$i" "$net" "$i"; done)sshd on port 2222, key $state/id_ed25519, interface rhvd0"
}

case "${1:-}" in
  up) need_root; up ;;
  down) need_root; down; say "down" ;;
  rate) need_root; [ -n "${2:-}" ] || die "rate needs RATE (e.g. 1gbit) or none"; set_rate "$2"; say "rate: $2" ;;
  exec) need_root; shift; exec ip netns exec "$prefix-ns1" "$@" ;;
  *) sed -n '2,22p' "$0"; exit 2 ;;
esac

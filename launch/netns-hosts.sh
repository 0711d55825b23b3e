#!/usr/bin/env bash
# Two test "hosts" on one machine (needs root): network namespaces on a bridge, each with its own
# address and an sshd on port 2222 that accepts a throw-away key.  Lets a real multi-host horovodrun
# job (ssh, rendezvous, cross-host Gloo/MPI traffic) run without a second machine.
#
#   launch/netns-hosts.sh up [STATE_DIR]     create rhvd-ns1 (10.77.0.11) and rhvd-ns2 (10.77.0.12)
#   launch/netns-hosts.sh down [STATE_DIR]   remove them and stop their sshd
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
# Optional: RATE=1gbit limits each link with tc (tbf).
set -euo pipefail

state=${2:-/tmp/ranger-hvd-netns}
bridge=rhvd-br0
net=10.77.0
names=(rhvd-ns1 rhvd-ns2)

say() { printf '[netns] %s\n' "$*" >&2; }
die() { printf '[netns] error: %s\n' "$*" >&2; exit 2; }

need_root() {
  [ "$(id -u)" = 0 ] || die "must run as root"
  command -v ip >/dev/null || die "ip (iproute2) not installed"
  [ -x /usr/sbin/sshd ] || die "/usr/sbin/sshd not installed (openssh-server)"
}

down() {
  for i in 1 2; do
    ns=${names[$((i-1))]}
    if [ -f "$state/sshd-$ns.pid" ]; then
      kill "$(cat "$state/sshd-$ns.pid")" 2>/dev/null || true
      rm -f "$state/sshd-$ns.pid"
    fi
    ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    ip link del "rhvd-veth$i" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
  done
  ip link del "$bridge" 2>/dev/null || true
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
  for i in 1 2; do
    ns=${names[$((i-1))]}
    addr="$net.1$i"
    ip netns add "$ns"
    ip link add "rhvd-veth$i" type veth peer name "rhvd-vp$i"
    ip link set "rhvd-vp$i" netns "$ns"
    ip link set "rhvd-veth$i" master "$bridge" up
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip link set "rhvd-vp$i" name rhvd0
    ip netns exec "$ns" ip addr add "$addr/24" dev rhvd0
    ip netns exec "$ns" ip link set rhvd0 up
    if [ -n "${RATE:-}" ]; then
      ip netns exec "$ns" tc qdisc add dev rhvd0 root tbf rate "$RATE" burst 1mb latency 50ms
    fi
    mkdir -p "/etc/netns/$ns"
    printf '127.0.0.1 localhost\n%s %s\n%s.11 rhvd-a\n%s.12 rhvd-b\n' "$addr" "$host" "$net" "$net" \
      > "/etc/netns/$ns/hosts"
    ip netns exec "$ns" /usr/sbin/sshd -f /dev/null -o Port=2222 -o ListenAddress="$addr" \
      -o HostKey="$state/hostkey" -o AuthorizedKeysFile="$state/authorized_keys" \
      -o PermitRootLogin=prohibit-password -o PasswordAuthentication=no -o StrictModes=no \
      -o UsePAM=no -o PidFile="$state/sshd-$ns.pid" -o AcceptEnv='*' -o PermitUserEnvironment=no
  done
  # wait for both sshd to accept a login
  for i in 1 2; do
    for _ in $(seq 50); do
      if ip netns exec rhvd-ns1 ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
           -o LogLevel=ERROR -p 2222 -i "$state/id_ed25519" "$net.1$i" true 2>/dev/null; then
        break
      fi
      sleep 0.2
    done
  done
  say "up: rhvd-ns1=$net.11 rhvd-ns2=$net.12, sshd on port 2222, key $state/id_ed25519, interface rhvd0"
}

case "${1:-}" in
  up) need_root; up ;;
  down) need_root; down; say "down" ;;
  exec) need_root; shift; exec ip netns exec rhvd-ns1 "$@" ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac

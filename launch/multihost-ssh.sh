#!/usr/bin/env bash
# Prepares passwordless ssh from this (launching) host to the worker hosts of a ranger-hvd run, and
# checks that every host can run the job.  horovodrun starts remote ranks with
#   ssh -o PasswordAuthentication=no -o StrictHostKeyChecking=no HOST [-p PORT] [-i KEY] 'cd CWD; env ... CMD'
# (mpirun uses plain ssh), so each host needs: this key authorized, the repository and its .venv at the
# same absolute path as here, and a route back to this host.
#
#   launch/multihost-ssh.sh keygen                      make ~/.ssh/ranger_hvd (ed25519) if missing
#   launch/multihost-ssh.sh install HOSTS...            authorize the key on each host (asks for a password
#                                                       once per host) and record the host keys
#   launch/multihost-ssh.sh check HOSTS...              ssh in without a password, check python, repo, horovod
#   launch/multihost-ssh.sh sync HOSTS...               rsync the repository (with .venv, without runs/) to the
#                                                       same path on each host
# HOSTS are host names, host:slots entries, or '-f HOSTFILE' ('host slots=N' lines, comments allowed).
# Environment: SSH_PORT (default 22), SSH_KEY (default ~/.ssh/ranger_hvd), SSH_USER (default: current user).
# Then set cluster.ssh_port / cluster.ssh_identity_file in the config to the same port and key.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
port=${SSH_PORT:-22}
key=${SSH_KEY:-$HOME/.ssh/ranger_hvd}
user_prefix=${SSH_USER:+$SSH_USER@}
python="$root/.venv/bin/python"

say() { printf '[multihost] %s\n' "$*" >&2; }
die() { printf '[multihost] error: %s\n' "$*" >&2; exit 2; }

hosts_from_args() {
  local out=() line
  while [ $# -gt 0 ]; do
    if [ "$1" = "-f" ]; then
      [ $# -ge 2 ] || die "-f needs a hostfile"
      [ -f "$2" ] || die "hostfile not found: $2"
      while IFS= read -r line || [ -n "$line" ]; do
        line=${line%%#*}
        line=$(echo "$line" | awk '{print $1}')
        [ -n "$line" ] && out+=("$line")
      done < "$2"
      shift 2
    else
      out+=("${1%%:*}")
      shift
    fi
  done
  [ ${#out[@]} -gt 0 ] || die "no hosts given"
  printf '%s\n' "${out[@]}"
}

ssh_opts=(-o BatchMode=yes -o ConnectTimeout=10 -p "$port" -i "$key")

cmd=${1:-}
[ -n "$cmd" ] || { sed -n '2,20p' "$0"; exit 2; }
shift

case "$cmd" in
  keygen)
    if [ -f "$key" ]; then say "key exists: $key"; else
      mkdir -p "$(dirname "$key")"; chmod 700 "$(dirname "$key")"
      ssh-keygen -q -t ed25519 -N '' -C "ranger-hvd@$(hostname)" -f "$key"
      say "created $key"
    fi
    ;;
  install)
    [ -f "$key.pub" ] || die "no $key.pub: run '$0 keygen' first"
    mapfile -t hosts < <(hosts_from_args "$@")
    for h in "${hosts[@]}"; do
      say "authorizing $key.pub on $h (port $port)"
      ssh-copy-id -i "$key.pub" -p "$port" "$user_prefix$h"
      ssh-keyscan -p "$port" "$h" 2>/dev/null >> "$HOME/.ssh/known_hosts" || true
    done
    ;;
  check)
    mapfile -t hosts < <(hosts_from_args "$@")
    bad=0
    for h in "${hosts[@]}"; do
      if out=$(ssh "${ssh_opts[@]}" "$user_prefix$h" \
          "cd '$root' && '$python' -c 'import horovod, ranger_hvd; print(horovod.__version__)'" 2>&1); then
        say "$h: ok (horovod $out, $python)"
      else
        say "$h: FAILED: $out"; bad=1
      fi
    done
    exit $bad
    ;;
  sync)
    command -v rsync >/dev/null || die "rsync not installed"
    mapfile -t hosts < <(hosts_from_args "$@")
    for h in "${hosts[@]}"; do
      say "syncing $root to $h:$root"
      rsync -a --delete --exclude runs/ --exclude .git/ -e "ssh ${ssh_opts[*]}" "$root/" "$user_prefix$h:$root/"
    done
    ;;
  *) die "unknown command '$cmd' (keygen, install, check, sync)" ;;
esac

#!/usr/bin/env bash
# udp-encap-tun multi-WAN: one client host, two uplinks, one tunnel per
# uplink, and MPTCP across the two tunnels, so that one TCP connection uses
# both links and survives losing one.
#
#   scripts/multiwan.sh [PATH/TO/udp-encap-tun]     (as root; apt: mptcpize socat)
#
# It builds the hosts as network namespaces and prints every command, so it
# reads as the recipe for a real host (README, "Multi-WAN"):
#
#   client netns                         router netns            server netns
#   tun0 198.19.0.2 - daemon wan0 - c0 === r0 \                  daemon srv - tun0 198.18.0.1/24
#   tun1 198.19.1.2 - daemon wan1 - c1 === r1 -- rw ============ s0 203.0.113.1
#
# Each client daemon is bound to its uplink and runs from its own config
# file (/etc/udp-encap-tun/wan0.toml and wan1.toml on a real host, under
# udp-encap-tun@wan0 and @wan1). The application's MPTCP connection starts
# on tun0 (main routing table) and the kernel adds a subflow from tun1's
# address, which a policy rule routes into tun1. Both links are limited to
# 20 Mbit/s so that one link alone cannot carry the transfer; halfway
# through, c0 goes down and the same connection finishes on tun1.
set -Eeuo pipefail

BIN=${1:-target/release/udp-encap-tun}
[[ -x $BIN ]] || { echo "multiwan FAILED: daemon binary $BIN not found (cargo build --release)" >&2; exit 1; }
BIN=$(readlink -f "$BIN")
[[ $(id -u) == 0 ]] || { echo "multiwan FAILED: needs root" >&2; exit 1; }
for tool in ip nsenter tc socat mptcpize sha256sum; do
    command -v "$tool" >/dev/null || { echo "multiwan FAILED: '$tool' not found (apt-get install mptcpize socat iproute2)" >&2; exit 1; }
done

ID=$$
CLI=uet-mw-cli-$ID RTR=uet-mw-rtr-$ID SRV=uet-mw-srv-$ID
SERVER=203.0.113.1 PORT=12345 APP=5001 MIB=${MIB:-12}
WORK=$(mktemp -d /tmp/uet-multiwan.XXXXXX)
PIDS=()
show() { printf '   $ %s\n' "$*"; }
run() { show "$*"; "$@"; }
step() { printf '\n== %s\n' "$*"; }
in_ns() { local ns=$1; shift; nsenter --net="/run/netns/$ns" -- "$@"; }
fail() { printf '\nmultiwan FAILED: %s\n' "$*" >&2; exit 1; }
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    set +e
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    if (( rc != 0 )); then for f in "$WORK"/*.log; do echo "--- $f" >&2; tail -n 8 "$f" >&2; done; fi
    for ns in "$CLI" "$RTR" "$SRV"; do ip netns del "$ns" 2>/dev/null; done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
status() { in_ns "$1" "$BIN" status --interface "$2"; }
counter() { status "$1" "$2" | awk -v n="$3" '$1 == "counter" && $2 == n { print $3 }'; }
wait_status() { local i; for ((i = 0; i < 100; i++)); do status "$1" "$2" >/dev/null 2>&1 && return 0; sleep 0.1; done; fail "daemon on $2 in $1 did not come up"; }
daemon() { # NS NAME CONFIG
    show "udp-encap-tun --config $3   # in $1"
    nsenter --net="/run/netns/$1" -- "$BIN" --config "$3" >"$WORK/$2.log" 2>&1 &
    PIDS+=($!)
}

step "hosts: a client with two uplinks, a router, a server"
for ns in "$CLI" "$RTR" "$SRV"; do run ip netns add "$ns"; ip -n "$ns" link set lo up; done
run ip -n "$CLI" link add c0 type veth peer name r0 netns "$RTR"
run ip -n "$CLI" link add c1 type veth peer name r1 netns "$RTR"
run ip -n "$RTR" link add rw type veth peer name s0 netns "$SRV"
ip -n "$CLI" addr add 198.51.100.2/30 dev c0; ip -n "$RTR" addr add 198.51.100.1/30 dev r0
ip -n "$CLI" addr add 198.51.100.6/30 dev c1; ip -n "$RTR" addr add 198.51.100.5/30 dev r1
ip -n "$RTR" addr add 203.0.113.254/24 dev rw; ip -n "$SRV" addr add "$SERVER/24" dev s0
for l in "$CLI c0" "$CLI c1" "$RTR r0" "$RTR r1" "$RTR rw" "$SRV s0"; do set -- $l; ip -n "$1" link set "$2" up; done
in_ns "$RTR" sysctl -qw net.ipv4.ip_forward=1
ip -n "$SRV" route add default via 203.0.113.254
run ip -n "$CLI" route add default via 198.51.100.1 dev c0 metric 100
run ip -n "$CLI" route add default via 198.51.100.5 dev c1 metric 200
rate="rate 20mbit burst 32kbit latency 100ms"   # tbf: this kernel may lack netem
for l in "$CLI c0" "$CLI c1" "$RTR r0" "$RTR r1"; do set -- $l; run ip netns exec "$1" tc qdisc add dev "$2" root tbf $rate; done

step "credentials: one server, one client credential for both uplinks"
run "$BIN" credentials server --dir "$WORK/etc" >/dev/null
run "$BIN" credentials client --dir "$WORK/etc" --name alice >/dev/null

step "config files"
cat >"$WORK/srv.toml" <<TOML
interface = "tun0"
tun-address = "198.18.0.1/24"
tun-mtu = 1400
listen-port = $PORT
bind-to-interface = "s0"
cert = "$WORK/etc/server.crt"
key = "$WORK/etc/server.key"
clients = "$WORK/etc/clients.txt"
TOML
for i in 0 1; do
    cat >"$WORK/wan$i.toml" <<TOML
interface = "tun$i"
tun-address = "198.19.$i.2/32"
tun-mtu = 1400
listen-port = 4000$i
bind-to-interface = "c$i"
endpoint-port = $PORT
credential = "$WORK/etc/alice.credential"
TOML
done
echo 'route = ["203.0.113.1/32"]    # the server through tun0, main table' >>"$WORK/wan0.toml"
for f in srv wan0 wan1; do echo "   --- $f.toml"; sed 's/^/   | /' "$WORK/$f.toml"; done

step "daemons: the server, then one client daemon per uplink"
daemon "$SRV" srv "$WORK/srv.toml"; wait_status "$SRV" tun0
daemon "$CLI" wan0 "$WORK/wan0.toml"; wait_status "$CLI" tun0
daemon "$CLI" wan1 "$WORK/wan1.toml"; wait_status "$CLI" tun1

step "routing: tun1's address is routed by its own table"
run ip -n "$CLI" rule add from 198.19.1.2 table 102
run ip -n "$CLI" route add "$SERVER/32" dev tun1 src 198.19.1.2 table 102

step "MPTCP: a subflow from tun1's address"
for ns in "$CLI" "$SRV"; do
    in_ns "$ns" sysctl -qw net.mptcp.enabled=1
    run ip -n "$ns" mptcp limits set subflows 4 add_addr_accepted 4
done
run ip -n "$CLI" mptcp endpoint add 198.19.1.2 dev tun1 subflow

step "one MPTCP connection, $MIB MiB; c0 goes down halfway"
head -c $((MIB << 20)) /dev/urandom >"$WORK/data"
want=$(sha256sum <"$WORK/data" | cut -d' ' -f1)
show "mptcpize run socat -u TCP-LISTEN:$APP,fork CREATE:recv   # server (fork: the listener must stay open for the joins)"
nsenter --net="/run/netns/$SRV" -- mptcpize run socat -u "TCP-LISTEN:$APP,reuseaddr,fork" "CREATE:$WORK/recv" 2>"$WORK/app-srv.log" &
PIDS+=($!)
sleep 0.5
show "mptcpize run socat -u FILE:data TCP:$SERVER:$APP   # client"
nsenter --net="/run/netns/$CLI" -- mptcpize run socat -u "FILE:$WORK/data" "TCP:$SERVER:$APP" 2>"$WORK/app-cli.log" &
app=$!
for ((i = 0; i < 100; i++)); do
    (( $(stat -c %s "$WORK/recv" 2>/dev/null || echo 0) >= (MIB << 19) )) && break
    sleep 0.1
done
[[ -z ${MW_PAUSE:-} ]] || sleep "$MW_PAUSE"   # time to look around
got=$(stat -c %s "$WORK/recv" 2>/dev/null || echo 0)
(( got < (MIB << 20) )) || fail "the transfer finished before the fault"
tx0=$(counter "$CLI" tun0 udp_tx_bytes); tx1=$(counter "$CLI" tun1 udp_tx_bytes)
echo "   $got bytes arrived; so far tunnel 0 sent $tx0 bytes, tunnel 1 $tx1"
run ip -n "$CLI" link set c0 down
wait "$app" || fail "the client application failed after c0 went down"
for ((i = 0; i < 100; i++)); do [[ $(stat -c %s "$WORK/recv") == $((MIB << 20)) ]] && break; sleep 0.1; done
got=$(sha256sum <"$WORK/recv" | cut -d' ' -f1)
[[ $got == "$want" ]] || fail "the data arrived damaged or short (sha256 $got, sent $want)"
tx0b=$(counter "$CLI" tun0 udp_tx_bytes); tx1b=$(counter "$CLI" tun1 udp_tx_bytes)
echo "   after the fault: tunnel 0 sent $tx0b bytes in all, tunnel 1 $tx1b"
(( tx0 > 1000000 && tx1 > 1000000 )) || fail "both tunnels should carry the connection before the fault ($tx0, $tx1 bytes)"
(( tx1b > tx1 + 1000000 )) || fail "tunnel 1 did not carry the rest after c0 went down"
echo
echo "multiwan OK: one MPTCP connection over both tunnels ($tx0 + $tx1 bytes before the fault), $MIB MiB intact after c0 went down"

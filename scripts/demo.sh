#!/usr/bin/env bash
# udp-encap-tun demo: TCP carried as UDP between two network namespaces.
#
#   scripts/demo.sh [PATH/TO/udp-encap-tun]     (as root)
#
# `cargo xtask demo` installs what is missing, builds the daemon and runs this
# script. Every command that builds the topology or starts a program is printed
# as it runs, so the output doubles as a worked example:
#
#   client netns                                  server netns
#   app -> 192.0.2.1:PORT                         app listens on 198.18.0.1
#     |  route 192.0.2.1/32 dev TUN                 ^  sees the client as 198.18.0.x
#   TUN 198.19.0.2/32 --- udp-encap-tun       udp-encap-tun --- TUN 198.18.0.1/24
#                              |                       |
#                  uplink 192.0.2.2/24 ======veth====== uplink 192.0.2.1/24
#                          (TCP segments travel as UDP datagrams, port 12345)
#
# The client authenticates first (TLS 1.3 over TCP to the server's port
# 12345, credentials made by `udp-encap-tun credentials`, docs/auth.md).
# Everything lives in two namespaces named after this script's PID; they, the
# processes started here and the scratch directory are removed on every exit
# path (success, error, Ctrl-C, SIGTERM). Nothing touches the host's own
# interfaces, routes or firewall.
set -Eeuo pipefail

BIN=${1:-target/release/udp-encap-tun}
[[ -x $BIN ]] || { echo "demo FAILED: daemon binary $BIN not found; build it with 'cargo build --release' or run 'cargo xtask demo'" >&2; exit 1; }
BIN=$(readlink -f "$BIN")
[[ $(id -u) == 0 ]] || { echo "demo FAILED: needs root (network namespaces, TUN, XDP): run it with sudo" >&2; exit 1; }
for tool in ip nsenter iperf3 socat tcpdump sha256sum ss; do
    command -v "$tool" >/dev/null || { echo "demo FAILED: '$tool' not found: run 'cargo xtask deps' first" >&2; exit 1; }
done

ID=$$
SRV=uet-demo-srv-$ID            # namespace names: unique per run
CLI=uet-demo-cli-$ID
S_UP=up-s$ID  C_UP=up-c$ID      # interface names are unique too: the daemons'
S_TUN=tun-s$ID C_TUN=tun-c$ID   # pins and status sockets are host-wide
PORT=12345                      # the daemons' UDP port
MIB=20                          # size of the hash-checked transfers
IPERF_SECS=3
WORK=$(mktemp -d /tmp/uet-demo.XXXXXX)
PIDS=()                         # every background process, killed by PID

if [[ -t 1 ]]; then B=$'\e[1m' D=$'\e[2m' R=$'\e[31m' G=$'\e[32m' N=$'\e[0m'; else B= D= R= G= N=; fi
step() { printf '\n%s== %s%s\n' "$B" "$*" "$N"; }
note() { printf '   %s\n' "$*"; }
show() { printf '   %s$ %s%s\n' "$D" "$*" "$N"; }   # print a command
run() { show "$*"; "$@"; }                          # print and run it
# Run a command in a namespace. For background jobs use the arrays, never the
# functions: `function &` forks a subshell, so $! would be the subshell's PID
# and a signal would not reach the program itself.
IN_SRV=(nsenter --net="/run/netns/$SRV" --)
IN_CLI=(nsenter --net="/run/netns/$CLI" --)
in_srv() { "${IN_SRV[@]}" "$@"; }
in_cli() { "${IN_CLI[@]}" "$@"; }
fail() { printf '\n%sdemo FAILED: %s%s\n' "$R" "$*" "$N" >&2; exit 1; }
now() { date +%s.%N; }

# teardown: stop every process started here (by PID: SIGTERM, SIGKILL after
# 3 s), delete both namespaces (with the veth and TUNs in them), remove the
# scratch directory. Idempotent; runs on every exit path.
teardown() {
    local pid i
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for ((i = 0; i < 30; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "   process $pid ignored SIGTERM for 3 s: SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    PIDS=()
    ip netns del "$CLI" 2>/dev/null || true
    ip netns del "$SRV" 2>/dev/null || true
    rm -rf "$WORK"
    return 0
}
# diagnose: after a failure, what the daemons say about themselves.
diagnose() {
    local d ns tun
    for d in "server $SRV $S_TUN" "client $CLI $C_TUN"; do
        set -- $d
        [[ -s $WORK/$1.log || -S /dev/null ]] || continue
        echo "   --- $1 daemon: udp-encap-tun status --interface $3" >&2
        timeout 5 nsenter --net="/run/netns/$2" -- "$BIN" status --interface "$3" 2>&1 | sed 's/^/   | /' >&2
        echo "   --- $1 daemon: last lines of its log" >&2
        tail -n 15 "$WORK/$1.log" 2>/dev/null | sed 's/^/   | /' >&2
    done
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM ERR
    set +e
    case $rc in
        0) ;;
        130 | 143) printf '\n%sdemo interrupted%s: cleaning up\n' "$R" "$N" >&2 ;;
        *) [[ -z ${C_PID:-} ]] || diagnose ;;
    esac
    teardown
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'fail "command failed (exit $?) at scripts/demo.sh:$LINENO: $BASH_COMMAND"' ERR

# wait_until SECONDS DESCRIPTION COMMAND...: poll a condition with a deadline.
wait_until() {
    local secs=$1 what=$2 deadline; shift 2
    deadline=$(( $(date +%s) + secs ))
    until "$@" >/dev/null 2>&1; do
        (( $(date +%s) < deadline )) || return 1
        sleep 0.1
    done
}

# start_daemon NAME NETNS TUN LOG ARGS...: start udp-encap-tun in a namespace
# and wait until its status answers; on failure show its log.
start_daemon() {
    local name=$1 ns=$2 tun=$3 log=$4 pid; shift 4
    show "nsenter --net=/run/netns/$ns -- udp-encap-tun $* &"
    nsenter --net="/run/netns/$ns" -- "$BIN" "$@" >"$log" 2>&1 &
    pid=$!; PIDS+=("$pid"); DAEMON_PID=$pid
    if ! wait_until 15 "$name status" nsenter --net="/run/netns/$ns" -- "$BIN" status --interface "$tun" \
        || ! kill -0 "$pid" 2>/dev/null; then
        if kill -0 "$pid" 2>/dev/null; then
            echo "   the $name daemon runs (pid $pid) but 'udp-encap-tun status --interface $tun' did not answer within 15 s" >&2
        else
            wait "$pid" && rc=0 || rc=$?
            echo "   the $name daemon exited with status $rc" >&2
        fi
        echo "   --- last lines of the $name daemon's log:" >&2
        tail -n 20 "$log" | sed 's/^/   | /' >&2
        fail "the $name daemon did not come up"
    fi
    note "$name daemon running (pid $pid)"
}

# transfer DIRECTION PORT: $MIB MiB of random bytes over one TCP connection
# through the tunnel, sha256 compared on both ends. The client always opens
# the connection (the server side listens on 198.18.0.1).
transfer() {
    local dir=$1 port=$2 src=$WORK/send-$2.bin dst=$WORK/recv-$2.bin lpid t0 t1 h_src h_dst size
    head -c $((MIB * 1024 * 1024)) /dev/urandom >"$src"
    if [[ $dir == up ]]; then
        show "(server) socat -u TCP-LISTEN:$port,bind=198.18.0.1,reuseaddr CREATE:recv.bin &"
        "${IN_SRV[@]}" socat -u "TCP-LISTEN:$port,bind=198.18.0.1,reuseaddr" "CREATE:$dst" &
    else
        show "(server) socat -u OPEN:send.bin TCP-LISTEN:$port,bind=198.18.0.1,reuseaddr &"
        "${IN_SRV[@]}" socat -u "OPEN:$src" "TCP-LISTEN:$port,bind=198.18.0.1,reuseaddr" &
    fi
    lpid=$!; PIDS+=("$lpid")
    wait_until 10 "listener" bash -c "nsenter --net=/run/netns/$SRV -- ss -Htln 'sport = :$port' | grep -q ." \
        || fail "socat did not start listening on 198.18.0.1:$port in the server namespace"
    t0=$(now)
    if [[ $dir == up ]]; then
        show "(client) socat -u OPEN:send.bin TCP:192.0.2.1:$port"
        in_cli timeout 60 socat -u "OPEN:$src" "TCP:192.0.2.1:$port,connect-timeout=10" \
            || fail "client -> server transfer: socat exited with $? (connection through the tunnel failed or stalled)"
    else
        show "(client) socat -u TCP:192.0.2.1:$port CREATE:recv.bin"
        in_cli timeout 60 socat -u "TCP:192.0.2.1:$port,connect-timeout=10" "CREATE:$dst" \
            || fail "server -> client transfer: socat exited with $? (connection through the tunnel failed or stalled)"
    fi
    wait_until 30 "receiver done" bash -c "! kill -0 $lpid" || fail "the server-side socat did not finish"
    t1=$(now)
    h_src=$(sha256sum <"$src" | cut -d' ' -f1)
    h_dst=$(sha256sum <"$dst" | cut -d' ' -f1)
    size=$(stat -c %s "$dst")
    note "sent     $((MIB * 1024 * 1024)) bytes sha256 $h_src"
    note "received $size bytes sha256 $h_dst"
    [[ $h_src == "$h_dst" ]] || fail "$dir transfer: received bytes differ from the bytes sent"
    RATE=$(awk -v b=$((MIB * 1024 * 1024)) -v t="$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')" \
        'BEGIN{printf "%.0f Mbit/s", b*8/t/1e6}')
    note "${G}match${N} ($RATE including connection setup)"
}

# iperf DIRECTION: iperf3 through the tunnel, print its summary, set BITRATE.
iperf() {
    local args=() out
    [[ $1 == down ]] && args=(-R)
    show "(client) iperf3 -c 192.0.2.1 -t $IPERF_SECS ${args[*]}"
    out=$(in_cli timeout $((IPERF_SECS + 20)) iperf3 -c 192.0.2.1 -p 5201 -t "$IPERF_SECS" \
        --connect-timeout 5000 "${args[@]}" 2>&1) || { echo "$out" | tail -n 5 | sed 's/^/   | /' >&2; fail "iperf3 ($1) failed"; }
    echo "$out" | grep -E 'sender|receiver' | sed 's/^/   | /'
    BITRATE=$(echo "$out" | awk '/receiver/ {print $(NF-2), $(NF-1)}' | tail -n 1)
}

step "1. Topology: two namespaces joined by a veth, a TUN device in each"
run ip netns add "$SRV"
run ip netns add "$CLI"
run ip -n "$SRV" link set lo up
run ip -n "$CLI" link set lo up
run ip -n "$SRV" link add "$S_UP" type veth peer name "$C_UP" netns "$CLI"
run ip -n "$SRV" addr add 192.0.2.1/24 dev "$S_UP"
run ip -n "$SRV" link set "$S_UP" up
run ip -n "$CLI" addr add 192.0.2.2/24 dev "$C_UP"
run ip -n "$CLI" link set "$C_UP" up
note "server TUN: the network of the addresses given to clients"
run ip -n "$SRV" tuntap add dev "$S_TUN" mode tun user root
run ip -n "$SRV" addr add 198.18.0.1/24 dev "$S_TUN"
run ip -n "$SRV" link set "$S_TUN" mtu 1400 up
note "client TUN, and the route that sends TCP for the server into it"
run ip -n "$CLI" tuntap add dev "$C_TUN" mode tun user root
run ip -n "$CLI" addr add 198.19.0.2/32 dev "$C_TUN"
run ip -n "$CLI" link set "$C_TUN" mtu 1400 up
run ip -n "$CLI" route add 192.0.2.1/32 dev "$C_TUN" src 198.19.0.2
note "the client's daemon still reaches 192.0.2.1 over the uplink: its socket is bound to $C_UP (SO_BINDTODEVICE)"

step "2. Credentials: a server certificate, one client credential (docs/auth.md)"
CREDS=$WORK/creds
show "udp-encap-tun credentials server --dir $CREDS"
"$BIN" credentials server --dir "$CREDS" | sed 's/^/   | /'
show "udp-encap-tun credentials client --dir $CREDS --name demo-client"
"$BIN" credentials client --dir "$CREDS" --name demo-client | sed 's/^/   | /'
note "the client authenticates over TLS 1.3 to the server's TCP port $PORT before its first datagram;"
note "on a real network, copy demo-client.credential to the client over a channel you trust"

step "3. Start the daemons (server: no --endpoint-port; client: --endpoint-port $PORT)"
start_daemon server "$SRV" "$S_TUN" "$WORK/server.log" \
    --interface "$S_TUN" --listen-port "$PORT" --bind-to-interface "$S_UP" \
    --cert "$CREDS/server.crt" --key "$CREDS/server.key" --clients "$CREDS/clients.txt" \
    --state-dir "$WORK/state"
S_PID=$DAEMON_PID
start_daemon client "$CLI" "$C_TUN" "$WORK/client.log" \
    --interface "$C_TUN" --listen-port "$PORT" --bind-to-interface "$C_UP" --endpoint-port "$PORT" \
    --credential "$CREDS/demo-client.credential" --state-dir "$WORK/state"
C_PID=$DAEMON_PID

step "4. $MIB MiB client -> server over TCP through the tunnel, sha256 checked; tcpdump watching"
show "(server) tcpdump -ni $S_UP -w uplink.pcap &      (client) tcpdump -ni $C_TUN -c 6 -w tun.pcap &"
"${IN_SRV[@]}" tcpdump -ni "$S_UP" -s 128 -B 8192 -U --immediate-mode -Z root -w "$WORK/uplink.pcap" 2>"$WORK/tcpdump-up.err" &
TD_UP=$!; PIDS+=("$TD_UP")
"${IN_CLI[@]}" tcpdump -ni "$C_TUN" -s 128 -c 6 -U --immediate-mode -Z root -w "$WORK/tun.pcap" 2>"$WORK/tcpdump-tun.err" &
TD_TUN=$!; PIDS+=("$TD_TUN")
wait_until 10 "tcpdump" grep -q listening "$WORK/tcpdump-up.err" || fail "tcpdump did not start on $S_UP: $(cat "$WORK/tcpdump-up.err")"
wait_until 10 "tcpdump" grep -q listening "$WORK/tcpdump-tun.err" || fail "tcpdump did not start on $C_TUN: $(cat "$WORK/tcpdump-tun.err")"
transfer up 5001
RATE_UP=$RATE
kill -INT "$TD_UP" "$TD_TUN" 2>/dev/null || true
wait_until 10 "tcpdump flushed" bash -c "! kill -0 $TD_UP" || fail "tcpdump on $S_UP did not stop"

step "5. What travelled: TCP on the client's TUN, UDP on the wire"
note "client TUN ($C_TUN): the kernel's TCP segments, as the application sent them"
show "tcpdump -nr tun.pcap -c 4"
tcpdump -nr "$WORK/tun.pcap" -c 4 2>/dev/null | cut -c 1-150 | sed 's/^/   | /'
note "server uplink ($S_UP): the same segments as UDP payloads, IPv4 header dropped (SYN: 40 bytes = 20 TCP + 20 options)"
show "tcpdump -nr uplink.pcap -c 6 udp"
tcpdump -nr "$WORK/uplink.pcap" -c 6 udp 2>/dev/null | cut -c 1-150 | sed 's/^/   | /'
N_UDP=$(tcpdump -nr "$WORK/uplink.pcap" "udp port $PORT" 2>/dev/null | wc -l)
N_AUTH=$(tcpdump -nr "$WORK/uplink.pcap" "tcp port $PORT" 2>/dev/null | wc -l)
N_TCP=$(tcpdump -nr "$WORK/uplink.pcap" "tcp and not port $PORT" 2>/dev/null | wc -l)
note "captured on the uplink during the transfer: $N_UDP UDP datagrams on port $PORT (the tunnel),"
note "$N_AUTH TCP segments on port $PORT (the client's TLS authentication), $N_TCP other TCP segments"
(( N_UDP > 0 )) || fail "no UDP datagrams on port $PORT seen on the uplink"
(( N_TCP == 0 )) || fail "$N_TCP bare TCP segments (not the authentication) seen on the uplink: traffic bypassed the tunnel"

step "6. $MIB MiB server -> client, sha256 checked"
transfer down 5002
RATE_DOWN=$RATE

step "7. iperf3 through the tunnel, $IPERF_SECS s each way"
show "(server) iperf3 -s -B 198.18.0.1 &"
"${IN_SRV[@]}" iperf3 -s -B 198.18.0.1 -p 5201 >"$WORK/iperf-server.log" 2>&1 &
PIDS+=("$!")
wait_until 10 "iperf3 server" bash -c "nsenter --net=/run/netns/$SRV -- ss -Htln 'sport = :5201' | grep -q ." \
    || fail "iperf3 server did not start: $(cat "$WORK/iperf-server.log")"
iperf up;   BR_UP=$BITRATE
iperf down; BR_DOWN=$BITRATE

# status: the daemon's report, counters at zero folded into one line.
status() {
    local ns=$1 tun=$2
    show "nsenter --net=/run/netns/$ns -- udp-encap-tun status --interface $tun"
    nsenter --net="/run/netns/$ns" -- "$BIN" status --interface "$tun" | awk '
        $1 == "counter" && $3 == "0" { zero = zero " " $2; next }
        { print "   | " $0 }
        END { if (zero != "") print "   | (at zero:" zero ")" }' | fold -s -w 110 | sed '2,$s/^\([^ ]\)/   |   \1/'
}
step "8. The daemons' own view: counters and peers (the server gave the client 198.18.0.x)"
status "$SRV" "$S_TUN"
status "$CLI" "$C_TUN"

step "9. Stop the daemons with SIGTERM, remove the namespaces"
for d in "server $S_PID" "client $C_PID"; do
    set -- $d
    show "kill -TERM $2"
    kill -TERM "$2" 2>/dev/null || true
    wait_until 5 "$1 exit" bash -c "! kill -0 $2" || fail "the $1 daemon (pid $2) did not exit within 5 s of SIGTERM"
    wait "$2" && rc=0 || rc=$?
    note "$1 daemon exited with status $rc"
    (( rc == 0 )) || { tail -n 10 "$WORK/$1.log" | sed 's/^/   | /'; fail "the $1 daemon exited with status $rc on SIGTERM"; }
done
C_PID=   # stopped: nothing left to diagnose
show "ip netns del $CLI; ip netns del $SRV"
teardown
printf '\n%sdemo OK%s: 2 x %d MiB through the tunnel with matching sha256 (up %s, down %s); iperf3 %s up, %s down; uplink carried %d UDP datagrams, no TCP besides the TLS authentication\n' \
    "$G" "$N" "$MIB" "$RATE_UP" "$RATE_DOWN" "$BR_UP" "$BR_DOWN" "$N_UDP"

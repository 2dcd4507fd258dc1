#!/usr/bin/env bash
# proxytap benchmark: proxytap (export OFF and ON) vs direct and peer proxies, loopback only.
# Run from anywhere (`make bench` or `bash bench/run.sh`); see bench/README.md.
# Drives the shared harness ../shared/bench/bench.py (override with BENCH_SHARED).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
# nginx, squid and danted live in sbin, which a bare or non-root PATH lacks
case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" ;; esac
MODE=all                                 # `bench/run.sh intercept`: the interception pass alone
if [ "${1:-}" = intercept ]; then
    MODE=intercept
    shift
fi
if [ $# -gt 0 ]; then
    echo "usage: bench/run.sh [intercept]; set BENCH_* / PB_* variables (see bench/README.md)" >&2
    exit 2
fi

# ------------------------------------------------------------------ settings
SHARED=${BENCH_SHARED:-$ROOT/../shared/bench}
OUT=${BENCH_OUT:-$ROOT/bench/out}
RUNS=${BENCH_RUNS:-3}
WORKLOADS=${BENCH_WORKLOADS:-ABCD}
PEERS=${BENCH_PEERS:-squid,mitm-pass,mitm-socks-pass,dante}
PEER_WORKLOADS=${BENCH_PEER_WORKLOADS:-$WORKLOADS}
# peers measured inside every proxytap round (A/B/C), so drift on a shared machine
# weighs on them and on proxytap alike; their D still comes from the peer suite
ROUND_PEERS=${BENCH_ROUND_PEERS-squid}
EXPORT=${BENCH_EXPORT:-1}                # 0: skip the export-ON pass
EXPORT_WAIT=${BENCH_EXPORT_WAIT:-1}      # 1: also an export-ON pass with --export-overload wait
ADMIN_PORT=${BENCH_ADMIN_PORT:-13190}    # proxytap's admin server (export counters per process)
INTERCEPT=${BENCH_INTERCEPT:-1}          # 1: the interception pass (bench/intercept.py) at the end
HTTP_PORT=${BENCH_HTTP_PORT:-13180}
SOCKS_PORT=${BENCH_SOCKS_PORT:-13181}
VENV=$ROOT/.venv
export PB_VENV=${PB_VENV:-$VENV}         # bench.py runs the mitm peers from $PB_VENV/bin/mitmdump
export PB_WORK=${PB_WORK:-/tmp/peerbench}
D_COUNT=${PB_D_COUNT:-2000}

PROXYTAP=${BENCH_PROXYTAP:-$VENV/bin/proxytap}   # e.g. a clean worktree's .venv/bin/proxytap
VPY=$VENV/bin/python

log() { printf '%s [bench] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
NOTES=()                                 # problems worth a line in the report
note() { log "NOTE: $*"; NOTES+=("$*"); }

# ------------------------------------------------------------------ state for cleanup
PT_PID=""        # running proxytap
RD_PID=""        # running sftap reader
CHILD=""         # running bench.py (backgrounded so signals reach the trap at once)
UP_PID=""        # running `bench.py up PEER` (a round peer)
UP_PEER=""       # that peer's pid (its own process group)
ORIGIN_OURS=0
PEER_PORTS=()
declare -A PEER_PRE=()   # port -> listener pids that existed before the suite
TMP=""

listen_pids() {  # pids listening on 127.0.0.1:PORT (TCP)
    ss -ltnpH "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u || true
}
port_busy() { [ -n "$(ss -ltnH "sport = :$1" 2>/dev/null)" ]; }

STOP_RC=0
stop_pid() {     # stop_pid PID NAME GRACE: SIGTERM, wait GRACE s, then SIGKILL; exit code in STOP_RC
    local pid=$1 name=$2 grace=$3 i rc=0
    if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid" 2>/dev/null || rc=$?
        STOP_RC=$rc
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        note "$name (pid $pid) did not exit within ${grace}s of SIGTERM; sent SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || rc=$?
    STOP_RC=$rc
}

stop_reader() {
    [ -n "$RD_PID" ] || return 0
    stop_pid "$RD_PID" "sftap reader" 5
    RD_PID=""
}

PT_LOG=""
PT_LABEL=""
stop_proxytap() {
    [ -n "$PT_PID" ] || return 0
    local rc
    stop_pid "$PT_PID" "proxytap ($PT_LABEL)" 15
    rc=$STOP_RC
    # 0 = clean exit after SIGTERM; 143 = killed by SIGTERM before its handler was installed
    if [ "$rc" != 0 ] && [ "$rc" != 143 ]; then
        note "proxytap ($PT_LABEL) exited with status $rc after SIGTERM (log: ${PT_LOG#"$ROOT"/})"
    fi
    PT_PID=""
}

stop_up() {      # stop a round peer's process group (as bench.py does), then its `bench.py up`
    [ -n "$UP_PID" ] || return 0
    local i
    if [ -n "$UP_PEER" ]; then
        kill -TERM -- "-$UP_PEER" 2>/dev/null || true
        for ((i = 0; i < 80; i++)); do
            kill -0 "$UP_PEER" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL -- "-$UP_PEER" 2>/dev/null || true
    fi
    for ((i = 0; i < 100; i++)); do  # it exits once its peer has
        kill -0 "$UP_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -TERM "$UP_PID" 2>/dev/null || true
    wait "$UP_PID" 2>/dev/null || true
    UP_PID=""
    UP_PEER=""
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [ -n "$CHILD" ] && kill -0 "$CHILD" 2>/dev/null; then
        log "stopping bench.py (pid $CHILD)"
        stop_pid "$CHILD" "bench.py" 20   # bench.py stops its peers on SIGTERM
    fi
    stop_reader
    stop_proxytap
    stop_up
    # safety net: a peer that bench.py started (own session, cwd $PB_WORK) and left behind
    local port pid
    for port in "${PEER_PORTS[@]}"; do
        for pid in $(listen_pids "$port"); do
            case " ${PEER_PRE[$port]:-} " in *" $pid "*) continue ;; esac
            if [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$PB_WORK" ]; then
                local pgid
                pgid=$(ps -o pgid= -p "$pid" | tr -d ' ')
                log "peer on port $port (pid $pid) still running; stopping its process group $pgid"
                kill -TERM -- "-$pgid" 2>/dev/null
                sleep 1
                kill -KILL -- "-$pgid" 2>/dev/null
            fi
        done
    done
    if [ "$ORIGIN_OURS" = 1 ]; then
        log "origin down"
        "${BENCH_PY[@]}" origin down
    fi
    if [ -n "$TMP" ]; then rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bg_wait() {      # run a command in the background and wait for it (signals interrupt the wait)
    "$@" &
    CHILD=$!
    local rc=0
    wait "$CHILD" || rc=$?
    CHILD=""
    return "$rc"
}

# ------------------------------------------------------------------ 1. tools
[ -f "$SHARED/bench.py" ] || die "shared harness not found: $SHARED/bench.py (set BENCH_SHARED)"
SHARED=$(cd "$SHARED" && pwd)

PY3=${BENCH_PYTHON:-python3}
if ! "$PY3" -c 'import sys; sys.exit(sys.version_info < (3, 8))' 2>/dev/null; then
    PY3=$VPY
fi
BENCH_PY=("$PY3" "$SHARED/bench.py")

pkgs=()
need() { command -v "$1" >/dev/null 2>&1 || pkgs+=("$2"); }
need nginx nginx-light
need wrk wrk
need gcc gcc
need ss iproute2
need ps procps
case ",$PEERS," in *,none,*) PEERS="" ;; esac
[ "$MODE" = intercept ] && PEERS=""      # the interception pass runs mitmdump itself
IFS=, read -r -a PEER_LIST <<<"$PEERS"
for p in "${PEER_LIST[@]}"; do
    case $p in
        squid) need squid squid ;;
        dante) need danted dante-server ;;
        tinyproxy) need tinyproxy tinyproxy ;;
        microsocks) need microsocks microsocks ;;
    esac
done
if [ ${#pkgs[@]} -gt 0 ]; then
    mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)
    log "installing: ${pkgs[*]}"
    SUDO=()
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || die "need root (or sudo) to apt-get install ${pkgs[*]}"
        SUDO=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${pkgs[@]}"
fi

if [ ! -x "$VPY" ]; then
    log "project venv missing; running make .venv/.installed"
    make .venv/.installed
fi
[ -x "$PROXYTAP" ] || die "proxytap not found: $PROXYTAP"
for p in "${PEER_LIST[@]}"; do
    case $p in
        mitm-*) [ -x "$PB_VENV/bin/mitmdump" ] || die "peer $p needs $PB_VENV/bin/mitmdump" ;;
        proxy.py | pproxy-*) log "peer $p needs its package in PB_VENV=$PB_VENV (see $SHARED/README.md)" ;;
    esac
done

# ------------------------------------------------------------------ interception pass
# bench/intercept.py: its own HTTPS origin (nginx), proxytap and mitmdump decrypting it one after
# the other; bounded (about 2.5 min); it stops what it starts on SIGTERM
intercept_pass() {
    log "== interception: proxytap vs mitmdump (bench/intercept.py)"
    bg_wait "$VPY" "$ROOT/bench/intercept.py" --out "$OUT" --proxytap "$PROXYTAP" \
        --mitmdump "$PB_VENV/bin/mitmdump"
}
if [ "$MODE" = intercept ]; then
    mkdir -p "$OUT"
    rc=0
    intercept_pass || rc=$?
    exit "$rc"
fi

for port in "$HTTP_PORT" "$SOCKS_PORT"; do
    port_busy "$port" && die "port $port is already in use (set BENCH_HTTP_PORT / BENCH_SOCKS_PORT)"
done

# ------------------------------------------------------------------ output dir
mkdir -p "$OUT"
if compgen -G "$OUT/*.json" >/dev/null || [ -e "$OUT/report.md" ]; then
    prev="$OUT/archive/$(date -r "$OUT/report.md" +%Y%m%d-%H%M%S 2>/dev/null || date +%Y%m%d-%H%M%S)-prev"
    mkdir -p "$prev"
    find "$OUT" -maxdepth 1 -type f -exec mv -t "$prev" {} +
    log "previous results moved to ${prev#"$ROOT"/}"
fi
TMP=$(mktemp -d /tmp/proxytap-bench.XXXXXX)
T_START=$(date +%s)

# ------------------------------------------------------------------ proxytap settings
# Loopback destinations, every CONNECT port, no connection caps (see the file), minus
# any key this proxytap does not know yet.
CONF_ARGS=()
CONF_NOTE="proxytap defaults"
if fit=$("$VPY" "$ROOT/bench/config_fit.py" "$ROOT/bench/proxytap-bench.toml" \
    "$OUT/proxytap-bench.toml" "$PROXYTAP" 2>&1); then
    CONF_ARGS=(--config "$OUT/proxytap-bench.toml")
    CONF_NOTE="bench/proxytap-bench.toml (as accepted: bench/out/proxytap-bench.toml)"
    while read -r word key; do
        if [ "$word" = dropped ]; then
            note "this proxytap does not know the setting '$key' from bench/proxytap-bench.toml; ran without it"
        fi
    done <<<"$fit"
else
    note "bench/proxytap-bench.toml not accepted by proxytap ($(echo "$fit" | tail -1)); ran with proxytap defaults"
fi

# ------------------------------------------------------------------ origin
if port_busy 11080 && port_busy 11001 && port_busy 11002; then
    log "origin already running (not ours): leaving it up afterwards"
else
    ORIGIN_OURS=1
fi
mkdir -p "$PB_WORK"
"${BENCH_PY[@]}" origin up || die "origin up failed"

# ------------------------------------------------------------------ proxytap
# start_proxytap LABEL [extra args]: fresh process, waits until both listeners are up
start_proxytap() {
    local label=$1 i
    shift
    PT_LABEL=$label
    PT_LOG="$OUT/proxytap-$label.log"
    "$PROXYTAP" run --http "127.0.0.1:$HTTP_PORT" --socks "127.0.0.1:$SOCKS_PORT" \
        --admin "127.0.0.1:$ADMIN_PORT" \
        --log-level warning "${CONF_ARGS[@]}" "$@" >"$PT_LOG" 2>&1 </dev/null &
    PT_PID=$!
    for ((i = 0; i < 300; i++)); do
        if ! kill -0 "$PT_PID" 2>/dev/null; then
            local rc=0
            wait "$PT_PID" || rc=$?
            PT_PID=""
            log "proxytap ($label) exited with status $rc during start-up:"
            sed 's/^/    /' "$PT_LOG" | tail -20 >&2
            return 1
        fi
        if listen_pids "$HTTP_PORT" | grep -qx "$PT_PID" &&
            listen_pids "$SOCKS_PORT" | grep -qx "$PT_PID"; then
            return 0
        fi
        sleep 0.1
    done
    log "proxytap ($label) not listening after 30 s"
    stop_proxytap
    return 1
}

# start_reader LABEL HOME: drains every flow socket; fails if no socket shows up
start_reader() {
    local label=$1 home=$2 rout="$TMP/reader-$1.out" i
    "$VPY" "$ROOT/bench/sftap_drain.py" "$home" --ready-timeout 15 --max-secs 7200 \
        --stats "$OUT/reader-$label.json" >"$rout" 2>&1 &
    RD_PID=$!
    for ((i = 0; i < 200; i++)); do
        if grep -q '^READY' "$rout"; then
            log "reader ($label): $(head -1 "$rout") sockets under $home"
            return 0
        fi
        kill -0 "$RD_PID" 2>/dev/null || break
        sleep 0.1
    done
    log "reader ($label) failed: $(tr '\n' ' ' <"$rout")"
    stop_reader
    return 1
}

strip_d() { local w=${1//D/}; echo "$w"; }
http_wl=$WORKLOADS
socks_wl=${WORKLOADS//A/}
JSONS=()
READERS=()
KA_VERDICT="not run"

PROBES=()
probe() {        # probe WHEN LABEL: 3 keep-alive plain-HTTP requests, as wrk sends them
    local res
    res=$("$PY3" "$ROOT/bench/http_probe.py" "$HTTP_PORT" 2>&1 | tail -1) || true
    log "http probe ($2, $1): $res"
    PROBES+=("$2, $1: $res")
    case $res in ok:*) ;; *) note "plain-HTTP probe ($2, $1) failed: $res" ;; esac
}

# bench_one NAME KIND PORT WORKLOADS RUNS OUTFILE
bench_one() {
    local name=$1 kind=$2 port=$3 wl=$4 runs=$5 out=$6
    [ -n "$wl" ] || return 0
    log "bench $name ($kind 127.0.0.1:$port) workloads $wl, $runs run(s)"
    if bg_wait "${BENCH_PY[@]}" run --proxy "127.0.0.1:$port" --kind "$kind" --pid "$PT_PID" \
        --name "$name" --workloads "$wl" --runs "$runs" --out "$out"; then
        JSONS+=("$out")
    else
        note "bench.py run for $name ($wl) failed with status $?"
        if [ -f "$out" ]; then JSONS+=("$out"); fi
    fi
    kill -0 "$PT_PID" 2>/dev/null || note "proxytap ($PT_LABEL) died during $name $wl (log: ${PT_LOG#"$ROOT"/})"
}

# pass_setup SUFFIX EXPORT(0|1|2): what the next start_with starts (export OFF; ON + reader,
# overload drop; ON + reader, overload wait)
P_SFX=""
P_EXP=0
pass_setup() { P_SFX=$1; P_EXP=$2; }

start_with() {  # start_with LABEL: proxytap (+ reader when export is on)
    local label=$1 home="$TMP/sftap-home" args=()
    if [ "$P_EXP" != 0 ]; then
        rm -rf "$home"
        args=(--sftap-home "$home")
        [ "$P_EXP" = 2 ] && args+=(--export-overload wait)
    fi
    start_proxytap "$label" "${args[@]}" || return 1
    if [ "$P_EXP" != 0 ]; then
        if ! start_reader "$label" "$home"; then
            stop_proxytap
            return 1
        fi
        READERS+=("$OUT/reader-$label.json")
    fi
}
# export_counters LABEL: what proxytap says it exported and dropped (its /metrics), kept
# beside the reader's own count: the check that the reader got 100%
export_counters() {
    curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" 2>/dev/null |
        grep -E '^proxytap_export_(sent_bytes|dropped_bytes|dropped_events|wait_seconds|partial_sends)_total' \
            >"$OUT/export-$1.prom" || true
}
stop_both() {
    [ "$P_EXP" != 0 ] && [ -n "${PT_LABEL:-}" ] && export_counters "$PT_LABEL"
    stop_reader
    stop_proxytap
}
on_off() { [ "$P_EXP" != 0 ] && echo ON || echo OFF; }

# abc_round R: A/B/C for both kinds on one fresh process, one run (round R)
abc_round() {
    local r=$1 abc_http abc_socks
    abc_http=$(strip_d "$http_wl")
    abc_socks=$(strip_d "$socks_wl")
    [ -n "$abc_http$abc_socks" ] || return 0
    start_with "abc$P_SFX-r$r" || return 1
    if [ "$r" = 1 ] && [ "$P_EXP" = 0 ] && [[ $WORKLOADS == *A* ]]; then
        KA_VERDICT=$("$PY3" "$SHARED/ka_check.py" "$HTTP_PORT" 2>&1 | tail -1) || true
        log "ka_check: $KA_VERDICT"
    fi
    if [ "$r" = 1 ] && [[ $abc_http == *A* ]]; then
        probe "before A" "export $(on_off)"
    fi
    bench_one "proxytap-http$P_SFX" http "$HTTP_PORT" "$abc_http" 1 "$OUT/proxytap-http$P_SFX-r$r.json"
    if [ "$r" = 1 ] && [[ $abc_http == *A* ]]; then
        probe "after A/B/C" "export $(on_off)"
    fi
    bench_one "proxytap-socks5$P_SFX" socks5 "$SOCKS_PORT" "$abc_socks" 1 "$OUT/proxytap-socks5$P_SFX-r$r.json"
    stop_both
}

# d_pass: D on a fresh process per kind and run
d_pass() {
    [[ $WORKLOADS == *D* ]] || return 0
    local r kind port
    for ((r = 1; r <= RUNS; r++)); do
        for kind in http socks5; do
            port=$HTTP_PORT
            [ "$kind" = socks5 ] && port=$SOCKS_PORT
            start_with "d-$kind-r$r$P_SFX" || return 1
            sleep 1
            bench_one "proxytap-$kind$P_SFX" "$kind" "$port" D 1 "$OUT/proxytap-$kind$P_SFX-D-r$r.json"
            stop_both
        done
    done
}

# every selected peer's kind and port (bench.py's table), and which of them join the rounds
declare -A PEER_KIND=() PEER_PORT=() IN_ROUNDS=()
if [ ${#PEER_LIST[@]} -gt 0 ]; then
    while read -r name kind addr _; do
        for p in "${PEER_LIST[@]}"; do
            if [ "$p" = "$name" ]; then
                port=${addr##*:}
                PEER_KIND[$name]=$kind
                PEER_PORT[$name]=$port
                PEER_PORTS+=("$port")
                PEER_PRE[$port]="$(listen_pids "$port" | tr '\n' ' ')"
            fi
        done
    done < <("${BENCH_PY[@]}" peers)
    IFS=, read -r -a round_list <<<"$ROUND_PEERS"
    for p in "${round_list[@]}"; do
        [ -n "$p" ] && [ -n "${PEER_PORT[$p]:-}" ] && IN_ROUNDS[$p]=1
    done
fi

# peer_round NAME R: start the peer (`bench.py up`), A/B/C one run, stop it
peer_round() {
    local name=$1 r=$2 wl pid i upout="$TMP/up-$1.out"
    wl=$(strip_d "$PEER_WORKLOADS")
    [ "${PEER_KIND[$name]}" = socks5 ] && wl=${wl//A/}
    [ -n "$wl" ] || return 0
    PYTHONUNBUFFERED=1 "${BENCH_PY[@]}" up "$name" >"$upout" 2>&1 &
    UP_PID=$!
    for ((i = 0; i < 400; i++)); do
        grep -qE '^(started|failed)' "$upout" 2>/dev/null && break
        kill -0 "$UP_PID" 2>/dev/null || break
        sleep 0.1
    done
    pid=$(awk '/^started/ {print $2}' "$upout")
    UP_PEER=$pid
    if [ -z "$pid" ]; then
        note "peer $name did not start for round $r (see $upout, $PB_WORK/peer-$name.log)"
        stop_up
        return 0
    fi
    log "bench $name (${PEER_KIND[$name]} 127.0.0.1:${PEER_PORT[$name]}, pid $pid) workloads $wl, round $r"
    if bg_wait "${BENCH_PY[@]}" run --proxy "127.0.0.1:${PEER_PORT[$name]}" --kind "${PEER_KIND[$name]}" \
        --pid "$pid" --name "$name" --workloads "$wl" --runs 1 --out "$OUT/$name-r$r.json"; then
        JSONS+=("$OUT/$name-r$r.json")
    else
        note "bench.py run for $name (round $r) failed with status $?"
        if [ -f "$OUT/$name-r$r.json" ]; then JSONS+=("$OUT/$name-r$r.json"); fi
    fi
    stop_up
}

# A/B/C: export OFF and ON alternate round by round, so a machine that gets busier or
# quieter during the benchmark weighs on both alike (the export cost is their ratio).
EXPORT_OK=$EXPORT
for ((round = 1; round <= RUNS; round++)); do
    log "== proxytap A/B/C round $round of $RUNS: flow export OFF"
    pass_setup "" 0
    abc_round "$round" || note "proxytap export-OFF round $round aborted: proxytap did not start (see bench/out/proxytap-*.log)"
    if [ "$EXPORT_OK" = 1 ]; then
        log "== proxytap A/B/C round $round of $RUNS: flow export ON (--sftap-home + reader on every flow socket)"
        pass_setup "-export" 1
        if ! abc_round "$round"; then
            stop_reader
            stop_proxytap
            EXPORT_OK=0
            note "export ON skipped: proxytap with --sftap-home did not start or served no flow sockets; results are export OFF only"
        fi
    fi
    if [ "$EXPORT_OK" = 1 ] && [ "$EXPORT_WAIT" = 1 ]; then
        log "== proxytap A/B/C round $round of $RUNS: flow export ON, overload wait (lossless)"
        pass_setup "-wait" 2
        abc_round "$round" || note "proxytap export-wait round $round aborted (see bench/out/proxytap-*.log)"
    fi
    for p in "${!IN_ROUNDS[@]}"; do
        peer_round "$p" "$round"
    done
done
log "== proxytap D, flow export OFF"
pass_setup "" 0
d_pass || note "proxytap export-OFF D aborted: proxytap did not start (see bench/out/proxytap-*.log)"
if [ "$EXPORT_OK" = 1 ]; then
    log "== proxytap D, flow export ON"
    pass_setup "-export" 1
    if ! d_pass; then
        stop_reader
        stop_proxytap
        note "export ON D skipped: proxytap with --sftap-home did not start"
    fi
fi

# ------------------------------------------------------------------ peers (the rest)
# round peers ran A/B/C inside the proxytap rounds; the suite gives them D only
if [ ${#PEER_LIST[@]} -gt 0 ]; then
    suite() {  # suite PEERS WORKLOADS OUTFILE
        log "== peers: $1, workloads $2, $RUNS run(s)"
        if bg_wait "${BENCH_PY[@]}" suite --peers "$1" --workloads "$2" --runs "$RUNS" --out "$3"; then
            :
        else
            note "bench.py suite ($1) failed with status $?"
        fi
        if [ -f "$3" ]; then JSONS+=("$3"); fi
        failed=$("$PY3" -c 'import json,sys; print(",".join(json.load(open(sys.argv[1]))["meta"].get("failed_to_start", [])))' "$3" 2>/dev/null || true)
        if [ -n "$failed" ]; then note "peers that failed to start: $failed (logs: $PB_WORK/peer-*.log)"; fi
    }
    rest=()
    for p in "${PEER_LIST[@]}"; do
        [ -n "${IN_ROUNDS[$p]:-}" ] || rest+=("$p")
    done
    if [ ${#rest[@]} -gt 0 ]; then
        suite "$(IFS=,; echo "${rest[*]}")" "$PEER_WORKLOADS" "$OUT/peers.json"
    fi
    if [ ${#IN_ROUNDS[@]} -gt 0 ] && [[ $PEER_WORKLOADS == *D* ]]; then
        suite "$(IFS=,; echo "${!IN_ROUNDS[*]}")" D "$OUT/peers-d.json"
    fi
fi

if [ "$INTERCEPT" = 1 ]; then
    intercept_pass || note "bench/intercept.py exited with status $? (see ${OUT#"$ROOT"/}/intercept.md)"
fi

# ------------------------------------------------------------------ report
[ ${#JSONS[@]} -gt 0 ] || die "no results written"
"$PY3" "$ROOT/bench/summarize.py" merge "$OUT/all.json" "${JSONS[@]}"
# proxytap log lines above warning level that are not the expected start/stop chatter
mapfile -t PT_ERRS < <(grep -hE 'Traceback|ERROR|CRITICAL|Exception|Error:' "$OUT"/proxytap-*.log 2>/dev/null |
    sort | uniq -c | sort -rn | head -20)
WARN_COUNT=$(cat "$OUT"/proxytap-*.log 2>/dev/null | grep -c WARNING || true)
ELAPSED=$(($(date +%s) - T_START))
READER_ARGS=()
for r in "${READERS[@]}"; do
    if [ -f "$r" ]; then READER_ARGS+=(--reader "$r"); fi
done
{
    echo "# proxytap benchmark $(date '+%Y-%m-%d %H:%M:%S')"
    echo
    echo "Host: $(uname -r), $(nproc) CPUs. proxytap $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?')," \
        "runs=$RUNS, workloads=$WORKLOADS, peers=${PEERS:-none}, wall time ${ELAPSED}s."
    dirty=$(git -C "$ROOT" status --porcelain -- proxytap 2>/dev/null | wc -l)
    if [ "$dirty" -gt 0 ]; then
        echo "Working tree: $dirty uncommitted or untracked file(s) under proxytap/ were part of this run" \
            "(note: proxytap imports some modules lazily, so edits made during the run can be picked up)."
    fi
    echo "proxytap settings: $CONF_NOTE."
    echo "Bounds: PB_A_SECS=${PB_A_SECS:-10} PB_B_BYTES=${PB_B_BYTES:-1073741824} PB_C_SECS=${PB_C_SECS:-10} PB_D_COUNT=$D_COUNT."
    echo
    echo "Keep-alive routing check (ka_check.py, export OFF): $KA_VERDICT"
    echo
    if [ ${#PROBES[@]} -gt 0 ]; then
        echo "Plain-HTTP keep-alive probe (bench/http_probe.py, 3 requests on one connection):"
        echo
        for p in "${PROBES[@]}"; do echo "* $p"; done
        echo
    fi
    "$PY3" "$ROOT/bench/summarize.py" summary "$OUT/all.json" --d-count "$D_COUNT" \
        $(for c in "$OUT"/export-*.prom; do [ -f "$c" ] && printf -- '--counters %s ' "$c"; done) \
        "${READER_ARGS[@]}" || echo "(summarize.py failed)"
    if [ "$INTERCEPT" = 1 ] && [ -f "$OUT/intercept.md" ]; then
        echo
        cat "$OUT/intercept.md"
    fi
    echo
    echo "## proxytap problems seen"
    echo
    if [ ${#NOTES[@]} -eq 0 ] && [ ${#PT_ERRS[@]} -eq 0 ]; then
        echo "None (no start failures, crashes, hangs, or error lines in bench/out/proxytap-*.log)."
    fi
    for n in "${NOTES[@]}"; do echo "* $n"; done
    if [ ${#PT_ERRS[@]} -gt 0 ]; then
        echo "* error lines in bench/out/proxytap-*.log (count, line):"
        echo
        echo '```'
        printf '%s\n' "${PT_ERRS[@]}" | cut -c1-300
        echo '```'
    fi
    echo
    echo "proxytap WARNING lines across all its logs: $WARN_COUNT"
    echo
    echo "# bench.py report (all JSON of this run, merged into all.json)"
    echo
    "${BENCH_PY[@]}" report "$OUT/all.json" || echo "(bench.py report failed)"
} >"$OUT/report.md"
cat "$OUT/report.md"
log "report: ${OUT#"$ROOT"/}/report.md (wall time ${ELAPSED}s)"

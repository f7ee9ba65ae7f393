#!/usr/bin/env bash
# Three tether hosts in their own network namespaces, 30,000 load-tool
# clients spread over them by rendezvous hashing, then one host killed.
# Prints one line per check and a final "N passed, M failed"; exits 0 only
# if every check passed, 77 if this machine cannot make namespaces (needs
# root and iproute2). About 20 s on two cores after the build.
#
#   tools/cluster.sh                    # builds the release binaries first
#   TETHER_BIN_DIR=target/release tools/cluster.sh   # use these binaries
#   CLIENTS=30000 TTL=3s INTERVAL=1s tools/cluster.sh
#
#              namespace tc<pid>-c (the clients)
#         10.77.1.1      10.77.2.1      10.77.3.1
#             |veth          |veth          |veth
#         10.77.1.2      10.77.2.2      10.77.3.2
#        tc<pid>-h1     tc<pid>-h2     tc<pid>-h3   (tether serve, keyed)
#
# Every address lives inside namespaces this script creates and removes
# (also when interrupted); nothing is sent anywhere else.
set -u
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-30000}
TTL=${TTL:-3s}
INTERVAL=${INTERVAL:-1s}
case "$TTL" in
  *ms) TTL_MS=${TTL%ms} ;;
  *s) TTL_MS=$((${TTL%s} * 1000)) ;;
  *) echo "TTL: write it as 3s or 3000ms"; exit 2 ;;
esac
PORT=7900
NS="tc$$"
WORK=$(mktemp -d)
PIDS=()
CREATED=() # only the namespaces this run made are removed

cleanup() {
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill -9 "$pid" 2>/dev/null; done
  for ns in ${CREATED[@]+"${CREATED[@]}"}; do ip netns del "$ns" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A namespace of this name that exists already is someone else's: never
# reused, never removed.
make_ns() {
  if ip netns list | awk '{print $1}' | grep -qxF "$1"; then
    echo "a network namespace named $1 exists already; not touching it"
    exit 1
  fi
  ip netns add "$1" 2>"$WORK/netns.err" || return 1
  CREATED+=("$1")
}

if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null 2>&1; then
  echo "skipped: needs root and iproute2 (ip netns) to make the hosts' namespaces"
  exit 77
fi
if ! make_ns "$NS-c"; then
  echo "skipped: cannot create a network namespace here: $(cat "$WORK/netns.err")"
  exit 77
fi

if [ -z "${TETHER_BIN_DIR:-}" ]; then
  echo "building the release binaries..."
  cargo build --release --quiet --bin tether --bin tether-load || exit 1
  TETHER_BIN_DIR=target/release
fi
BIN=$(cd "$TETHER_BIN_DIR" && pwd)

ip -n "$NS-c" link set lo up
SERVERS=()
for k in 1 2 3; do
  h="$NS-h$k"
  if ! make_ns "$h" ||
    ! ip -n "$NS-c" link add "h$k" type veth peer name eth0 netns "$h" ||
    ! ip -n "$NS-c" addr add "10.77.$k.1/24" dev "h$k" ||
    ! ip -n "$NS-c" link set "h$k" up ||
    ! ip -n "$h" addr add "10.77.$k.2/24" dev eth0 ||
    ! ip -n "$h" link set eth0 up ||
    ! ip -n "$h" link set lo up; then
    echo "could not set up host $k's namespace"
    exit 1
  fi
  SERVERS+=("10.77.$k.2:$PORT")
done

# The servers listen beyond loopback, so they are keyed.
head -c 32 /dev/urandom >"$WORK/key"
chmod 600 "$WORK/key"
for k in 1 2 3; do
  ip netns exec "$NS-h$k" "$BIN/tether" serve --listen "10.77.$k.2:$PORT" \
    --key-file "$WORK/key" >"$WORK/h$k.out" 2>"$WORK/h$k.err" &
  PIDS+=($!)
  disown # killed on purpose: no "Killed" notice from the shell
done
for k in 1 2 3; do
  for _ in $(seq 100); do
    grep -q '^listening on' "$WORK/h$k.out" 2>/dev/null && break
    sleep 0.1
  done
  if ! grep -q '^listening on' "$WORK/h$k.out"; then
    echo "host $k did not start:"
    cat "$WORK/h$k.err"
    exit 1
  fi
done

KILLED=2
LIST=$(IFS=,; echo "${SERVERS[*]}")
echo "$CLIENTS clients over $LIST (TTL $TTL, interval $INTERVAL); killing host $KILLED (${SERVERS[$((KILLED - 1))]}) 5 s in"
ip netns exec "$NS-c" "$BIN/tether-load" --servers "$LIST" --allow-remote \
  --key-file "$WORK/key" --clients "$CLIENTS" --ttl "$TTL" --interval "$INTERVAL" \
  --duration 15s --kill-at 5s --pid "${PIDS[$((KILLED - 1))]}" --sockets 16 --json \
  >"$WORK/load.json" 2>"$WORK/load.err"
status=$?
cat "$WORK/load.err" >&2
if [ $status != 0 ] || [ ! -s "$WORK/load.json" ]; then
  echo "the load tool failed (exit $status)"
  echo "0 passed, 1 failed"
  exit 1
fi

python3 - "$WORK/load.json" "${SERVERS[$((KILLED - 1))]}" "$CLIENTS" "$TTL_MS" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
killed, clients, ttl_ms = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
hosts = {h["server"]: h for h in report["hosts"]}
gone = hosts[killed]
survivors = [h for s, h in hosts.items() if s != killed]
results = []
def check(ok, text):
    results.append(ok)
    print(("ok     " if ok else "FAILED ") + text)
before = sum(h["before"] for h in hosts.values())
check(before == clients, f"every client in a session before the kill: {before} of {clients}")
third = clients / 3
spread = [h["before"] for h in hosts.values()]
check(all(abs(n - third) <= 0.05 * third for n in spread),
      f"the hosts hold a third each, within 5%: {spread}")
check(gone["moved_out"] == gone["before"] and gone["after"] == 0,
      f"every client of the killed host left it: {gone['moved_out']} of {gone['before']}")
check(report["live_at_end"] == clients,
      f"every client in a session at the end: {report['live_at_end']} of {clients}")
k = report["kill_to_session_ms"]
check(k["count"] == gone["before"] and k["max"] <= 2 * ttl_ms,
      f"each in a session on a survivor within 2 x TTL of the kill: {k['count']} clients, "
      f"p50 {k['p50']:.0f} ms, max {k['max']:.0f} ms (limit {2 * ttl_ms} ms)")
moved_elsewhere = sum(h["moved_out"] for h in survivors)
check(moved_elsewhere == 0, f"no client of a survivor moved: {moved_elsewhere}")
check(report["false_expiries"] == 0, f"false expiries: {report['false_expiries']}")
gains = [h["after"] - h["before"] for h in survivors]
lost = gone["before"]
check(all(0.45 * lost <= g <= 0.55 * lost for g in gains) and sum(gains) == lost,
      f"each survivor gained about half of the {lost}: {gains}")
check(report["misplaced"] == 0,
      f"every client on its rendezvous choice among the survivors: {report['misplaced']} elsewhere")
passed = sum(results)
print(f"{passed} passed, {len(results) - passed} failed")
sys.exit(0 if passed == len(results) else 1)
EOF

#!/usr/bin/env bash
# make demo: run a 4-rank job on the DSM, checkpoint it while it runs, kill
# it with SIGKILL, restart it from the checkpoint, and show that the result
# is what an uninterrupted native run computes.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${MOME_BIN_DIR:-$PWD/target/release}
APPS=${MOME_APPS_DIR:-$PWD/test-apps/build}
export MOME_HOME=${MOME_HOME:-$(mktemp -d /tmp/mome-demo.XXXXXX)}
work=$(mktemp -d /tmp/mome-demo-work.XXXXXX)
job_pid=
cleanup() {
  if [ -n "$job_pid" ]; then kill -9 -- "-$job_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
ARGS=(1024 2500)

echo "== native, one process: jacobi ${ARGS[*]}"
native=$("$APPS/jacobi" "${ARGS[@]}" | grep '^checksum')
echo "$native"

echo
echo "== mome-run -n 4 jacobi ${ARGS[*]} (the grid lives in a shared segment of the DSM window)"
setsid "$BIN/mome-run" -n 4 --jobid-file "$work/id" "$APPS/jacobi" "${ARGS[@]}" \
  >"$work/first.out" 2>"$work/first.err" </dev/null &
job_pid=$!
for _ in $(seq 100); do [ -s "$work/id" ] && break; sleep 0.05; done
id=$(cat "$work/id")
echo "job $id started"
sleep 1

echo
echo "== mome-ckpt $id   (the ranks pause only while re-dirtied pages are copied)"
"$BIN/mome-ckpt" "$id"

echo
echo "== kill -9 the whole job (ranks, agent, mome-run), as a crash would"
for pid in $("$BIN/mome-status" --json "$id" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(" ".join(str(p["pid"]) for p in s["ranks"]+s["agents"] if p.get("pid")))'); do
  kill -9 "$pid" 2>/dev/null || true
done
kill -9 -- "-$job_pid" 2>/dev/null || true
wait "$job_pid" 2>/dev/null || true
job_pid=
echo "killed; mome-status says:"
"$BIN/mome-status" "$id" | head -20

echo
echo "== mome-restart $id   (pages come back lazily from the checkpoint)"
"$BIN/mome-restart" "$id" | tee "$work/restart.out"
mome=$(grep -o 'checksum .*' "$work/restart.out" | tail -1)

echo
if [ "$native" = "$mome" ]; then
  echo "demo: OK — checkpointed, killed and restarted, 4 ranks under mome computed the native result ($mome)"
else
  echo "demo: MISMATCH — native '$native', restarted mome '$mome'" >&2
  exit 1
fi

echo
echo "== the same program on 4 simulated nodes (an agent and a keeper of checkpoint memory each, shared pages over TCP on loopback)"
setsid "$BIN/mome-run" -n 4 --nodes 4 --jobid-file "$work/nodes.id" "$APPS/jacobi" "${ARGS[@]}" \
  >"$work/nodes.out" 2>"$work/nodes.err" </dev/null &
job_pid=$!
for _ in $(seq 100); do [ -s "$work/nodes.id" ] && break; sleep 0.05; done
nid=$(cat "$work/nodes.id")
sleep 1
echo "== mome-ckpt $nid   (every node parks, each keeps its increment in memory and sends it to two other nodes)"
"$BIN/mome-ckpt" "$nid"
"$BIN/mome-status" "$nid" | sed -n '/^NODE/,/^$/p'
echo "== kill -9 node 1 (its agent and its keeper: its memory and its checkpoint copies are gone)"
for pid in $(python3 -c 'import json,sys; d=sys.argv[1]; s=json.load(open(d+"/status.json")); k=json.load(open(d+"/keepers/node-1.json")); print(" ".join(str(p) for p in [a["pid"] for a in s["agents"] if a["node"]==1]+[k["pid"]]))' "$MOME_HOME/jobs/$nid"); do
  kill -9 "$pid" 2>/dev/null || true
done
wait "$job_pid" || { echo "demo: the job did not recover" >&2; cat "$work/nodes.err" >&2; exit 1; }
job_pid=
grep '^mome' "$work/nodes.err" || true
cat "$work/nodes.out"
nodes=$(grep -o 'checksum .*' "$work/nodes.out" | tail -1)
if [ "$native" = "$nodes" ]; then
  echo "demo: OK — on 4 nodes, a node killed after the checkpoint, the job came back from the other nodes' memory and computed the native result ($nodes)"
else
  echo "demo: MISMATCH on 4 nodes — native '$native', mome '$nodes'" >&2
  exit 1
fi

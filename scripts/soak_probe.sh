#!/usr/bin/env bash
# Soak the host probe: attach it to a real KVM QEMU that migrates over and over, and record the
# probe's memory every second.  Not run in CI (root, KVM, BPF, and it takes DURATION seconds).
#
#   sudo scripts/soak_probe.sh [DURATION_S=90] [OUT_DIR=/tmp/hs-soak]
#
# Writes OUT_DIR/rss.csv (t_s,rss_kb,vmsize_kb,parts,migrations) and OUT_DIR/bundle; prints a summary.
# docs/reliability.md records a run.
set -euo pipefail
DURATION=${1:-90}
OUT=${2:-/tmp/hs-soak}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
QEMU=${HINTSCOPE_QEMU:-/usr/bin/qemu-system-x86_64}

rm -rf "$OUT"
mkdir -p "$OUT"
QMP="$OUT/qmp.sock"
"$QEMU" -accel kvm -m 256 -display none -nodefaults -no-user-config \
    -qmp "unix:$QMP,server=on,wait=off" >"$OUT/qemu.log" 2>&1 &
QPID=$!
PROBE_PID=""
DRIVER_PID=""
cleanup() {
    [ -n "$DRIVER_PID" ] && kill "$DRIVER_PID" 2>/dev/null || true
    [ -n "$PROBE_PID" ] && kill -INT "$PROBE_PID" 2>/dev/null && wait "$PROBE_PID" 2>/dev/null || true
    kill "$QPID" 2>/dev/null || true
    wait "$QPID" 2>/dev/null || true
}
trap cleanup EXIT

for _ in $(seq 100); do [ -S "$QMP" ] && break; sleep 0.1; done

PYTHONPATH="$ROOT" "$PY" -m hintscope probe host --pid "$QPID" -o "$OUT/bundle" --flush-interval 1 \
    >"$OUT/probe.out" 2>"$OUT/probe.err" &
PROBE_PID=$!
for _ in $(seq 1200); do grep -q ATTACHED "$OUT/probe.out" 2>/dev/null && break; sleep 0.1; done
grep -q ATTACHED "$OUT/probe.out" || { echo "probe did not attach:"; tail -5 "$OUT/probe.err"; exit 1; }

# Migration driver: migrate to /dev/null, resume, repeat; counts migrations in OUT/migrations.
"$PY" - "$QMP" "$OUT/migrations" <<'EOF' &
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw"); f.readline()
def cmd(name, **a):
    f.write(json.dumps({"execute": name, "arguments": a}) + "\n"); f.flush()
    while True:
        m = json.loads(f.readline())
        if "return" in m or "error" in m:
            return m
cmd("qmp_capabilities")
n = 0
while True:
    cmd("migrate", uri="exec:cat > /dev/null")
    while cmd("query-migrate")["return"].get("status") not in ("completed", "failed", "cancelled"):
        time.sleep(0.05)
    cmd("cont")
    n += 1
    open(sys.argv[2], "w").write(str(n))
    time.sleep(0.2)
EOF
DRIVER_PID=$!

echo "t_s,rss_kb,vmsize_kb,parts,migrations" >"$OUT/rss.csv"
for t in $(seq 0 "$DURATION"); do
    rss=$(awk '/^VmRSS/{print $2}' "/proc/$PROBE_PID/status" 2>/dev/null || echo "")
    vsz=$(awk '/^VmSize/{print $2}' "/proc/$PROBE_PID/status" 2>/dev/null || echo "")
    [ -z "$rss" ] && { echo "probe exited early:"; tail -5 "$OUT/probe.err"; exit 1; }
    parts=$(find "$OUT/bundle" -name 'part-*.parquet' 2>/dev/null | wc -l)
    migs=$(cat "$OUT/migrations" 2>/dev/null || echo 0)
    echo "$t,$rss,$vsz,$parts,$migs" >>"$OUT/rss.csv"
    sleep 1
done

kill "$DRIVER_PID" 2>/dev/null || true
DRIVER_PID=""
kill -INT "$PROBE_PID"
wait "$PROBE_PID" || true
PROBE_PID=""
tail -1 "$OUT/probe.err"
"$PY" - "$OUT/rss.csv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
rss = [int(r["rss_kb"]) for r in rows]
n = len(rss)
first, last = rss[min(5, n - 1)], rss[-1]
print(f"samples {n}; RSS at 5 s {first} kB, max {max(rss)} kB, end {last} kB; "
      f"growth after 5 s {last - first:+d} kB; migrations {rows[-1]['migrations']}; parts {rows[-1]['parts']}")
EOF

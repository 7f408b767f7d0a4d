#!/bin/sh
# hintscope Linux guest, stage 2 (runs from the read-only payload disk mounted at /mnt).
# Opens the virtio-serial port named "hintscope" ONCE as fd 3 (a port takes one opener) and
# hands it to the probe and the workload, which both write whole lines to it.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
HS_FILL_MB=400 HS_PRESSURE_MB=0 HS_WRITER_MB=16 HS_PROBE=1 HS_TMPFS_MB=900
HS_BURST=none HS_BURST_AT=bulk HS_BURST_MB=400 HS_BURST_S=3 HS_BURST_DELAY_MS=1500
[ -f /mnt/config ] && . /mnt/config
mount -t tmpfs -o size=${HS_TMPFS_MB}m tmp /tmp
mount -t debugfs none /sys/kernel/debug 2>/dev/null
mount -t tracefs none /sys/kernel/tracing 2>/dev/null
modprobe virtio_console
modprobe virtio_balloon
echo "HS-INIT: modules loaded, uptime $(cut -d' ' -f1 /proc/uptime)"
PORT=
i=0
while [ -z "$PORT" ] && [ $i -lt 50 ]; do
    for d in /sys/class/virtio-ports/*; do
        [ -f "$d/name" ] && [ "$(cat "$d/name")" = hintscope ] && [ -e "/dev/${d##*/}" ] && PORT=/dev/${d##*/}
    done
    [ -z "$PORT" ] && sleep 0.2
    i=$((i + 1))
done
if [ -z "$PORT" ]; then
    echo "HS-INIT: no virtio port named hintscope"; exec 3>/dev/console
else
    exec 3>"$PORT"
fi
if [ "$HS_PROBE" = 1 ]; then
    python3 /mnt/guest.py --out fd:3 --attached-file /run/hs/attached &
    probe=$!
    # BCC compiles for 5 s on an idle host and minutes on a busy one: wait while it is alive
    i=0
    while [ ! -f /run/hs/attached ] && kill -0 $probe 2>/dev/null && [ $i -lt 6000 ]; do
        sleep 0.2; i=$((i + 1))
    done
    [ -f /run/hs/attached ] && echo "HS-INIT: probe ATTACHED, uptime $(cut -d' ' -f1 /proc/uptime)" \
        || echo "HS-INIT: probe did not attach"
fi
python3 /mnt/workload.py --out fd:3 --fill-mb "$HS_FILL_MB" --pressure-mb "$HS_PRESSURE_MB" \
    --writer-mb "$HS_WRITER_MB" --burst "$HS_BURST" --burst-at "$HS_BURST_AT" --burst-mb "$HS_BURST_MB" \
    --burst-s "$HS_BURST_S" --burst-delay-ms "$HS_BURST_DELAY_MS" &
while true; do sleep 3600; done

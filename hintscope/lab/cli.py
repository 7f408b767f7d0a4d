"""``hintscope lab migrate --guest dirtier|linux|hintguest``: one command, one runner per guest.

Each runner (lab/dirtier.py, lab/linux.py, lab/hintguest.py) drives its guest through the shared
migration driver in lab/session.py; this module only holds the options and picks the runner.
"""

from __future__ import annotations

import argparse

from hintscope.lab import dirtier, hintguest, linux

RUNNERS = {"dirtier": dirtier.run, "linux": linux.run, "hintguest": hintguest.run_from_migrate}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("migrate", help="run a probed QEMU live migration of a lab guest (root for the probe)",
                              description=dirtier.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--guest", default="dirtier", choices=list(RUNNERS),
                   help="lab guest (default dirtier; linux = Debian guest under TCG, see lab/linux.py; "
                        "hintguest = bare-metal free page hinting guest, 2 GiB, see lab/hintguest.py)")
    p.add_argument("--behaviour", default="polite", choices=list(hintguest.BEHAVIOURS),
                   help="--guest hintguest: what the guest does with blocks it hinted (docs/hintguest.md)")
    p.add_argument("--stale-id", action="store_true",
                   help="--guest hintguest control: the start message carries a stale id, QEMU drops every hint")
    p.add_argument("--zero-before-hint", action="store_true",
                   help="--guest hintguest: zero each block after the cmd id, before hinting it (init_on_alloc)")
    p.add_argument("--pages", default="0x400-0x4ff", help="gfns the guest writes: GFN or GFN-GFN, comma list")
    p.add_argument("--rate", type=int, default=20000, help="page writes per second (0 = unlimited; ~60k max here)")
    p.add_argument("--rounds", type=int, default=0, help="stop writing after N passes over --pages (0 = never)")
    p.add_argument("--prefill", type=int, default=0, metavar="MB",
                   help="dirtier fills MB of RAM once at boot (~10 MiB/s here), giving the bulk round real pages")
    p.add_argument("--accel", default="auto", choices=["kvm", "tcg", "auto"])
    p.add_argument("--dirty-ring", type=int, default=0, metavar="N", help="KVM dirty ring entries (0 = bitmap)")
    p.add_argument("--mem", type=int, default=256, metavar="MB", help="guest RAM in MiB (default 256)")
    p.add_argument("--hint", default="on", choices=["on", "off"], help="virtio-balloon free-page-hint device")
    p.add_argument("--probe", default="auto", choices=["auto", "on", "off"], help="attach the host probe")
    p.add_argument("--tap", default="on", choices=["on", "off"],
                   help="migrate through the migration-stream tap, which records page_sends (docs/tap.md)")
    p.add_argument("--bandwidth", type=int, default=1000, metavar="MIBPS", help="migration max-bandwidth")
    p.add_argument("--downtime", type=int, default=300, metavar="MS",
                   help="migration downtime-limit (1 keeps QEMU iterating and syncing longer)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds the migration may take")
    p.add_argument("--crosscheck", action="store_true",
                   help="also count the source's dirty-log ioctls with bpftrace (meta lab.crosscheck)")
    p.add_argument("--no-memcheck", action="store_true", help="skip the destination memory comparison")
    p.add_argument("--keep-workdir", action="store_true", help="keep /tmp/hs-lab-* (QEMU logs, sockets)")
    p.add_argument("--qemu", default=None, metavar="PATH", help="QEMU binary (default $HINTSCOPE_QEMU or /usr/bin)")
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE", help="bundle directory to create")
    linux.add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    return RUNNERS[args.guest](args)

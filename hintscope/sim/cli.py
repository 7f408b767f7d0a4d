"""`hintscope simulate`: write a bundle from the protocol simulator (with ground truth)."""

from __future__ import annotations

import argparse

from hintscope.errors import HintscopeError
from hintscope.sim.model import MODES
from hintscope.sim.variants import VARIANTS

EPILOG = "variants:\n" + "\n".join(f"  {v.name:20s} {v.doc}" for v in VARIANTS.values())


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "simulate", help="simulate a migration with free page hinting and write a bundle with ground truth",
        description="Discrete-event model of QEMU precopy + virtio-balloon hinting + the Linux driver. Writes "
                    "the same tables the real probes write, plus `ground_truth`.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="qemu", choices=sorted(VARIANTS), help="host/guest design (default qemu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default="manual", choices=MODES,
                   help="dirty logging: legacy GET, manual protect with chunked CLEAR, or dirty ring")
    p.add_argument("--pages", type=int, default=None, help="guest RAM in 4 KiB pages (default 4096)")
    p.add_argument("--no-dest-compare", action="store_true",
                   help="omit the `lost_pages` table (the destination memory check)")
    p.add_argument("-o", "--output", required=True, help="bundle directory to create")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from hintscope.sim.model import SimConfig
    from hintscope.sim.write import simulate, write_bundle
    cfg = SimConfig()
    if args.pages is not None:
        if args.pages < 512 or args.pages % 512 or args.pages > (1 << 22):
            raise HintscopeError(f"--pages {args.pages}: need a multiple of 512 between 512 and 4194304")
        cfg.pages = args.pages
        cfg.hot_pages = min(cfg.hot_pages, args.pages // 8)
    mb = simulate(args.variant, args.seed, args.mode, dest_compare=not args.no_dest_compare, cfg=cfg)
    write_bundle(mb, args.output)
    t = mb.meta["sim"]["truth"]
    print(f"{args.output}: variant {args.variant} mode {args.mode} seed {args.seed}: "
          f"{t['lost']} lost pages ({t['lost_hint']} hint, {t['lost_not_hint']} not hint), {t['stale']} stale")
    return 0

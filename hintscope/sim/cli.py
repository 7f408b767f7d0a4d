"""`hintscope simulate`: write a bundle from the protocol simulator (with ground truth)."""

from __future__ import annotations

import argparse

from hintscope.errors import HintscopeError
from hintscope.sim.model import MAX_PAGES, MODES, PAGES_PER_GIB
from hintscope.sim.variants import VARIANTS

EPILOG = "variants:\n" + "\n".join(f"  {v.name:20s} {v.doc}" for v in VARIANTS.values()) + """

presets:
  small (default)      4096 pages unless --pages; hint blocks of 16 pages, clear chunks of 256 pages
  scale                SimConfig.for_guest(pages): Linux order-10 hint blocks (4 MiB), QEMU's 1 GiB clear
                       chunks, a 1 GiB/s link, a writer whose hot set is 1/256 of RAM: the work per GiB
                       is the same at every size (docs/detector.md, "The simulator at scale")
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "simulate", help="simulate a migration with free page hinting and write a bundle with ground truth",
        description="Discrete-event model of QEMU precopy + virtio-balloon hinting + the Linux driver. Writes "
                    "the same tables the real probes write (sends as the migration-stream tap's page_sends), "
                    "plus `ground_truth` (the stale pages).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="qemu", choices=sorted(VARIANTS), help="host/guest design (default qemu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default="manual", choices=MODES,
                   help="dirty logging: legacy GET, manual protect with chunked CLEAR, or dirty ring")
    p.add_argument("--preset", default="small", choices=("small", "scale"),
                   help="model parameters: small (the confusion matrix's) or scale (realistic, constant work "
                        "per GiB; see below)")
    p.add_argument("--pages", type=int, default=None,
                   help="guest RAM in 4 KiB pages (default 4096 small, 262144 = 1 GiB scale)")
    p.add_argument("--gib", type=int, default=None, help="guest RAM in GiB (instead of --pages)")
    p.add_argument("--page-send-events", action="store_true",
                   help="also write one qemu_events page_send row per page sent (the uprobe's view; small sims)")
    p.add_argument("--no-dest-compare", action="store_true",
                   help="omit the `lost_pages` table (the destination memory check)")
    p.add_argument("-o", "--output", required=True, help="bundle directory to create")
    p.set_defaults(func=run)
    return p


def config(args):
    from hintscope.sim.model import SimConfig
    if args.pages is not None and args.gib is not None:
        raise HintscopeError("give --pages or --gib, not both")
    pages = args.gib * PAGES_PER_GIB if args.gib is not None else args.pages
    if args.preset == "scale":
        pages = PAGES_PER_GIB if pages is None else pages
        unit = 1024
        cfg = SimConfig.for_guest(pages) if pages and pages > 0 else None
    else:
        unit = 512
        cfg = SimConfig()
        if pages is not None:
            cfg.pages = pages
            cfg.hot_pages = min(cfg.hot_pages, pages // 8)
    if pages is not None and (pages < unit or pages % unit or pages > MAX_PAGES):
        raise HintscopeError(f"--pages {pages}: the {args.preset} preset needs a multiple of {unit} between "
                             f"{unit} and {MAX_PAGES}")
    cfg.mode = args.mode
    cfg.page_send_events = args.page_send_events
    return cfg


def run(args) -> int:
    from hintscope.sim.write import run_sim, write_sim
    cfg = config(args)
    sim = run_sim(args.variant, args.seed, args.mode, cfg)
    meta = write_sim(sim, args.output, dest_compare=not args.no_dest_compare)
    t = meta["sim"]["truth"]
    print(f"{args.output}: variant {args.variant} mode {args.mode} seed {args.seed} pages {cfg.pages}: "
          f"{t['lost']} lost pages ({t['lost_hint']} hint, {t['lost_not_hint']} not hint), {t['stale']} stale")
    return 0

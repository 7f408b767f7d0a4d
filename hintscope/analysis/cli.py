"""``hintscope analyze BUNDLE``: per-sync table, skipped-page accounting, summary, findings."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hintscope.bundle import read_bundle
from hintscope.analysis.findings import FAIL_ON

# Rich lays out a table by measuring every cell: 40k syncs took over 100 s.  The terminal shows the
# first rows of the long tables; --json keeps everything.
MAX_ROWS_SHOWN = 200


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "analyze", help="per-sync table, skipped free pages, summary and findings of a bundle",
        description="Analyse one run bundle: migration bitmap syncs (harvest, re-arm, QEMU cross-checks), "
                    "skipped free page accounting per epoch, data completeness, and the detector's findings.",
        epilog="exit status: 0 ok; with --fail-on, the detector's gate (non-zero when a finding of that class "
               "exists or the verdict cannot be established); 2 on unusable input.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.add_argument("--fail-on", choices=FAIL_ON, help="exit non-zero when findings of this class exist")
    p.add_argument("--baseline", metavar="OTHER_BUNDLE", help="A/B against another bundle (e.g. hinting off)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from hintscope.analysis import summary as sm

    res = sm.analyze(read_bundle(args.bundle))
    if args.baseline:
        res["baseline"] = sm.compare(res, sm.analyze(read_bundle(args.baseline)))
    if args.json:
        # One-shot dumps without indent takes json's C encoder: ~10x faster on big captures.
        sys.stdout.write(json.dumps(sm.to_json(res), default=str, separators=(",", ":")) + "\n")
    else:
        render(res)
    # 0 clean; 1 --fail-on matched; 3 inconclusive under --fail-on, or a check failed (docs/detector.md)
    return res["findings"].exit_code(args.fail_on)


# -- terminal rendering --------------------------------------------------------------------------
def _ms(ns: Any, t0: int) -> str:
    return "-" if ns is None or int(ns) < 0 else f"{(int(ns) - t0) / 1e6:.3f}"


def _n(v: Any) -> str:
    return "-" if v is None or (isinstance(v, (int, float)) and v < 0) else f"{int(v):,}"


def _more(con, total: int, what: str) -> None:
    if total > MAX_ROWS_SHOWN:
        con.print(f"... {total - MAX_ROWS_SHOWN:,} more {what} not shown (first {MAX_ROWS_SHOWN} of {total:,}; "
                  "--json has all)")


def render(res: dict[str, Any]) -> None:
    from rich.console import Console
    import pandas as pd
    from rich.table import Table

    con = Console()
    s = res["syncs"]
    summ = res["summary"]
    times = [int(v[v >= 0].min()) for v in (s[col].to_numpy("int64") for col in
                                            ("before_ns", "fetch_start_ns", "trace_start_ns")) if (v >= 0).any()]
    t0 = min(times) if times else 0
    full = s
    s = s.iloc[:MAX_ROWS_SHOWN]
    con.print(f"[bold]{summ['bundle']}[/bold]  (times in ms from the first sync)")

    t = Table(title=f"migration bitmap syncs: timing (source: {summ['sync_source']})")
    lossy = bool(full["incomplete"].any()) if "incomplete" in full and len(full) else False
    for h in ["sync", "epoch", "BEFORE", "fetch start", "fetch end", "AFTER", "GETs", "re-arm CLEARs"] + \
            (["lost events"] if lossy else []):
        t.add_column(h, justify="right")
    for r in s.itertuples(index=False):
        t.add_row(str(r.sync), _n(r.epoch), _ms(r.before_ns, t0), _ms(r.fetch_start_ns, t0), _ms(r.fetch_end_ns, t0),
                  _ms(r.after_ns, t0), _n(r.get_calls), _n(r.clear_calls),
                  *(["[red]yes[/red]" if r.incomplete else ""] if lossy else []))
    con.print(t)
    _more(con, len(full), "syncs")
    if lossy:
        con.print(f"[red]{int(full['incomplete'].sum())} of {len(full)} syncs overlap probe intervals with lost events "
                  "(meta lost_series): their counts may miss records[/red]")
    ring = bool((full["ring_pages"] >= 0).any()) if len(full) else False
    t = Table(title="migration bitmap syncs: pages")
    heads = ["sync", "harvested", "by slot"] + (["ring"] if ring else []) + \
        ["re-armed", "by hint", "QEMU dirty_pages", "QEMU new", "est. new"]
    for h in heads:
        t.add_column(h, justify="right")
    for r in s.itertuples(index=False):
        t.add_row(*([str(r.sync), _n(r.harvested), r.harvested_by_slot or "-"] + ([_n(r.ring_pages)] if ring else [])
                    + [_n(r.rearmed), _n(r.rearmed_by_hint), _n(r.qemu_dirty_pages), _n(r.qemu_new_pages),
                       _n(r.est_new_pages)]))
    con.print(t)
    _more(con, len(full), "syncs")

    a = res["accounting"]
    t = Table(title=f"skipped free pages per epoch (sends: {a['source']})")
    for h in ["epoch", "start", "end", "applies", "applied pages", "skipped", "late", "resent", "bytes saved ≤"]:
        t.add_column(h, justify="right")
    pe = a["per_epoch"]
    # The "outside" row (applies in no epoch) comes last: keep it visible when the rest is cut.
    shown = pe.iloc[:MAX_ROWS_SHOWN]
    if len(pe) > MAX_ROWS_SHOWN and (pe["epoch"] < 0).any():
        shown = pd.concat([shown, pe[pe["epoch"] < 0]])
    for r in shown.itertuples(index=False):
        t.add_row("outside" if r.epoch < 0 else str(r.epoch), _ms(r.start_ns, t0), _ms(r.end_ns, t0), _n(r.applies),
                  _n(r.applied_pages), _n(r.skipped_pages), _n(r.late_pages), _n(r.resent_pages), _n(r.bytes_saved))
    tot = a["totals"]
    if not a.get("applies_captured", True):
        con.print("hint applies not captured (no qemu_guest_free_page_hint uprobe in this bundle): "
                  "no host-side skipped-page accounting")
        tot = {k: -1 for k in tot}
    t.add_row("total", "", "", _n(tot["applies"]), _n(tot["applied_pages"]), _n(tot["skipped_pages"]),
              _n(tot["late_pages"]), _n(tot["resent_pages"]), _n(tot["bytes_saved_upper_bound"]), style="bold")
    con.print(t)
    _more(con, len(a["per_epoch"]), "epochs")
    con.print(f"send source: {a['source_caveat']}")
    if a.get("guest"):
        g = a["guest"]
        con.print(f"guest hinted {g['blocks']} blocks = {g['pages']:,} pages: "
                  + ", ".join(f"{x['cmd_id']}: {x['pages']:,}" for x in g["per_cmd_id"]))
    if a.get("matching"):
        mt = a["matching"]
        con.print(f"guest vs host: {mt['host_ids']} cmd id(s) issued by the host, guest read "
                  f"{', '.join(mt['guest_ids_read']) or 'none'}"
                  + (f"; never read by the guest: {', '.join(mt['ids_unread'])}" if mt["ids_unread"] else "")
                  + (f"; read but not issued in this capture: {', '.join(mt['ids_not_issued'])}"
                     if mt["ids_not_issued"] else "")
                  + f"; hinted blocks {mt['blocks_hinted']}: applied {mt['blocks_applied']}, "
                    f"dropped or never popped {mt['blocks_not_applied']}")

    m = summ["migration"]
    t = Table(title="summary", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    t.add_row("migration", f"{m.get('outcome')}  total {m.get('total_time_ms', '?')} ms, downtime "
                           f"{m.get('downtime_ms', '?')} ms, transferred {_n(m.get('transferred'))} B, normal pages "
                           f"{_n(m.get('normal'))}, zero pages {_n(m.get('duplicate'))} ({m.get('source')})")
    t.add_row("syncs / epochs", f"{summ['syncs']} / {summ['epochs']}  (QMP dirty-sync-count "
                                f"{m.get('dirty_sync_count', '?')}); dirty logging: {summ['dirty_mode']}")
    d = summ["data"]
    damaged = res["findings"].coverage.get("damaged") or {}
    state = "INCOMPLETE" if not d["complete"] else f"PARTIAL: damaged {', '.join(damaged)}" if damaged else "complete"
    t.add_row("capture", f"{state} ({d.get('end_reason')}); memslots from "
                         f"{d['memslot_source']}; sends from {d['send_source']}")
    t.add_row("sources", ", ".join(f"{k}={v}" for k, v in d["sources"].items()) or "-")
    lost = {k: v for k, v in d["lost_events"].items() if v}
    t.add_row("lost events", ", ".join(f"{k}={v}" for k, v in lost.items()) or "none reported")
    f = summ["findings"]
    t.add_row("findings", ", ".join(f"{k}: {v}" for k, v in f["by_kind"].items()) or "none")
    checks = res["findings"].checks
    t.add_row("checks", ", ".join(f"{c.name} {c.status}" for c in checks if c.status != "ran") and
              f"{sum(c.status == 'ran' for c in checks)} of {len(checks)} ran; " +
              ", ".join(f"{c.name}: {c.status}" for c in checks if c.status != "ran") or "all ran")
    t.add_row("verdict", str(f["verdict"]))
    if f.get("basis") and f["basis"] != f["verdict"]:
        t.add_row("verdict basis", str(f["basis"]))
    con.print(t)
    for p in d["problems"]:
        con.print(f"[yellow]problem:[/yellow] {p}", markup=True, highlight=False)
    if res.get("counter_checks"):
        t = Table(title="capture vs QEMU's own counters")
        for h in ["check", "capture", "QEMU", ""]:
            t.add_column(h, justify="right" if h in ("capture", "QEMU") else "left")
        for k in res["counter_checks"]:
            t.add_row(k["check"], _n(k["capture"]), _n(k["qemu"]), "agree" if k["agree"] else "[red]differ[/red]")
        con.print(t)
    for x in res["cross_checks"]:
        con.print(f"[cyan]cross-check:[/cyan] {x}", highlight=False)
    render_findings(con, res.get("findings"), t0)
    if "baseline" in res:
        bl = res["baseline"]
        t = Table(title="A/B against baseline")
        for h in ["metric", "this", "baseline", "diff"]:
            t.add_column(h, justify="right")
        for k, v in bl["metrics"].items():
            t.add_row(k, _n(v["this"]), _n(v["baseline"]), "-" if v["diff"] is None else f"{v['diff']:+,}")
        t.add_row("skipped pages (host estimate)", _n(bl["skipped_pages_estimate"]), "", "")
        t.add_row("pages the guest hinted", _n(bl.get("guest_hinted_pages")), "", "")
        t.add_row("normal pages saved (QMP)", _n(bl["qmp_normal_pages_saved"]), "", "")
        con.print(t)


MAX_FINDINGS_SHOWN = 12


def render_findings(con, fnd, t0: int) -> None:
    """Each finding's sentence and its evidence chain (host clock: ns and ms from the first sync)."""
    f = fnd.frame if fnd is not None else None
    if f is None or not len(f):
        return
    con.print(f"[bold]findings[/bold] ({len(f)}; evidence on the host clock, ms from the first sync)")
    for r in list(f.itertuples(index=False))[:MAX_FINDINGS_SHOWN]:
        gfns = (f"gfn {int(r.gfn_first):#x}" if r.gfn_count == 1 else
                f"{int(r.gfn_count)} pages {int(r.gfn_first):#x}..{int(r.gfn_last):#x}") if r.gfn_count else "-"
        con.print(f"- {r.kind} ({r.confidence}, {r.severity}) {gfns}: {r.sentence}", highlight=False, markup=False)
        for ts, side, what in (r.evidence or []):
            when = f"{int(ts):>16d}  {(int(ts) - t0) / 1e6:>10.3f}" if int(ts) >= 0 else f"{'-':>16}  {'':>10}"
            con.print(f"    {when}  {side:<8} {what}", highlight=False, markup=False)
    if len(f) > MAX_FINDINGS_SHOWN:
        con.print(f"  ... {len(f) - MAX_FINDINGS_SHOWN} more (--json lists all)")

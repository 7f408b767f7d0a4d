"""Analysis of run bundles (pandas): memslots, harvests, syncs, skipped pages, clocks, the ordering detector."""

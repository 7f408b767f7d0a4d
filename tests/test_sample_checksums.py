"""Every committed sample part carries Parquet page CRCs, so a flipped byte is an error, not a new value.

A flip either breaks the read (CRC or header) or lands where no value lives (page statistics,
padding): it must never yield a table that reads cleanly with different values.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
PARTS = sorted(SAMPLES.glob("*/*/*.parquet"))
FLIPS = 6


@pytest.mark.parametrize("part", PARTS, ids=lambda p: str(p.relative_to(SAMPLES)))
def test_flipped_byte_never_reads_as_other_values(part, tmp_path):
    orig = part.read_bytes()
    ref = pq.read_table(part)
    footer = int.from_bytes(orig[-8:-4], "little")
    end = len(orig) - 8 - footer           # column chunks live in [4, end)
    rnd = random.Random(part.name + part.parent.name)
    for _ in range(FLIPS):
        pos = rnd.randrange(4, end)
        data = bytearray(orig)
        data[pos] ^= 0x55
        f = tmp_path / "flipped.parquet"
        f.write_bytes(bytes(data))
        try:
            got = pq.ParquetFile(f, page_checksum_verification=True).read()
        except Exception:
            continue
        assert got.equals(ref), f"{part}: a flip at byte {pos} reads cleanly as different values"

"""The offline-store benchmark runs end to end on tiny sizes: ``bench_offline.main`` writes its
CSV and Markdown with every column, one row per store, and the top-64 store of the Zipf-like
teacher at V = 151,936 takes at most 3 bytes per (id, log-prob) entry on disk. No timing is
asserted (only that each rate is a positive number)."""
import csv

import pytest

pytest.importorskip("pyarrow")

from pydistill.bench import bench_offline  # noqa: E402


def test_bench_offline_quick_tiny(tmp_path):
    rows = bench_offline.main(["--quick", "--device", "cpu", "--sequences", "4", "--length",
                               "128", "--reps", "1", "--machine", "test", "--out",
                               str(tmp_path / "offline.csv")])
    with open(tmp_path / "offline.csv") as f:
        written = list(csv.DictReader(f))
    assert tuple(written[0]) == bench_offline.COLUMNS
    assert [r["store"] for r in written] == ["top-64", "top-128", "sampled-12"]
    assert [r["tokens"] for r in written] == ["512"] * 3
    for r in rows:
        for col in ("bytes_per_token", "dense_tok_s", "compact_tok_s", "decode_tok_s",
                    "step_tok_s", "decode_share"):
            assert r[col] > 0, (r["store"], col)
        assert r["bottleneck"] in ("yes", "no")
    assert rows[0]["bytes_per_entry"] <= 3.0, rows[0]
    assert rows[0]["bytes_per_token"] == pytest.approx(64 * rows[0]["bytes_per_entry"], rel=1e-2)
    md = (tmp_path / "offline.md").read_text()
    assert "Machine: test" in md and "predicted" in md and md.count("| top-") == 2

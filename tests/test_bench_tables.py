"""bench_tables.py: the table row of a failed run and the memory-budget plot (a PNG with one line per kind)."""

import bench_tables


def test_table_and_budget_plot(tmp_path):
    rows = [dict(row=f"{kind} train, memory budget {b}: ours", res=1024, kind=kind, budget=b, seconds=s, peak_gib=g)
            for kind, pts in (("bf16", [(0.0, 1.21, 26.5), (0.34, 0.98, 38.8), (1.0, 0.89, 62.9)]),
                              ("fp8", [(0.0, 1.0, 26.7), (1.0, 0.77, 63.0)])) for b, s, g in pts]
    rows.append(dict(row="fp8 train, memory budget 0.5: ours", res=1024, kind="fp8", budget=0.5, seconds=None,
                     peak_gib=None, error="OutOfMemoryError: CUDA out of memory"))
    table = bench_tables.format_table(rows)
    assert "| bf16 train, memory budget 0.34: ours | 1024 | 0.980 |" in table and "failed: OutOfMemoryError" in table
    path = tmp_path / "curve.png"
    bench_tables.plot_budget(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000

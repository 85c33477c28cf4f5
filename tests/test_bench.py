"""python -m mtok_jax.bench: the harness end to end on the tiny preset (no timing is asserted)."""

import json
import os

from mtok_jax import bench


def test_tiny_preset_measures_everything(demo_models, tmp_path, capsys):
    """The CLI end to end (a child process per measurement, its JSON lines) on two workloads, and
    `measure` (what each child runs) in this process on every other one (a child costs ~15 s of imports
    and loading)."""
    root = os.path.dirname(demo_models["sd"])
    through_cli = ("beats", "input")
    records = bench.main(["--preset", "tiny", "--what", ",".join(through_cli), "--runs", "1", "--assets", root])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["what"] for r in records] == list(through_cli) and printed == records
    by_what = {r["what"]: r for r in records}
    by_what.update({what: bench.measure("tiny", what, "jax", root, 1) for what in bench.WHATS
                    if what not in through_cli})
    records = [by_what[what] for what in bench.WHATS]
    for r in records:
        assert "error" not in r, r
        assert r["backend"] == "jax" and r["device_kind"] and r["runs"] == 1
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["peak_rss_gib"] > 0
        if r["what"] != "input":
            assert r["flops"] > 0 and 0 < r["mfu"] < 1.5, r
    assert records[-1]["examples_per_s"] > 0

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nintro kept\n")
    reference = [dict(r, backend="torch", median_ms=2 * r["median_ms"]) for r in records if r["what"] == "exp1"]
    bench.write_markdown(path, "tiny", records + reference, "cmd --what all")
    text = path.read_text()
    assert "| exp1 | torch | 1 |" in text and "| exp1 | torch | 1 | " in text.split("Ratios")[1]
    assert "2.00× | ≥ 1.2× | yes |" in text
    # a second run of one workload replaces its rows only; the first run's command stays for the others
    rerun = [dict(r, median_ms=4 * r["median_ms"]) for r in records + reference if r["what"] == "exp1"]
    bench.write_markdown(path, "tiny", rerun, "cmd --what exp1")
    text = path.read_text()
    assert text.count("<!-- bench:tiny:cpu -->") == 1 and "intro kept" in text
    assert "- run 1: `cmd --what all`" in text
    assert "- run 2: `cmd --what exp1`" in text
    rows = [line for line in text.splitlines() if line.startswith("| exp1 |")]
    assert len(rows) == 3 and all(" | 2 | " in line for line in rows), rows  # 2 records + 1 ratio
    assert "| beats | jax | 1 |" in text and "| input | jax | 1 |" in text
    assert "-->" not in text.split("<!-- bench-data")[1].split("\n-->")[0]
    # every workload measured again: run 1 is no longer referenced, and the new run is run 1
    bench.write_markdown(path, "tiny", records, "cmd --what all again")
    text = path.read_text()
    assert "- run 1: `cmd --what all again`" in text and "- run 2" not in text
    assert "| exp1 | torch |" not in text and "Ratios" not in text  # (no PyTorch figure: no ratios table)

"""`python -m minillm.bench quant` runs end to end at a tiny size and writes its JSON and PNG (no timing asserted)."""

import json

import pytest

from minillm.bench import quant


def test_bench_quant_writes_results(tmp_path):
    quant.main(["--sizes", "64x128", "--batches", "1,3", "--out", str(tmp_path), "--device", "cpu"])
    record = json.loads((tmp_path / "quant-cpu.json").read_text())
    rows = record["results"]["rows"]
    assert [r["M"] for r in rows] == [1, 3]
    assert {"peer_ms", "int8_speedup", "int4-g128_GBps"} <= rows[0].keys()
    assert (tmp_path / "quant-cpu.png").exists()


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="NxK"):
        quant.parse_sizes("4096by4096")

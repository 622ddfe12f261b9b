"""`python -m minillm.gpu_check`: its budget (a stage past its limit is killed, the run goes on), its plan (every
benchmark topic, the same commands on a GPU and in the dry run), its headlines, and the dry run end to end."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minillm import gpu_check
from minillm.bench import __main__ as bench_cli
from minillm.bench import headlines

ROOT = Path(__file__).resolve().parents[1]


def test_every_benchmark_topic_has_a_plan_and_the_shares_fill_the_budget():
    assert set(gpu_check.TOPICS) == set(bench_cli.find_topics()), "a new topic needs its GPU and dry-run sizes"
    shares = gpu_check.ENVIRONMENT_SHARE_S + gpu_check.TESTS_SHARE_S + sum(p.share_s for p in gpu_check.TOPICS.values())
    assert shares == gpu_check.DEFAULT_BUDGET_S
    assert list(gpu_check.TOPICS)[-1] == "engine", "the least predictable stage runs last, to get the others' slack"


def test_the_dry_run_runs_the_same_commands_at_tiny_sizes(tmp_path):
    gpu, dry = (gpu_check.plan(dry_run, tmp_path, tmp_path / "env.json") for dry_run in (False, True))
    assert [s.name for s in gpu] == [s.name for s in dry] == ["environment", "tests", *gpu_check.TOPICS]
    for g, d in zip(gpu, dry):
        assert g.argv[:3] == d.argv[:3] and g.kind == d.kind and g.share_s == d.share_s
    assert gpu[1].argv[3:] == ("-m", "gpu", "-x")
    topics = {s.name: s.argv for s in dry if s.kind == "topic"}
    assert all(argv[argv.index("--device") + 1] == "cpu" for argv in topics.values())
    assert all(argv[argv.index("--device") + 1] == "cuda" for argv in (s.argv for s in gpu[2:]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")  # a zombie is dead


def test_a_topic_past_its_limit_is_killed_with_its_children_and_the_run_goes_on(tmp_path, capsys):
    python = sys.executable
    sleepy = (  # a topic that never ends, and starts a child of its own that must not outlive it
        "import subprocess, sys, time, pathlib\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "pathlib.Path(sys.argv[1]).write_text(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    fake = (  # a tiny topic: writes its results file like minillm.bench's topics do
        "import json, sys, pathlib\n"
        "record = {'topic': 'fake', 'results': {'speedup': 2.5, 'name': 'x'}}\n"
        "pathlib.Path(sys.argv[1], 'fake-cpu.json').write_text(json.dumps(record))\n"
    )
    (tmp_path / "stale-cpu.json").write_text('{"results": {"speedup": 1.0}}')
    os.utime(tmp_path / "stale-cpu.json", (time.time() - 3600,) * 2)  # left by an earlier run
    stages = [
        gpu_check.Stage("sleepy", "topic", (python, "-c", sleepy, str(tmp_path / "child.pid")), share_s=1.0),
        gpu_check.Stage("fake", "topic", (python, "-c", fake, str(tmp_path)), share_s=3.0),
        gpu_check.Stage("stale", "topic", (python, "-c", "pass"), share_s=3.0),
    ]
    t0 = time.monotonic()
    assert gpu_check.check(stages, tmp_path, 8.0, True, tmp_path / "no-environment.json") == 1
    assert time.monotonic() - t0 < 30
    stages = json.loads((tmp_path / "gpu-check-cpu.json").read_text())["stages"]
    assert stages["sleepy"]["status"] == "timeout" and stages["sleepy"]["time_limit_s"] < 1.5
    assert stages["fake"]["status"] == "ok"
    assert stages["fake"]["headline"] == {"speedup": 2.5}, "no headline function: the topic's top-level numbers"
    assert stages["stale"]["status"] == "failed" and "wrote no stale-<device>.json" in stages["stale"]["reason"]
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)
    assert "sleepy" in (tmp_path / "gpu-check-cpu.log").read_text()
    table = capsys.readouterr().out
    assert "sleepy       timeout" in table and "fake         ok" in table


def test_headlines_read_what_a_gpu_run_writes():
    attention = {"rows": [
        {"impl": impl, "D": D, "T": T, "ratio_to_sdpa": r}
        for D in (64, 128) for T, impl, r in [(512, "sdpa", 1.0), (512, "flash", 0.7), (16384, "flash", 0.95)]
    ]}
    assert headlines.attention_headline(attention) == {
        "flash / sdpa speed, D=64 T=16384": 0.95, "flash / sdpa speed, D=128 T=16384": 0.95,
    }
    paged = {"rows": [
        {"impl": "sdpa", "S": 65536, "time_ratio_to_sdpa": 1.0, "fraction_of_peak_bandwidth": 0.7},
        {"impl": "paged", "S": 256, "time_ratio_to_sdpa": 1.4, "fraction_of_peak_bandwidth": 0.2},
        {"impl": "paged", "S": 65536, "time_ratio_to_sdpa": 0.9, "fraction_of_peak_bandwidth": 0.85},
    ]}
    assert headlines.paged_headline(paged) == {"paged / sdpa time, S=65536": 0.9, "paged / peak bandwidth": 0.85}
    roofline = {"measured_flops": 600e12, "measured_bandwidth": 4e12, "decode_step_batch1": {"bandwidth": 1e12},
                "peak": {"flops": 1000e12, "bandwidth": 5e12}}
    assert headlines.roofline_headline(roofline) == {
        "matmul TFLOP/s": 600.0, "bandwidth GB/s": 4000.0, "decode step / measured bandwidth": 0.25,
        "matmul / peak FLOP/s": 0.6, "bandwidth / peak": 0.8,
    }
    engine = {"throughput_ratios": {"minillm_continuous_vs_hf_generate": 3.0},
              "systems": {"hf_generate": {}, "hf_generate_batch": {"error": "TypeError: x"}}}
    assert headlines.engine_headline(engine) == {
        "continuous / hf_generate tokens/s": 3.0, "hf_generate_batch error": "TypeError: x",
    }


def test_pytest_counts():
    out = "sss..\n3 passed, 2 skipped, 98 deselected in 4.03s"
    assert gpu_check.pytest_counts(out) == {"passed": 3, "skipped": 2, "deselected": 98}


def test_the_environment_variable_means_a_dry_run_into_a_temporary_folder(monkeypatch):
    calls = []
    monkeypatch.setattr(gpu_check, "check", lambda stages, out, budget_s, dry_run, facts: calls.append((out, dry_run)))
    monkeypatch.setenv("MINILLM_GPU_CHECK", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "restored after the test")
    monkeypatch.delenv("OMP_NUM_THREADS")
    gpu_check.main([])
    [(out, dry_run)] = calls
    assert os.environ["OMP_NUM_THREADS"] == "1", "a dry run's stages use one CPU thread each"
    assert dry_run and out.resolve() != (ROOT / "benchmarks" / "results").resolve()
    out.rmdir()
    monkeypatch.setenv("MINILLM_GPU_CHECK", "gpu")
    with pytest.raises(SystemExit):
        gpu_check.main([])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_real_run_needs_a_gpu(monkeypatch, capsys):
    monkeypatch.delenv("MINILLM_GPU_CHECK", raising=False)
    with pytest.raises(SystemExit):
        gpu_check.main([])
    assert "--dry-run" in capsys.readouterr().err


@pytest.mark.slow  # about a minute on 2 CPU cores: every topic loads torch, two load the real model
def test_dry_run_end_to_end(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "minillm.gpu_check", "--dry-run", "--out", str(tmp_path)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((tmp_path / "gpu-check-cpu.json").read_text())
    assert record["dry_run"] and record["environment"]["device_slug"] == "cpu"
    assert list(record["stages"]) == ["environment", "tests", *gpu_check.TOPICS]
    for name, stage in record["stages"].items():
        assert stage["status"] == "ok", (name, stage)
        assert stage["headline"], name
    assert record["stages"]["tests"]["headline"]["passed"] >= 1
    for topic in gpu_check.TOPICS:
        assert record["stages"][topic]["results_file"] == f"{topic}-cpu.json"
        assert (tmp_path / f"{topic}-cpu.png").exists()
    assert (tmp_path / "gpu-check-cpu.log").exists()
    assert "total" in result.stdout and "engine" in result.stdout

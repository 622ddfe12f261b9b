"""Course tooling outside the notebooks: minillm.doctor and the benchmark plumbing (dispatcher, timer, results)."""

import importlib
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from minillm.bench import __main__ as bench_cli
from minillm.bench import common
from minillm.doctor import doctor, triton_status


def test_doctor_reports_this_machine(capsys):
    info = doctor()
    out = capsys.readouterr().out
    for key in ("python", "torch", "device", "dtype", "triton_status", "embedded_model"):
        assert key in info and key in out
    if not torch.cuda.is_available():
        assert info["device"] == "cpu" and info["dtype"] == "float32"
        assert info["cpu_cores"] >= 1


def test_triton_status_names_the_mode(monkeypatch):
    d = importlib.import_module("minillm.doctor")  # the module: `minillm.doctor` itself is the function

    monkeypatch.setattr(d, "MODE", "absent")
    assert triton_status(torch.device("cpu")).startswith("absent: the torch references run")
    monkeypatch.setattr(d, "MODE", "compiled")
    assert triton_status(torch.device("cuda")) == "compiled (CUDA)"
    monkeypatch.setattr(d, "MODE", "interpreter")
    assert triton_status(torch.device("cpu")).startswith("interpreter (TRITON_INTERPRET=1")
    monkeypatch.setattr(d, "MODE", "off")
    assert "the torch references run" in triton_status(torch.device("cpu"))


def test_minillm_turns_the_triton_interpreter_on_without_a_gpu():
    """On a CPU, importing minillm alone (no TRITON_INTERPRET in the environment) makes its kernels run."""
    script = (
        "import os, torch, minillm\n"
        "from minillm.attention.flash import flash_attention\n"
        "assert os.environ['TRITON_INTERPRET'] == '1'\n"
        "q = torch.randn(1, 2, 5, 16)\n"
        "with minillm.count_kernel_launches() as launched:\n"
        "    flash_attention(q, q, q)\n"
        "print(dict(launched))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if torch.cuda.is_available():
        pytest.skip("the interpreter is only switched on where there is no GPU")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{'flash_attention': 1}"


def test_count_kernel_launches_counts_only_inside_the_block():
    from minillm._triton import count_kernel_launches, record_launch

    record_launch("outside")
    with count_kernel_launches() as launched:
        record_launch("inside")
        record_launch("inside")
    record_launch("inside")
    assert launched == {"inside": 2}


@pytest.mark.parametrize(
    "capability, expected", [((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)]
)
def test_default_dtype_is_fp16_without_native_bf16(monkeypatch, capability, expected):
    """A T4 (sm75) emulates bf16, and torch.cuda.is_bf16_supported() says True there: fp16 is the right default."""
    from minillm import loading

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    assert loading.resolve_dtype(None, torch.device("cuda")) == expected
    assert loading.resolve_dtype(None, torch.device("cpu")) == torch.float32


@pytest.fixture
def fake_topics(monkeypatch, tmp_path):
    """Topics `fake_b` (first in course order) and `fake_a` in a folder added to minillm.bench's search path."""
    for name in ("fake_a", "fake_b"):
        (tmp_path / f"{name}.py").write_text(f'"""Benchmark {name}, for the test."""\n\ndef main(argv):\n    pass\n')
    (tmp_path / "fake_helpers.py").write_text('"""Not a topic: no main."""\n')
    (tmp_path / "fake_broken.py").write_text("import minillm.no_such_module\n\ndef main(argv):\n    pass\n")
    package = sys.modules["minillm.bench"]
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    monkeypatch.setattr(bench_cli, "COURSE_ORDER", ("fake_b",))
    calls = []
    yield calls
    for name in ("fake_a", "fake_b", "fake_helpers", "fake_broken"):
        sys.modules.pop(f"minillm.bench.{name}", None)


def test_bench_dispatcher(fake_topics, capsys):
    topics = list(bench_cli.find_topics())
    assert "fake_helpers" not in topics and "common" not in topics
    assert topics.index("fake_b") < topics.index("fake_a"), "course order first, then alphabetical"
    assert bench_cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "fake_a     Benchmark fake_a, for the test." in out and "all" in out
    assert "fake_broken (cannot import: ModuleNotFoundError" in out, "a broken topic is reported, not fatal"
    assert bench_cli.main(["nope"]) == 2
    assert "unknown topic 'nope'" in capsys.readouterr().err


def test_bench_all_runs_every_topic_and_reports_failures(fake_topics, monkeypatch, capsys):
    fakes = {n: types.SimpleNamespace(main=lambda argv, n=n: fake_topics.append((n, argv))) for n in "ab"}

    def broken(argv):
        raise RuntimeError("boom")

    topics = {**fakes, "broken": types.SimpleNamespace(main=broken), "unimportable": ImportError("no eval")}
    monkeypatch.setattr(bench_cli, "find_topics", lambda: topics)
    assert bench_cli.main(["all", "--out", "x"]) == 1
    assert fake_topics == [("a", ["--out", "x"]), ("b", ["--out", "x"])]
    assert "failed: broken, unimportable" in capsys.readouterr().err


def test_time_fn_on_cpu():
    ms = common.time_fn(lambda: torch.ones(64, 64) @ torch.ones(64, 64), warmup=1, iters=3, device="cpu")
    assert ms > 0
    with pytest.raises(ValueError, match="iters >= 1"):
        common.time_fn(lambda: None, iters=0)


def test_write_results(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    results = {"ms": torch.tensor([1.5, 2.5]), "dtype": torch.float16, "n": 3}
    paths = common.write_results("toy", results, fig, out_dir=tmp_path / "results", device="cpu")
    plt.close(fig)
    assert [p.name for p in paths] == ["toy-cpu.json", "toy-cpu.png"]
    record = json.loads(paths[0].read_text())
    assert record["results"] == {"ms": [1.5, 2.5], "dtype": "torch.float16", "n": 3}
    env = record["environment"]
    assert env["torch"] == torch.__version__ and env["device"].startswith("cpu") and env["date"]
    assert paths[1].stat().st_size > 0


def test_make_parser_has_the_common_options():
    args = common.make_parser("toy").parse_args(["--out", "d", "--device", "cpu"])
    assert (args.out, args.device) == ("d", "cpu")
    assert common.make_parser("toy").parse_args([]).out == "benchmarks/results"

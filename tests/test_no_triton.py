"""Without Triton (macOS, Windows, a CPU-only laptop), `import minillm` works and the engine runs on torch alone.

Triton is hidden in a fresh interpreter (``sys.modules["triton"] = None`` makes every ``import triton`` fail, as if
it were not installed), then the package is imported and the real model generates with no cache and with the paged
engine: both on the torch path, with no kernel launched, and the same greedy tokens. Asking for a kernel raises.
"""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["triton"] = None  # as if triton were not installed
    import torch
    import minillm
    from minillm._triton import MODE
    from minillm.attention.flash import flash_attention
    from minillm.fast import fused
    
    assert MODE == "absent", MODE
    assert "absent" in minillm.doctor()["triton_status"]
    model, tok = minillm.load_model("smollm2-135m", device="cpu", dtype=torch.float32)
    params = minillm.SamplingParams(max_tokens=6, temperature=0.0)
    with minillm.count_kernel_launches() as launched:
        tokens = {kv: minillm.LLM(model, tokenizer=tok, kv_cache=kv).generate(["The sky is"], params)[0].token_ids
                  for kv in ("none", "paged")}
    assert not launched, launched
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    try:
        flash_attention(q, k, v)
        raise AssertionError("a kernel without Triton must raise, not quietly run the reference")
    except RuntimeError as err:
        assert "cannot run" in str(err), err
    x = torch.randn(2, 8)
    fused.add_rmsnorm_ref(x, x, torch.ones(8), 1e-6)  # the references need no Triton; the kernels say they cannot run
    try:
        fused.add_rmsnorm(x, x, torch.ones(8), 1e-6)
        raise AssertionError("a fused kernel without Triton must raise, not quietly run the reference")
    except RuntimeError as err:
        assert "cannot run" in str(err), err
    try:
        minillm.LLM(model, tokenizer=tok, attention_backend="triton")
        raise AssertionError("asking for Triton without it must be refused")
    except ValueError as err:
        assert "attention_backend='triton' cannot run" in str(err), err
    assert tokens["none"] == tokens["paged"] and len(tokens["none"]) == 6, tokens
    assert "triton" not in sys.modules or sys.modules["triton"] is None
    print("ok", tokens["paged"])
    """
)


def test_import_and_generate_without_triton():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("ok")

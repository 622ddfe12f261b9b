"""minillm: a small, readable LLM inference engine, built from scratch for a course.

Public API (stable names, used by the notebooks, the exercises and outside checks):

    model, tok = minillm.load_model("smollm2-135m")
    llm = minillm.LLM("smollm2-135m", kv_cache="paged")
    outs = llm.generate(["Hello"], minillm.SamplingParams(max_tokens=32))
    minillm.doctor()
    with minillm.count_kernel_launches() as launched: ...   # which Triton kernels really ran
"""

from minillm._triton import count_kernel_launches
from minillm.doctor import doctor
from minillm.engine.llm import LLM
from minillm.engine.request import RequestOutput
from minillm.engine.sampling import SamplingParams
from minillm.loading import load_model

__all__ = ["LLM", "RequestOutput", "SamplingParams", "count_kernel_launches", "doctor", "load_model"]
__version__ = "0.1.0"
# The name on PyPI. `minillm` there is an unrelated project that also installs `import minillm`: a notebook's first
# cell checks this attribute to know it imported the course.
__distribution__ = "minillm-course"


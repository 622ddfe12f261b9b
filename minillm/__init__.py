"""minillm: a small, readable LLM inference engine, built from scratch for a course.

Public API (stable names, used by the notebooks, the exercises and outside checks):

    model, tok = minillm.load_model("smollm2-135m")
    llm = minillm.LLM("smollm2-135m", kv_cache="paged")
    outs = llm.generate(["Hello"], minillm.SamplingParams(max_tokens=32))
    minillm.doctor()
"""

from minillm.doctor import doctor
from minillm.engine.llm import LLM
from minillm.engine.request import RequestOutput
from minillm.engine.sampling import SamplingParams
from minillm.loading import load_model

__all__ = ["LLM", "RequestOutput", "SamplingParams", "doctor", "load_model"]
__version__ = "0.1.0"


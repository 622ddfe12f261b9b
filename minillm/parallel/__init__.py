"""Chapter 11: tensor parallelism on torch.distributed (gloo on a CPU, NCCL on GPUs).

heads.py (which rank holds which query and KV heads) · layers.py (column/row-parallel linears, vocabulary-parallel
embedding and LM head) · comm.py (the counted collectives and their predicted volume) · shard.py (one rank's model,
read slice by slice from the checkpoint) · executor.py (rank 0 schedules and broadcasts, every rank runs its shard)
· pipeline.py (the other split, layers across devices, simulated: the schedule and its bubble).
``minillm.LLM(..., tensor_parallel_size=N)`` is the front door; notebook 11 builds it up.
"""

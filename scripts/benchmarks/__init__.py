"""The workloads of scripts/benchmark.py that are not the train step itself, and its host setup.

    generation.py      benchmark_generate: new tokens/s of the KV-cached sampler, prefill and
                       decode apart, with the forward passes' model FLOPs
    ppo.py             benchmark_ppo: one PPO iteration of training/rl/loop.py on random
                       weights, split into generation, scoring and update
    host_allocator.py  the host memory allocator the benchmark process re-executes itself under

Benchmark-only: training never imports this package. What both need, the devices' peak FLOP/s
(the denominator of MFU), lives in parallel/peak.py.
"""

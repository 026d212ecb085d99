"""Benchmark tools: an SGLang-bench_serving-compatible load generator (`benchmark.bench_serving`)
and a policy A/B harness (`benchmark.ab`)."""

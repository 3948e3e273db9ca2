"""The pieces of `benchmarks.train_throughput`, bottom-up: config -> models -> workload -> timing ->
modes -> report."""

"""The pieces of `benchmarks.scaling` (and of the drills that reuse them), bottom-up: config -> inputs ->
runs -> metrics -> builder -> report."""

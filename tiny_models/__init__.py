"""Tiny models of the real architectures for the demo and the tests; production code never imports them."""

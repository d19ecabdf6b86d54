"""Command-line tools: lorashear-lower, lorashear-opt, lorashear-emit and the `lorashear` umbrella."""

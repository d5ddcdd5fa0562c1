"""Capture: trackers (CPU and CUDA), the replay that attributes bytes, and the runner."""

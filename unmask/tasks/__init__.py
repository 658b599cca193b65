"""One thin orchestration module per entry point: compose, then call the task."""

"""The comparison harness and the command-line plumbing of tools/: config resolution, the error boundary, reports and statistics."""

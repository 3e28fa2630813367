"""Developer and CI tools that are not part of the installed engine (run as ``python -m tools.<name>``)."""

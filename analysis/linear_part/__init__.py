"""Analysis tools of iBOT (evaluation.md §3)."""

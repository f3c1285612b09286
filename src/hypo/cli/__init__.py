"""The `hypo` command line: `main` dispatches to the commands (`train`, `evaluate`; the lab and the bench
bring their own parsers)."""

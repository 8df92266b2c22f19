"""The shared database: engine and fencing, schema and migrations, and the modules that
write its tables (``runs`` is the only writer of qc_runs; docs/DESIGN.md, Tables, lists the
writers of the others)."""

"""`loraflow convert` and `prepare-models`: pure mapping tables (tables), sharded tensor I/O (shards), the command
(cli) and the released artefacts' preparation (release)."""

"""`loraflow bench`: timing (paired, interleaved rounds), layer, decode, train, sandbox, report, the command (cli)."""

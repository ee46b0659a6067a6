"""VIEScore with pluggable judges: our SC / PQ prompts, reply parsing, an on-disk reply cache, aggregation."""

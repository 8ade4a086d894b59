"""One study per chapter: a frozen config with presets, a cached run, and a typed result that reads and writes JSON."""

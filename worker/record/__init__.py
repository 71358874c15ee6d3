"""What a run keeps on disk: the report, the write-ahead journal, and the one-run lock."""

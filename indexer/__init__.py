"""Indexer: dataset readers, the encode pipeline and the index writer."""

"""Search core: encoders, index storage, FAISS wrapper, Searcher and retrieval metrics."""

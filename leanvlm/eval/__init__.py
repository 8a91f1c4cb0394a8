"""Accuracy: a procedural visual question-answering task and a harness that scores engines on it or on
users' own JSONL data."""

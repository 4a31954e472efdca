"""The teacher cache: a teacher's outputs written once and read back by later runs.

``codec.py`` (what is stored per row: dense, top-k, deltas), ``keys.py`` (how a row is
found: a hash of its content), ``store.py`` (the writer, the shards, the reader that
stands in for the teacher's model) and ``remote_store.py`` (a remote teacher's rows kept
in the same shards). It reads and writes files and imports no layer above ``config``;
``engine.teacher.cached_teacher`` makes a Teacher of it, ``distillery.cache`` writes it.
"""

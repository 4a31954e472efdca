"""Datamodules. Each yields batches following ``distillery.data.batch``."""

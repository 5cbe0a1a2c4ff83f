"""Test helpers that ship with the core: the tiny offline model and the conformance suite."""

"""Tests of the engine: the method against its oracles, training, support sets, weights."""

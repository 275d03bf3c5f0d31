"""Tests against a real sgp serve process: results, limits, hostile clients, users."""

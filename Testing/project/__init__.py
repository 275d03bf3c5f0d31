"""Tests of the repository as a whole: layout and imports, docs, one home per helper."""

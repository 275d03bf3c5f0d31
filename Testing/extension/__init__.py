"""Tests of the Slicer module and the Segment Editor effect, loaded by Slicer's own rules."""

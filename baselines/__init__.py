"""Comparison methods (installed as ``cmtkd.baselines``; the folder is ``baselines/``). Each is one
file, listed by name in :mod:`cmtkd.catalog`. Same engine, quantizers and data path as CMT-KD."""

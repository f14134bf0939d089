"""weft's lab: the namespace testbed, `weft demo`, `weft bench`. Not part of an agent host."""

"""A run around the loop: the options (``config``), the start-up checks (``preflight``), the set-up
(``runner``), checkpoints and resuming, what only rank 0 does (``rank0``), signals, limits, and how
a rank ends on an error."""

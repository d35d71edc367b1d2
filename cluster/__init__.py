"""Where and how the points of a sweep run: planning against the tracker, and the backends."""

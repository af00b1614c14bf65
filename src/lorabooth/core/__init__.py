"""What every layer uses: the one user-facing error, atomic file I/O, locks, the write guard, logging."""

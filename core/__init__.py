"""What every layer shares, torch-free and importing nothing else of the
project: the user-facing error, atomic writes, where generated files live,
file hashing, and a run folder's lock and status (the GUI reads them)."""

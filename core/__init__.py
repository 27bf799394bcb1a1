"""What every layer shares, torch-free and importing nothing else of the
project: the user-facing error, atomic writes, where generated files live,
file hashing, the names of everything in a run folder (`run_layout`), and a
run folder's lock and status (the GUI reads them)."""

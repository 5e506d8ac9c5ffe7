"""Admin training jobs: `store` (the SQLite records), `runner` (the service's side: one
child at a time, supervised, cancelled, recovered) and `child` (what runs in the child).
The contract between the two processes is model/run.py. Import the submodule you need: the
child imports `child` alone, never the runner."""

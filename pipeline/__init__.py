"""poisongate: DVC stages whose release gates stop poisoned data and backdoored models."""

import os as _os

# Arrow's default pool (mimalloc) keeps freed pages for reuse: a no-op snapshot of 103k rows
# peaked at 396 MiB RSS on it and at 343 MiB on the system allocator, which hands large blocks
# back to the OS when they are freed (issue 19 item 3: memory per stage at 1M rows). Set before
# pyarrow is first imported (it reads the variable once); a setting in the environment wins.
_os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

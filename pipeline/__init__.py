"""poisongate: DVC stages whose release gates stop poisoned data and backdoored models."""

import os as _os

# Arrow's default pool (mimalloc) keeps freed pages for reuse; the system allocator hands large
# blocks back to the OS when they are freed, which lowers every stage's peak (issue 19 item 3:
# memory per stage at 1M rows, bench/results/scale_1m_arrow.md measures the whole change). Set
# before pyarrow is first imported (it reads the variable once); a setting in the environment wins.
_os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
